"""Where a quantized weight's dequantization runs: inside the matmul for few rows, as its own kernel for many.

In `decode` and `logits` (one row per sequence) a matmul reads each weight once per call, so the GEMV
should read the packed words and dequantize in registers (2-4x fewer bytes than the model dtype), with
as little arithmetic per weight as possible: at 4.5 bits a weight and 3 TB/s an H100 has ~6 instruction
slots per weight. `FewRowFactoredMatmuls` (first in the pipeline) replaces such a matmul of a packed
weight by one PrimFunc, formats/quant_values.py's `dequantize_matmul_te`: the group scale factored out
of the inner sum (Σ_k (a·q_k − b)·x_k = a·Σ_k q_k·x_k − b·Σ_k x_k per scale group), so that per weight
only the code's conversion and one FMA with x remain; on CUDA the codes come from byte permutes. Its
`op_pattern` (out-elementwise-fusable) lets FuseOps fuse the cast and residual add after it, and
QuantGemv (quant_gemv.py) schedules it. This is a Relax rewrite, not a schedule: no schedule primitive
reassociates a sum.

A stored float weight (a GGUF F16 kept as stored) has no scale to factor: its matmul reads the fp32
values instead of the model dtype (no rounding per weight), and `FuseDequantizeMatmul` (after
FuseOps/FuseTIR, like MLC-LLM's FuseDequantizeMatmulEwise) fuses its `dequantize_*` into the
`NT_matmul`, epilogues included. In `prefill` (many rows) and the `*_wide` copies the dequantized
weight is reused by every row tile, so dequantize stays a separate kernel writing the model dtype
and the GEMM rules (tensor cores) run unchanged on it.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.ir import IRModule
from tvm.relax.dpl import rewrite_call
from tvm.relax.dpl.pattern import GlobalVarPattern, TuplePattern, is_op, wildcard
from tvm.relax.utils import gen_call_tir_inputs

from formats.quant_layout import STORED_FLOATS
from formats.quant_values import dequantize_matmul_te

from .function_rewrite import rewrite_functions

FEW_ROW_FUNCTIONS = ("decode", "logits")
_MAX_COMPONENTS, _MAX_EPILOGUE_ARGS = 1, 3  # a stored float weight is one component (packed ones are factored)


def _callee(call) -> str:
    return call.args[0].name_hint if isinstance(call, relax.Call) and isinstance(call.args[0], relax.GlobalVar) else ""


def _patterns() -> list:
    """call_tir(NT_matmul*, (x, call_tir(dequantize*, components), epilogue args...)), for every arity."""
    patterns = []
    for n_components in range(1, _MAX_COMPONENTS + 1):
        for n_epilogue in range(_MAX_EPILOGUE_ARGS + 1):
            w = is_op("relax.call_tir")(GlobalVarPattern(), TuplePattern([wildcard() for _ in range(n_components)]),
                                        add_constraint=False)
            matmul = is_op("relax.call_tir")(
                GlobalVarPattern(), TuplePattern([wildcard(), w] + [wildcard() for _ in range(n_epilogue)]),
                add_constraint=False)

            def check(ctx) -> bool:
                return (_callee(ctx.annotated_expr["w"]).startswith("dequantize")
                        and "NT_matmul" in _callee(ctx.annotated_expr["matmul"]))

            patterns.append(("dequantize_matmul", matmul, {"w": w, "matmul": matmul}, check))
    return patterns


_OUT_EWISE_FUSABLE = 4  # Relax's OpPatternKind: the cast / residual add after the matmul fuse into it
QTYPE_ATTR = "kiln.qtype"  # on a factored PrimFunc: its weight's type (FuseNormMatmul rebuilds it with the norm)


def uses_byte_perm(target) -> bool:
    """Whether the factored matmul makes its codes by byte permutes (`__byte_perm` is CUDA's)."""
    return target is not None and target.kind.name == "cuda"


def factored_matmul(builder: relax.BlockBuilder, qtype: str, x: relax.Expr, components: list, byte_perm: bool,
                    norm: tuple | None = None) -> relax.Call:
    """call_tir of formats/quant_values.py's dequantize_matmul_te (its PrimFunc added to `builder`, tagged with
    QTYPE_ATTR): x · dequantize(W)ᵀ in fp32, or with `norm` (γ, eps) rms_norm(x, γ) · dequantize(W)ᵀ."""
    def te_func(x, *operands):
        if norm is None:
            return dequantize_matmul_te(qtype, x, list(operands), byte_perm)
        return dequantize_matmul_te(qtype, x, list(operands[1:]), byte_perm, (operands[0], norm[1]))

    func, args, out = gen_call_tir_inputs(te_func, x, *([norm[0]] if norm else []), *components,
                                          primfunc_attrs={"op_pattern": _OUT_EWISE_FUSABLE, QTYPE_ATTR: qtype})
    name = f"{'rms_norm_' if norm else ''}dequantize_{qtype}_NT_matmul"
    return relax.call_tir(builder.add_func(func, name), args, out)


@tvm.transform.module_pass(opt_level=0, name="FewRowFactoredMatmuls")
class FewRowFactoredMatmuls:
    """In the Relax functions `functions`, before legalization: matmul(x, permute_dims(astype(call_tir(
    dequantize_<qtype>, components)))) → call_tir(dequantize_<qtype>_NT_matmul, (x, components)), the
    group-scale-factored PrimFunc of model_defs/quant.py (a packed type), or → matmul(x,
    permute_dims(call_tir(dequantize_<f16...>))) (a stored float, its cast dropped)."""

    def __init__(self, functions: tuple[str, ...] = FEW_ROW_FUNCTIONS):
        self.functions = functions

    def transform_module(self, mod: IRModule, _ctx) -> IRModule:
        values = is_op("relax.call_tir")(GlobalVarPattern(), wildcard(), add_constraint=False)
        weight = is_op("relax.permute_dims")(is_op("relax.astype")(values) | values)  # fp32 models: no cast
        matmul = is_op("relax.matmul")(wildcard(), weight)
        byte_perm = uses_byte_perm(tvm.target.Target.current(allow_none=True))

        def rewrite(call, matches, builder):
            deq = matches[values]
            if not _callee(deq).startswith("dequantize"):
                return call
            qtype = mod[deq.args[0]].attrs[QTYPE_ATTR]
            x, components = call.args[0], list(deq.args[1].fields)
            if qtype in STORED_FLOATS:
                transposed = relax.op.permute_dims(deq, matches[weight].attrs.axes)
                return relax.op.matmul(x, transposed, out_dtype=call.attrs.out_dtype)
            return factored_matmul(builder, qtype, x, components, byte_perm)

        def rewrite_function(func, builder):
            new = rewrite_call(matmul, lambda call, matches: rewrite(call, matches, builder), func)
            # the dequantize calls and casts no matmul reads any more go
            return func if new.same_as(func) else relax.analysis.remove_all_unused(new)

        return relax.transform.DeadCodeElimination()(rewrite_functions(mod, self.functions, rewrite_function))


@tvm.transform.module_pass(opt_level=0, name="FuseDequantizeMatmul")
class FuseDequantizeMatmul:
    """Fuse `dequantize_*` into the `*NT_matmul*` consuming it, in the Relax functions `functions` only."""

    def __init__(self, functions: tuple[str, ...] = FEW_ROW_FUNCTIONS):
        self.functions = functions

    def transform_module(self, mod: IRModule, _ctx) -> IRModule:
        few_rows = {gv: f for gv, f in mod.functions.items()
                    if gv.name_hint in self.functions or not isinstance(f, relax.Function)}
        fused = tvm.transform.Sequential([relax.transform.FuseOpsByPattern(_patterns()),
                                          relax.transform.FuseTIR()])(IRModule(few_rows, attrs=mod.attrs))
        out = IRModule(dict(mod.functions), attrs=mod.attrs)
        for gv, func in fused.functions.items():
            if gv.name_hint in self.functions:
                out.update_func(out.get_global_var(gv.name_hint), func)
            elif gv.name_hint not in mod:  # the new fused PrimFuncs
                out[gv] = func
        return relax.transform.DeadCodeElimination()(out)
