"""SwiGLU's silu(gate) · up as the prologue of the down projection's GEMV in `decode` (issue 12).

After FuseOps a decode layer's MLP is three kernels: the gate/up GEMV, an elementwise kernel writing
silu(gate) · up, and the down GEMV (+ residual). FuseOps never fuses an injective producer into a
reduction, so, as FuseDequantizeMatmul does for a weight's dequantization, a pattern fusion puts the
elementwise kernel in front of the down matmul: one PrimFunc whose matmul reads
silu(gu[b, k]) · gu[b, k + I]. StreamingGEMV computes that while loading x (each block recomputes it
for the rows it holds, cheap: x is the small operand); for more rows the GEMM rules inline it into
their operand loads.

Only in `decode`: prefill's tensor-core GEMM reuses each x tile many times, where a separate
elementwise pass costs nothing next to the GEMM. Only for a matmul whose weight is a parameter
(model dtype): a quantized down projection (a fused dequantize-matmul) stays as it was, for QuantGemv,
which expects the dequantize and one reduction and nothing else in front.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.ir import IRModule
from tvm.relax.dpl.pattern import GlobalVarPattern, TuplePattern, is_op, wildcard

from .quant_fusion import fuse_patterns_in

FUNCTIONS = ("decode",)
_MAX_EPILOGUE_ARGS = 3  # residual, bias


def _callee(call) -> str:
    return call.args[0].name_hint if isinstance(call, relax.Call) and isinstance(call.args[0], relax.GlobalVar) else ""


def _patterns() -> list:
    """call_tir(*NT_matmul*, (call_tir(*silu_multiply*, (gate_up,)), weight, epilogue args...))."""
    patterns = []
    for n_epilogue in range(_MAX_EPILOGUE_ARGS + 1):
        act = is_op("relax.call_tir")(GlobalVarPattern(), TuplePattern([wildcard()]), add_constraint=False)
        weight = wildcard()
        matmul = is_op("relax.call_tir")(
            GlobalVarPattern(), TuplePattern([act, weight] + [wildcard() for _ in range(n_epilogue)]),
            add_constraint=False)

        def check(ctx) -> bool:
            w = ctx.annotated_expr["weight"]
            return ("silu_multiply" in _callee(ctx.annotated_expr["act"])
                    and "NT_matmul" in _callee(ctx.annotated_expr["matmul"])
                    and not isinstance(w, relax.Call))  # a parameter, not a dequantized weight

        patterns.append(("swiglu_matmul", matmul, {"act": act, "weight": weight, "matmul": matmul}, check))
    return patterns


@tvm.transform.module_pass(opt_level=0, name="FuseSwiGLUDown")
class FuseSwiGLUDown:
    """Fuse the SwiGLU product into the matmul consuming it, in the Relax functions `functions` only."""

    def __init__(self, functions: tuple[str, ...] = FUNCTIONS):
        self.functions = functions

    def transform_module(self, mod: IRModule, _ctx) -> IRModule:
        return fuse_patterns_in(mod, self.functions, _patterns())
