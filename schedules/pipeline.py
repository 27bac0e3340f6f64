"""Kiln's relax pipeline per target: how Relax functions become scheduled TIR kernels.

TVM's default pipelines have two problems for LLMs: every `nn.Linear` runs a weight transpose
kernel on every call (fixed by running FuseTransposeMatmul first), and the Metal default segfaults
in dlight's simdgroup matmul. So we assemble our own from TVM's pass lists and our rule lists.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_passes
from tvm.relax.backend.cuda import pipeline as cuda_passes
from tvm.relax.backend.gpu_generic import pipeline as gpu_passes
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

from .low_batch import LowBatchDispatch
from .matmul_tensorcore import TIR_PIPELINE, MatmulTensorCore
from .matmul_wgmma import MatmulWgmma
from .metal_matmul import MatmulNoSimdgroup
from .norm_gemv import FuseNormMatmul, ScheduleNormGEMV
from .pdl import PDL_TIR_PIPELINE, supports_pdl
from .quant_dispatch import QuantKernels
from .quant_fusion import FewRowFactoredMatmuls, FuseDequantizeMatmul
from .quant_wide import AddWideFunctions
from .row_reduction import RowReduction
from .swiglu_gemv import FuseSwiGLU, ScheduleSwiGLUGEMV


class GEMVOrDecline(GPUScheduleRule):
    """dlight's GEMV, declining where it asserts: it half-recognises row sums with a per-row operand,
    sum(where(p[b, v] >= t[b], p[b, v], 0)) (the sampler's top-k mass), and fails an assertion instead
    of returning None; the next rule (Reduction) schedules them."""

    def apply(self, func, target, tunable):
        try:
            return dl.gpu.GEMV().apply(func, target, tunable)
        except AssertionError:
            return None


def gpu_rules(target: tvm.target.Target) -> list:
    """The dlight rules tried, in order, on every PrimFunc the model produces for a GPU target."""
    if target.kind.name == "metal":
        matmul = [MatmulNoSimdgroup()]
    else:  # tensor cores first: wgmma on sm_90a, else mma.sync on sm_80+ (each None elsewhere or
        # for small static M), then dlight's
        matmul = [MatmulWgmma(), MatmulTensorCore(), dl.gpu.Matmul()]
    return [*matmul, GEMVOrDecline(), dl.gpu.LowBatchGEMV(), dl.gpu.Reduction(),
            dl.gpu.GeneralReduction(), RowReduction(), dl.gpu.Fallback()]


def _passes(target: tvm.target.Target, fuse_norms: bool = False) -> list:
    kind = target.kind.name
    backend = {"llvm": cpu_passes, "cuda": cuda_passes, "metal": gpu_passes}[kind]
    legalize = [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        FuseDequantizeMatmul(),
        QuantKernels(),  # packed quantized weights first: no generic rule reads them well
    ]
    if kind == "cuda":
        legalize += ([ScheduleNormGEMV()] if fuse_norms else []) + [ScheduleSwiGLUGEMV(), LowBatchDispatch(gpu_rules(target))]
    if kind != "llvm":
        legalize.append(dl.ApplyDefaultSchedule(*gpu_rules(target)))
    dataflow_lower = [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
    ]
    # decode/logits for > 8 rows (unfused, model-dtype weights): copied before the few-row rewrites.
    # The RMSNorm fold (norm_gemv.py) is opt-in: on an H100 it measured no faster (bench/RESULTS.md)
    few_rows = [FuseSwiGLU(), FewRowFactoredMatmuls()] + ([FuseNormMatmul()] if fuse_norms else [])  # swiglu_gemv.py
    return ([AddWideFunctions(fuse_norms=fuse_norms), *few_rows, relax.transform.FuseTransposeMatmul()]
            + backend.library_dispatch_passes(target)
            + legalize + dataflow_lower + backend.finalize_passes(target))


def relax_pipeline(target: tvm.target.Target, fuse_norms: bool = False) -> tvm.transform.Pass:
    """The whole Relax → VM pipeline for `target` (pass it to `tvm.compile(relax_pipeline=...)`); `fuse_norms`:
    fold each RMSNorm into the GEMV after it in `decode` on CUDA (schedules/norm_gemv.py)."""
    passes = _passes(target, fuse_norms)

    @tvm.transform.module_pass(opt_level=0, name="KilnPipeline")
    def _pipeline(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def tir_pipeline(target: tvm.target.Target, pdl: bool = True) -> str:
    """The TIR pipeline for `target` (`tvm.compile(tir_pipeline=...)`): CUDA needs ours, on which the
    tensor-core kernels' async copies and register fragments depend; on sm_90+ it also gives every
    kernel programmatic dependent launch (schedules/pdl.py) unless `pdl` is False."""
    if target.kind.name != "cuda":
        return "default"
    return PDL_TIR_PIPELINE if pdl and supports_pdl(target) else TIR_PIPELINE
