"""RMSNorm folded into the GEMV it feeds, at decode on CUDA: one kernel where the norm and the matmul were two.

In a decoder layer each RMSNorm (input_layernorm before QKV, post_attention_layernorm before gate/up)
feeds exactly one matmul, and at decode (a few rows) the norm is a tiny kernel of its own (~2–3 µs of a
step on an H100 with PDL). Its reduction runs over the same K the GEMV walks, so the GEMV can carry it:

    y[b, n] = rstd[b] · Σ_k W[n, k] · (γ[k] · x[b, k]),   rstd[b] = rsqrt(Σ_k x[b, k]² / K + eps)

Opt-in (`python -m compile --fuse_norms`): on an H100 it measured no faster end to end (bench/RESULTS.md,
"RMSNorm folded into the following GEMV"). The norm before gate/up goes into the gate/up·SwiGLU GEMV, built by
swiglu_gemv.py's FuseSwiGLU from `rms_norm_matmul_te` over the stacked [2, I, K] weight (or the quantized form
below) and scheduled here (`norm_gemv`'s stacked case); what FuseNormMatmul finds is the norm before QKV.
`FuseNormMatmul` (a Relax pass, early in the pipeline, in `decode` only) replaces
astype(matmul(rms_norm(x, γ), permute_dims(W))) by one PrimFunc, `rms_norm_matmul_te`: a single block reducing
the pair (dot, Σx²) with a tuple reducer, then the epilogue multiply by rstd and the cast.
`ScheduleNormGEMV` (before LowBatchDispatch) schedules it as StreamingGEMV does a plain GEMV: warps own
output columns, lanes stride K with 16-byte loads of W, γ and x, UNROLL steps in flight; each lane adds
x² to a second register from the x it already loaded (no extra global reads), and both partial sums are
reduced across the lanes at the end. The row count is dynamic: buckets 1 / 2 / 4 / 8 chosen at run time
(branch_on_rows), the last one looping over row groups, so the kernel is right for any row count; the
runner calls `decode` for ≤ 8 rows only (more rows run `decode_wide`, the unfused copy with the tensor-core
GEMM: schedules/quant_wide.py).

Numerics: the unfused graph rounds the normed x to bf16 before the matmul; here γ·x stays fp32 and rstd
multiplies the fp32 sum, so the result is the exact expression rounded once (tests/test_norm_gemv.py
bounds the difference against numpy float64). Σx² is accumulated in fp32 as the norm does.

A packed (quantized) weight's GEMV takes the same prologue more cheaply (`_fuse_norm_factored_matmuls`, after
quant_fusion.py's FewRowFactoredMatmuls, whose factored call it rebuilds: the norm and the packed weight meet
only there): formats/quant_values.py's dequantize_matmul_te with `norm` reads γ·x (fp32, made once a group per
row of x, shared by the thread's output rows) where `group_dot` and `group_sum` read x, adds `group_square`
(Σx² a group, beside `group_sum`), reduces (sum, Σx²) over groups as a pair (one add a group and output) and
multiplies by rstd in `norm_rstd` before the cast; QuantGemv (quant_gemv.py) schedules it. Unlike the tuple
reduction here, nothing of the norm is repeated per weight, but every thread redoes it for its K (the 14% a
Q4_K_M step lost on an H100, bench/RESULTS.md); at batch 1, where a block's row threads share K (gate/up),
QuantGemv makes it once a block instead. It applies on CUDA and the CPU, not Metal; more than 8 rows run
`decode_wide` (unfused) as for every quantized model.
"""

from __future__ import annotations

import functools

import tvm
from tvm import relax, s_tir, te, tirx
from tvm.ir import IRModule
from tvm.tirx import IndexMap
from tvm.relax.dpl import rewrite_call
from tvm.relax.dpl.pattern import GlobalVarPattern, is_op, wildcard

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
from .quant_fusion import QTYPE_ATTR, factored_matmul, uses_byte_perm

FUSED_FUNCTIONS = ("decode",)  # prefill (many rows) keeps the norm kernel and the tensor-core GEMM
BLOCK = "rms_norm_matmul"  # the tuple-reduction block the schedule looks for
QUANT_FUSED_TARGETS = ("cuda", "llvm")  # where a packed weight's factored matmul takes the norm
# StreamingGEMV's row buckets plus one of a single row: the fused kernel's per-row arithmetic (γ·x, x², the
# conversions) is twice the plain GEMV's, so batch 1 does not pay for bucket 2's zero row
ROW_BUCKETS = ((1, 1), *LIMITS_AND_BUCKETS)


def rms_norm_matmul_te(x: te.Tensor, gamma: te.Tensor, w: te.Tensor, eps: float, out_dtype: str) -> te.Tensor:
    """(rms_norm(x, γ) · Wᵀ) for x [b, K], γ [K], W [N, K] (out [b, N]) or matrices stacked [S, N, K] (gate and
    up, swiglu_gemv.py: out [b, S, N]): Σx² and the γ-scaled dot in one reduction, both fp32, rstd applied to
    the sum; cast to `out_dtype`."""
    rows, k = x.shape
    r = te.reduce_axis((tirx.IntImm("int64", 0), k), name="k")
    pair_sum = te.comm_reducer(lambda a, b: (a[0] + b[0], a[1] + b[1]),
                               lambda t0, t1: (tirx.const(0, t0), tirx.const(0, t1)), name="pair_sum")

    def dot_and_square(i, *j):
        xv = x[i, r].astype("float32")
        return pair_sum((w[(*j, r)].astype("float32") * (gamma[r].astype("float32") * xv), xv * xv), axis=r)

    dot, square = te.compute((rows, *w.shape[:-1]), dot_and_square, name=BLOCK)
    rstd = lambda i: tirx.rsqrt(square[i] / tirx.Cast("float32", k) + tirx.const(eps, "float32"))  # noqa: E731
    return te.compute(dot.shape, lambda *i: (dot[i] * rstd(i)).astype(out_dtype), name="rstd_cast")


def _fusable(target, x_shape, w_shape, dtype: str) -> bool:
    """Where the schedule applies: a matrix W [N, K] that streams (low_batch.streams), x's K static."""
    return len(w_shape) == 2 and isinstance(x_shape[-1], tirx.IntImm) and streams(target, *w_shape, dtype)


def last_axis_norm(value) -> relax.Call | None:
    """`value` if it is an RMSNorm over the last axis (the one a fused GEMV carries: its K), else None."""
    if not (isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.nn.rms_norm"))):
        return None
    ndim = len(value.args[0].ty.shape.values)
    return value if [int(a) % ndim for a in value.attrs.axes] == [ndim - 1] else None


def fuse_norm_matmuls(func: relax.Function, builder: relax.BlockBuilder, target) -> relax.Function:
    """`func` with each astype(matmul(rms_norm(x, γ), permute_dims(W))) over a stored weight W (a parameter,
    not a computed tensor such as a dequantized one) replaced by the fused call, its PrimFunc added to
    `builder`'s module; `func` itself where nothing applies."""
    norm = is_op("relax.nn.rms_norm")(wildcard(), wildcard())
    weight = is_op("relax.permute_dims")(wildcard())
    cast = is_op("relax.astype")(is_op("relax.matmul")(norm, weight))
    bound = relax.analysis.get_var2val(func)
    fused_calls = []

    def rewrite(call, matches):
        x, gamma = matches[norm].args
        w, attrs = matches[weight].args[0], matches[norm].attrs
        x_shape, w_shape = list(x.ty.shape.values), list(w.ty.shape.values)
        if (isinstance(bound.get(w), relax.Call) or w.ty.dtype != x.ty.dtype
                or not _fusable(target, x_shape, w_shape, w.ty.dtype) or last_axis_norm(matches[norm]) is None
                or [int(a) for a in matches[weight].attrs.axes or [1, 0]] != [1, 0]):
            return call
        k, n = x_shape[-1], w_shape[0]
        rows = tvm.sym.Analyzer().simplify(functools.reduce(lambda a, b: a * b, x_shape[:-1]))
        xp = te.placeholder((rows, k), x.ty.dtype, name="x")
        gp = te.placeholder(list(gamma.ty.shape.values), gamma.ty.dtype, name="gamma")
        wp = te.placeholder(w_shape, w.ty.dtype, name="w")
        y = rms_norm_matmul_te(xp, gp, wp, float(attrs.epsilon), call.attrs.dtype)
        fused = builder.add_func(te.create_prim_func([xp, gp, wp, y]).without_attr("global_symbol"), BLOCK)
        fused_calls.append(fused)
        y = relax.call_tir(fused, relax.Tuple([relax.op.reshape(x, relax.ShapeExpr([rows, k])), gamma, w]),
                           relax.TensorType([rows, n], call.attrs.dtype))
        return relax.op.reshape(y, call.ty.shape)

    new = rewrite_call(cast, rewrite, func)  # a new function even where every match was declined
    new = _fuse_norm_factored_matmuls(new, builder, target, fused_calls)
    return relax.analysis.remove_all_unused(new) if fused_calls else func


def _fuse_norm_factored_matmuls(func: relax.Function, builder: relax.BlockBuilder, target,
                                fused_calls: list) -> relax.Function:
    """`func` with each call_tir(dequantize_<qtype>_NT_matmul, (rms_norm(x, γ), components...)), the factored
    matmul of a packed weight (quant_fusion.py, which runs first), replaced by the same PrimFunc carrying the
    norm (formats/quant_values.py's dequantize_matmul_te with `norm`), on CUDA (QuantGemv schedules it) and the
    CPU (LLVM compiles any TIR; the tests run it there), not Metal. A fused projection split by type (q, k, v
    apart) folds the norm into each part. Appends each new call to `fused_calls`."""
    if target is None or target.kind.name not in QUANT_FUSED_TARGETS:
        return func
    factored = is_op("relax.call_tir")(GlobalVarPattern(), wildcard(), add_constraint=False)
    bound = relax.analysis.get_var2val(func)
    module = builder.get()

    def rewrite(call, _matches):
        callee = call.args[0]
        attrs = module[callee].attrs if callee in module else None
        if not attrs or QTYPE_ATTR not in attrs or not isinstance(call.args[1], relax.Tuple):
            return call
        x, *components = call.args[1].fields
        norm = last_axis_norm(bound.get(x))
        if norm is None:
            return call
        fused = factored_matmul(builder, str(attrs[QTYPE_ATTR]), norm.args[0], components,
                                uses_byte_perm(target), (norm.args[1], float(norm.attrs.epsilon)))
        fused_calls.append(fused)
        return fused

    return rewrite_call(factored, rewrite, func)


def fuses_norm(func: relax.Function, target) -> bool:
    """Whether FuseNormMatmul changes `func` (AddWideFunctions then keeps an unfused copy for many rows)."""
    return not fuse_norm_matmuls(func, relax.BlockBuilder(), target).same_as(func)


@tvm.transform.module_pass(opt_level=0, name="FuseNormMatmul")
class FuseNormMatmul:
    """fuse_norm_matmuls in the Relax functions `functions`, on CUDA (before legalization)."""

    def __init__(self, functions: tuple[str, ...] = FUSED_FUNCTIONS):
        self.functions = functions

    def transform_module(self, mod: IRModule, _ctx) -> IRModule:
        target = tvm.target.Target.current(allow_none=True)
        return rewrite_functions(mod, self.functions, lambda func, builder: fuse_norm_matmuls(func, builder, target))


def norm_gemv(func: tirx.PrimFunc, bucket: int) -> tirx.PrimFunc | None:
    """`func` (rms_norm_matmul_te's PrimFunc, maybe with an epilogue after it) scheduled for `bucket` rows a
    block (rows padded with zeros), or None when it is not that PrimFunc. Stacked matrices [S, N, K] (gate and
    up under swiglu_gemv.py's silu·up) are tiled as swiglu_gemv tiles them: a warp's S columns are the S
    matrices' rows n, so that the epilogue finds all of them in the warp's registers."""
    if not holds_block(func, BLOCK):
        return None
    sch = s_tir.Schedule(func)
    block, epilogue = sch.get_sblock(BLOCK), sch.get_sblock("rstd_cast")
    after = sch.get_consumers(epilogue)
    if after:  # rstd · sum read where the epilogue reads it
        sch.compute_inline(epilogue)
        epilogue = after[0]
    _, *cols, red = sch.get_loops(block)
    extents = [int(sch.get(loop).extent) for loop in (*cols, red)]
    n, k = functools.reduce(lambda a, b: a * b, extents[:-1]), extents[-1]
    vec = LOAD_BYTES * 8 // tvm.DataType(sch.get(block).reads[0].source.dtype).bits
    unroll, tile_s = gemv_tiling(n, k, bucket, WARPS, vec, columns=extents[0] if len(cols) > 1 else None)
    dtype = str(sch.get(block).iter_vars[0].var.ty)  # the index maps apply to the per-lane block made from it

    def per_lane(index):  # an index map over the per-lane block's (lane, row, columns..., step, unrolled, element)
        return IndexMap.from_func(lambda lane, b, *rest: index(lane, b, rest[:-3], rest[-3:]), ndim=5 + len(cols),
                                  index_dtype=dtype)

    step_reads = {1: per_lane(lambda lane, b, c, step: (lane, *step))}
    pad_input = None
    if bucket > 1:  # x read as zero past the real rows: no predicate in the K loop
        sch.pad_einsum(block, [bucket, *extents])
        for name in (f"{BLOCK}.v0_pad", f"{BLOCK}.v1_pad"):
            sch.compute_inline(sch.get_sblock(name))
        pad_input = sch.get_sblock("x_pad")
    else:  # one row a block: x (read 2) straight into registers
        step_reads[2] = per_lane(lambda lane, b, c, step: (lane, b, *step))
    if len(cols) > 1:  # (n, s) with s innermost: a warp's columns
        rows, stack, size, red = sch.get_loops(block)
        sch.reorder(rows, size, stack, red)
        sch.fuse(size, stack)
    # W's steps into registers first (read 0); γ (read 1) per step with x: a trip's γ held in registers
    # ahead would cost 4 registers a step (50 → 56 a thread at Llama's QKV, fewer blocks an SM)
    ty = stream_over_k(sch, block, pad_input, bucket, WARPS, tile_s, unroll, vec,
                       {0: per_lane(lambda lane, b, c, step: (lane, *c, *step))}, step_reads, outputs=2)
    sch.set_scope(block, 0, "local")
    sch.set_scope(block, 1, "local")
    sch.reverse_compute_at(epilogue, ty, preserve_unit_loops=True)
    return sch.mod["main"]


@tvm.transform.module_pass(opt_level=0, name="KilnScheduleNormGEMV")
class ScheduleNormGEMV:
    """Schedules every rms_norm_matmul PrimFunc as the run-time chain of its 1 / 2 / 4 / 8-row kernels and marks it
    `tirx.is_scheduled` (LowBatchGEMV's analysis does not know a tuple reduction)."""

    def transform_module(self, mod: IRModule, _ctx) -> IRModule:
        return schedule_row_chains(mod, BLOCK, norm_gemv, ROW_BUCKETS)
