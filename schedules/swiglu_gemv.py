"""SwiGLU's silu(gate)·up in the epilogue of the gate/up GEMV, at decode on CUDA: one kernel where there were two.

The MLP computes gate/up as one matmul ([b, 2I], the weight's rows gate then up), then
split → silu(gate) · up in a kernel of its own (~2.5–3 µs of a step on an H100 with PDL). The product
needs the gate and the up output of the same column i, which are rows i and I + i of the weight; so the
weight is viewed [2, I, K] (a reshape: no copy, no layout change, the quantized components too, since
each keeps a row's blocks in its own row: docs/QUANT-LAYOUT.md) and one PrimFunc computes

    out[b, i] = silu(Σ_k W[0, i, k] · x[b, k]) · Σ_k W[1, i, k] · x[b, k]

with the matrix index t a spatial axis of the reduction block, bound inside one thread's own rows: both
dot products end in the same registers after the cross-lane reduction and the epilogue runs once per
output. (The down GEMV's prologue, the other place for it, lost: each warp recomputed the product over K;
bench/RESULTS.md, "Fusion: kernels a decode layer".)

`FuseSwiGLU` (a Relax pass, before the quantized rewrites, in `decode` only) replaces
multiply(silu(split(astype(matmul(x, Wᵀ)))[0]), ...[1]) by a call of that PrimFunc: for a stored bf16/fp16
weight `swiglu_matmul_te` (scheduled here like StreamingGEMV: a warp's two columns are t = 0, 1 of one i),
for a packed quantized one formats/quant_values.py's `dequantize_matmul_te` on the stacked components with
the same epilogue (QuantGemv tiles t inside a thread's rows). Prefill and `decode_wide` (more than 8 rows,
the tensor-core GEMM: schedules/quant_wide.py) keep the unfused kernels.

Numerics: the unfused graph rounds gate and up to the model dtype, then silu and the product; here both
stay fp32 and the result is rounded once (tests/test_swiglu_gemv.py bounds it against numpy float64).

With `--fuse_norms` (`FuseSwiGLU(fuse_norms=True)`) the RMSNorm before gate/up (post_attention_layernorm: it
reads the residual stream that the O GEMV's epilogue wrote, and is read by gate/up only) rides in the same
call, one kernel less a layer: norm_gemv.py's prologue composed with the epilogue above, no third copy of either.
A bf16 weight: `rms_norm_matmul_te` over the stacked [2, I, K] weight (the (dot, Σx²) pair reduction, rstd on
both sums) then `silu_multiply_te`, scheduled by norm_gemv.py's rule (its buckets 1 / 2 / 4 / 8, a warp's two
columns gate and up of one i as here). A packed weight: `dequantize_matmul_te` with `norm` on the stacked
components, then `silu_multiply_te`, scheduled by QuantGemv; on the CPU too (LLVM compiles any TIR; the tiny
quantized models run it there), where the plain SwiGLU fusion does not apply. The normed x, gate and up are never
rounded (tests/test_norm_swiglu_gemv.py).
"""

from __future__ import annotations

import functools

import tvm
from tvm import relax, s_tir, te, tirx
from tvm.ir import IRModule
from tvm.relax.dpl import rewrite_call
from tvm.relax.dpl.pattern import is_op, is_tuple_get_item, wildcard

from formats.quant_layout import STORED_FLOATS
from formats.quant_values import dequantize_matmul_te

from .function_rewrite import rewrite_functions
from .low_batch import (
    LIMITS_AND_BUCKETS,
    LOAD_BYTES,
    WARPS,
    gemv_tiling,
    holds_block,
    schedule_row_chains,
    stream_over_k,
    streams,
)
from .norm_gemv import QUANT_FUSED_TARGETS, last_axis_norm, rms_norm_matmul_te
from .quant_fusion import uses_byte_perm

FUSED_FUNCTIONS = ("decode",)  # prefill (many rows) keeps the GEMM and the silu·mul kernel
BLOCK = "swiglu_matmul"  # the bf16 reduction block [rows, 2, I] the schedule looks for
EPILOGUE = "silu_multiply"
HALVES = tirx.IntImm("int64", 2)  # gate, up: int64 as Relax's other dims (a loop fuse needs one type)


def silu_multiply_te(gate_up: te.Tensor, out_dtype: str) -> te.Tensor:
    """[..., 2, I] fp32 → silu(gate) · up [..., 1, I] in fp32, cast to `out_dtype` once. The unit axis z indexes
    gate (2z) and up (2z + 1): the schedules move this block under the GEMV's threads (reverse_compute_at),
    which solves each read region for a block variable: a constant index fails, and so does a region z .. z + 1
    (only a point or one starting at variable · stride is solved)."""
    *lead, _, size = gate_up.shape

    def product(*i):
        gate, up = gate_up[(*i[:-2], 2 * i[-2], i[-1])], gate_up[(*i[:-2], 2 * i[-2] + 1, i[-1])]
        return (gate * tirx.sigmoid(gate) * up).astype(out_dtype)

    return te.compute((*lead, tirx.IntImm(str(size.ty), 1), size), product, name=EPILOGUE)


def swiglu_matmul_te(x: te.Tensor, w: te.Tensor, out_dtype: str) -> te.Tensor:
    """silu(x · W[0]ᵀ) · (x · W[1]ᵀ) for x [rows, K], W [2, I, K] (gate and up): both sums fp32."""
    rows, k = x.shape
    r = te.reduce_axis((tirx.IntImm(str(k.ty), 0), k), name="k")
    gate_up = te.compute((rows, *w.shape[:2]), lambda b, t, i: te.sum(
        x[b, r].astype("float32") * w[t, i, r].astype("float32"), axis=r), name=BLOCK)
    return silu_multiply_te(gate_up, out_dtype)


def _opaque(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """`func` as FuseOps must leave it: the schedules expect its blocks alone (no reshape fused after)."""
    return func.without_attr("global_symbol").with_attr("op_pattern", 8)  # Relax's OpPatternKind kOpaque


def _stacked(expr: relax.Expr, size) -> relax.Expr:
    """`expr` [2·size, ...] viewed [2, size, ...] (gate rows, then up rows)."""
    return relax.op.reshape(expr, relax.ShapeExpr([HALVES, size, *list(expr.ty.shape.values)[1:]]))


def fuse_swiglu(func: relax.Function, builder: relax.BlockBuilder, mod: IRModule, target,
                fuse_norms: bool = False) -> relax.Function:
    """`func` with each silu(gate)·up over a gate/up matmul of a stored float weight (CUDA) or a packed
    quantized one (CUDA, where __byte_perm exists) replaced by one call (module docstring), its PrimFunc
    added to `builder`'s module; `func` itself where nothing applies. `fuse_norms`: an RMSNorm before the
    matmul rides in the same call (norm_gemv.py's prologue), for a packed weight on the CPU too."""
    weight = is_op("relax.permute_dims")(wildcard())
    matmul = is_op("relax.matmul")(wildcard(), weight)
    cast = is_op("relax.astype")(matmul)
    halves = is_op("relax.split")(cast | matmul)  # an fp32 model's matmul has no cast
    product = is_op("relax.multiply")(is_op("relax.nn.silu")(is_tuple_get_item(halves, 0)),
                                      is_tuple_get_item(halves, 1))
    bound = relax.analysis.get_var2val(func)
    fused = []

    def rewrite(call, matches):
        x, w = matches[matmul].args[0], matches[weight].args[0]
        split = matches[halves]
        sections, axes = split.attrs.indices_or_sections, matches[weight].attrs.axes
        x_shape, out_dtype = list(x.ty.shape.values), call.ty.dtype
        norm = last_axis_norm(bound.get(x)) if fuse_norms else None
        on_cuda = target is not None and target.kind.name == "cuda"
        fp32_model = cast not in matches  # no cast after the matmul (the CPU's fp32): a packed weight with a norm only
        if (not isinstance(sections, tirx.IntImm) or int(sections) != 2
                or int(split.attrs.axis) % len(x_shape) != len(x_shape) - 1
                or [int(a) for a in axes or [1, 0]] != [1, 0] or fp32_model and norm is None
                or not (on_cuda or norm is not None and target.kind.name in QUANT_FUSED_TARGETS)):
            return call
        # with the norm: its input and γ are the call's first operands, the PrimFunc's prologue applies it
        x_in, prologue = (x, []) if norm is None else (norm.args[0], [norm.args[1]])
        gamma = [te.placeholder(list(g.ty.shape.values), g.ty.dtype, name="gamma") for g in prologue]
        eps, prefix = (None, "") if norm is None else (float(norm.attrs.epsilon), "rms_norm_")
        k, size = x_shape[-1], call.ty.shape.values[-1]
        value = bound.get(w)
        if isinstance(value, relax.Call) and value.op.name == "relax.astype":
            value = bound.get(value.args[0], value.args[0])
        if not isinstance(value, relax.Call):  # a stored weight of the model dtype (a parameter's tuple item)
            if not on_cuda or fp32_model or w.ty.dtype != x.ty.dtype or not streams(target, size, k, w.ty.dtype):
                return call
            rows = tvm.sym.Analyzer().simplify(functools.reduce(lambda a, b: a * b, x_shape[:-1]))
            xp = te.placeholder((rows, k), x.ty.dtype, name="x")
            wp = te.placeholder((HALVES, size, k), w.ty.dtype, name="w")
            out = (swiglu_matmul_te(xp, wp, out_dtype) if norm is None
                   else silu_multiply_te(rms_norm_matmul_te(xp, gamma[0], wp, eps, "float32"), out_dtype))
            gv = builder.add_func(_opaque(te.create_prim_func([xp, *gamma, wp, out])), prefix + BLOCK)
            y = relax.call_tir(gv, relax.Tuple([relax.op.reshape(x_in, relax.ShapeExpr([rows, k])), *prologue,
                                                _stacked(w, size)]),
                               relax.TensorType(list(out.shape), out_dtype))
            fused.append(gv)
            return relax.op.reshape(y, call.ty.shape)
        if not (isinstance(value, relax.Call) and value.op.name == "relax.call_tir"
                and value.args[0].name_hint.startswith("dequantize")):
            return call
        qtype = mod[value.args[0]].attrs["kiln.qtype"]
        if qtype in STORED_FLOATS:
            return call
        components = list(value.args[1].fields)
        xp = te.placeholder(x_shape, x.ty.dtype, name="x")
        views = [te.placeholder((HALVES, size, *list(c.ty.shape.values)[1:]), c.ty.dtype, name=f"w{j}")
                 for j, c in enumerate(components)]
        gate_up = dequantize_matmul_te(qtype, xp, views, byte_perm=uses_byte_perm(target),
                                       norm=None if norm is None else (gamma[0], eps))
        out = silu_multiply_te(gate_up, out_dtype)
        gv = builder.add_func(_opaque(te.create_prim_func([xp, *gamma, *views, out])),
                              f"{prefix}dequantize_{qtype}_{EPILOGUE}")
        fused.append(gv)
        y = relax.call_tir(gv, relax.Tuple([x_in, *prologue, *(_stacked(c, size) for c in components)]),
                           relax.TensorType(list(out.shape), out_dtype))
        return relax.op.reshape(y, call.ty.shape)

    new = rewrite_call(product, rewrite, func)
    return relax.analysis.remove_all_unused(new) if fused else func


def fuses_swiglu(func: relax.Function, mod: IRModule, target) -> bool:
    """Whether FuseSwiGLU changes `func` (AddWideFunctions then keeps an unfused copy for many rows)."""
    return not fuse_swiglu(func, relax.BlockBuilder(), mod, target).same_as(func)


@tvm.transform.module_pass(opt_level=0, name="FuseSwiGLU")
class FuseSwiGLU:
    """fuse_swiglu in the Relax functions `functions`, on CUDA (before legalization and the quantized rewrites;
    `fuse_norms`: also before FuseNormMatmul, which would otherwise take the RMSNorm before gate/up)."""

    def __init__(self, functions: tuple[str, ...] = FUSED_FUNCTIONS, fuse_norms: bool = False):
        self.functions = functions
        self.fuse_norms = fuse_norms

    def transform_module(self, mod: IRModule, _ctx) -> IRModule:
        target = tvm.target.Target.current(allow_none=True)
        out = rewrite_functions(mod, self.functions,
                                lambda func, builder: fuse_swiglu(func, builder, mod, target, self.fuse_norms))
        return relax.transform.DeadCodeElimination()(out)


def swiglu_gemv(func: tirx.PrimFunc, bucket: int) -> tirx.PrimFunc | None:
    """`func` (swiglu_matmul_te's PrimFunc) scheduled for `bucket` rows a block (rows padded with zeros) as
    StreamingGEMV: a warp's columns are (i, t) pairs, t innermost, so that the warp holds gate and up of
    its outputs; None when it is not that PrimFunc."""
    if not holds_block(func, BLOCK):
        return None
    sch = s_tir.Schedule(func)
    block, epilogue = sch.get_sblock(BLOCK), sch.get_sblock(EPILOGUE)
    _, _, cols, red = sch.get_loops(block)
    size, k = int(sch.get(cols).extent), int(sch.get(red).extent)
    vec = LOAD_BYTES * 8 // tvm.DataType(sch.get(block).reads[1].source.dtype).bits
    unroll, tile_s = gemv_tiling(2 * size, k, bucket, WARPS, vec, columns=2)
    sch.pad_einsum(block, [bucket, 1, 1, 1])  # x read as zero past the real rows: no predicate in the K loop
    sch.compute_inline(sch.get_sblock(f"{BLOCK}_pad"))  # the unpadding copy: the epilogue reads the padded sums
    rows, halves, cols, red = sch.get_loops(block)
    sch.reorder(rows, cols, halves, red)
    sch.fuse(cols, halves)
    # W's steps into registers first (read 1; 0 is the padded rows)
    ty = stream_over_k(sch, block, sch.get_sblock("x_pad"), bucket, WARPS, tile_s, unroll, vec,
                       {1: lambda lane, b, t, i, o, u, v: (lane, t, i, o, u, v)})
    sch.set_scope(block, 0, "local")
    sch.reverse_compute_at(epilogue, ty, preserve_unit_loops=True)
    return sch.mod["main"]


@tvm.transform.module_pass(opt_level=0, name="KilnScheduleSwiGLUGEMV")
class ScheduleSwiGLUGEMV:
    """Schedules every swiglu_matmul PrimFunc as the run-time chain of its 2 / 4 / 8-row kernels (the last
    takes any number of rows) and marks it `tirx.is_scheduled`."""

    def transform_module(self, mod: IRModule, _ctx) -> IRModule:
        return schedule_row_chains(mod, BLOCK, swiglu_gemv, LIMITS_AND_BUCKETS)
