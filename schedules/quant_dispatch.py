"""Schedules the quantized-weight PrimFuncs (packed uint32 code words, docs/QUANT-LAYOUT.md) on GPUs
before any generic rule sees them: dequant-fused matmuls get QuantGemv, stand-alone dequantize
kernels QuantDequantize. dlight's LowBatchGEMV would otherwise take the fused matmuls (it recognises
"dequantize" blocks) and recompute every weight once per row of x, with 4-byte loads.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.ir import IRModule

from .quant_dequantize import QuantDequantize
from .quant_gemv import QuantGemv

GPU_KINDS = ("cuda", "metal", "rocm", "vulkan", "opencl")


@tvm.transform.module_pass(opt_level=0, name="KilnQuantKernels")
class QuantKernels:
    """Marks what it schedules `tir.is_scheduled`, so that later rules leave it alone."""

    def transform_module(self, mod: IRModule, _ctx) -> IRModule:
        target = tvm.target.Target.current(allow_none=True)
        if target is None or target.kind.name not in GPU_KINDS:
            return mod
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or func.attrs and "tirx.is_scheduled" in func.attrs:
                continue
            scheduled = QuantGemv().kernel(func, target) or QuantDequantize().kernel(func, target)
            if scheduled is not None:
                mod.update_func(gvar, scheduled.with_attr("tirx.is_scheduled", True))
        return mod
