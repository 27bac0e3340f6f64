"""`decode_wide` and `logits_wide`: the quantized model's decode and LM head for more than 8 rows, unfused.

The dequant-fused GEMV of `decode` / `logits` (quant_fusion.py) reads each packed weight once for all
rows but repeats the dequantizing arithmetic per row: at 16 rows it costs 7.5x one row. Above 8 rows
it is cheaper to dequantize each weight once into the model dtype (QuantDequantize, near copy speed)
and run the tensor-core GEMM on it, as prefill does. So a quantized module exports both: this pass,
first in the pipeline, copies each few-row function that dequantizes a weight as `<name>_wide`, which the
few-row rewrites (quant_fusion.py: fp32 weights, dequantize fused into the GEMV) leave alone. The copy's
kernels that equal the original's (attention, norms, RoPE, the dequantize kernels of prefill where shapes
match) are one PrimFunc after FuseOps/FuseTIR (Relax's BlockBuilder deduplicates structurally equal
functions); only the unfused matmuls are added. The runner picks by the number of sequences
(runtime/model_runner.py). A float model compiled for CUDA gets `decode_wide` too: its `decode` computes
silu(gate)·up in the gate/up GEMV (swiglu_gemv.py) and, with `--fuse_norms`, folds each RMSNorm into the
following GEMV (norm_gemv.py), whose few-row kernels would re-read the weights per 8 rows.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.ir import IRModule
from tvm.relax.utils import copy_with_new_vars

from .norm_gemv import fuses_norm
from .quant_fusion import FEW_ROW_FUNCTIONS
from .swiglu_gemv import fuses_swiglu


def _dequantizes(func: relax.Function) -> bool:
    """Whether `func` calls a `dequantize_*` PrimFunc (on its own or fused with its consumers)."""
    found = []

    def visit(expr):
        if (isinstance(expr, relax.Call) and expr.op.same_as(tvm.ir.Op.get("relax.call_tir"))
                and "dequantize" in expr.args[0].name_hint):
            found.append(expr)

    relax.analysis.post_order_visit(func.body, visit)
    return bool(found)


@tvm.transform.module_pass(opt_level=0, name="AddWideFunctions")
class AddWideFunctions:
    """Adds `<name>_wide`, an exported copy of each function of `functions` that dequantizes a weight, whose
    SwiGLU folds into the gate/up GEMV (swiglu_gemv.py) or, with `fuse_norms`, whose RMSNorms fold into their
    GEMVs (norm_gemv.py: float models on CUDA)."""

    def __init__(self, functions: tuple[str, ...] = FEW_ROW_FUNCTIONS, fuse_norms: bool = False):
        self.functions = functions
        self.fuse_norms = fuse_norms

    def transform_module(self, mod: IRModule, _ctx) -> IRModule:
        target = tvm.target.Target.current(allow_none=True)
        out = IRModule(dict(mod.functions), attrs=mod.attrs)
        for gv, func in mod.functions.items():
            if gv.name_hint in self.functions and (_dequantizes(func) or fuses_swiglu(func, mod, target)
                                                   or self.fuse_norms and fuses_norm(func, target)):
                wide = f"{gv.name_hint}_wide"
                out[wide] = copy_with_new_vars(func).with_attr("global_symbol", wide)  # vars: one binding each
        return out
