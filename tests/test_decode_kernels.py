"""Kernels a decoder layer launches per decode step (issue 12), counted statically (bench/decode_kernels.py).

A fusion that silently stops applying (a renamed PrimFunc, a pattern that no longer matches) shows up
here as more kernels a layer, without a GPU. The counts are the real model shapes' (Qwen3-0.6B,
Llama-3.1-8B) on CUDA, with the runtime's kernels for each paged-attention call included.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.decode_kernels import ATTENTION_KERNELS, layer_kernels  # noqa: E402
from compile.presets import resolve  # noqa: E402
from schedules.swiglu_gemv import BLOCK as SWIGLU_BLOCK  # noqa: E402

# the layer: QKV GEMV (+ for Qwen3 one q/k-norm kernel), the attention call's three kernels (RoPE, append,
# the split-KV decode), O + residual, RMSNorm, gate/up GEMV with silu(gate)·up in its epilogue
# (schedules/swiglu_gemv.py), down + residual, the next layer's RMSNorm; with `--fuse_norms` (schedules/norm_gemv.py) the RMSNorm before QKV is folded into
# it: one fewer (the one before gate/up stays: that GEMV carries the SwiGLU instead)
MOST = {"qwen3": 10, "llama3": 9}


@pytest.mark.parametrize("fuse_norms", [False, True])
@pytest.mark.parametrize("model", sorted(MOST))
def test_decode_layer_kernels(model, fuse_norms):
    _, config, _ = resolve(model)
    kernels = layer_kernels(config, "cuda", fuse_norms=fuse_norms)
    assert len(kernels) <= MOST[model] - fuse_norms, kernels
    assert kernels.count(ATTENTION_KERNELS[0]) == 1, kernels  # exactly one layer counted
    assert not any(k.startswith(("split", "fused_split", "fused_concatenate")) for k in kernels), kernels
    assert sum(k.startswith(SWIGLU_BLOCK) for k in kernels) == 1, kernels
    if model == "qwen3":  # q_norm and k_norm: one kernel over the fused QKV, no split / concat around it
        assert sum(k.startswith("qk_norm") for k in kernels) == 1, kernels
    norms = [k for k in kernels if "rms_norm" in k]
    assert len(norms) == 2 and sum(k.startswith("rms_norm_matmul") for k in norms) == fuse_norms, kernels


@pytest.mark.parametrize("fuse_norms", [False, True])
def test_quantized_decode_layer_kernels(fuse_norms):
    """Llama-3.1-8B Q4_K_M (--quant q4_k_m): the same 9 kernels a layer, each quantized Linear one dequant-fused
    GEMV, gate/up's carrying silu·up (schedules/swiglu_gemv.py); with `--fuse_norms` the RMSNorm before QKV rides
    in its GEMV (schedules/norm_gemv.py): 8."""
    _, config, _ = resolve("llama3")
    kernels = layer_kernels(config, "cuda", quant="q4_k_m", fuse_norms=fuse_norms)
    assert len(kernels) <= MOST["llama3"] - fuse_norms, kernels
    assert not any(k.startswith(("split", "fused_split")) for k in kernels), kernels
    gemvs = [k for k in kernels if "dequantize_q" in k and "NT_matmul" in k]
    assert len(gemvs) == 3, kernels  # QKV, O, down
    assert sum(k.startswith("dequantize_q") and k.endswith("_silu_multiply") for k in kernels) == 1, kernels
    assert sum(k.startswith("rms_norm") for k in kernels) == 2 - fuse_norms, kernels
    assert sum(k.startswith("fused_rms_norm_dequantize_q") for k in gemvs) == fuse_norms, kernels
