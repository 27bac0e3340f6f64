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

# the layer: QKV GEMV (+ for Qwen3 one q/k-norm kernel), the attention call's three kernels, O + residual,
# RMSNorm, gate/up GEMV, silu(gate)·up, down + residual, the next layer's RMSNorm; with `--fuse_norms`
# (schedules/norm_gemv.py) each RMSNorm is folded into the GEMV after it: two fewer
MOST = {"qwen3": 11, "llama3": 10}


@pytest.mark.parametrize("fuse_norms", [False, True])
@pytest.mark.parametrize("model", sorted(MOST))
def test_decode_layer_kernels(model, fuse_norms):
    _, config, _ = resolve(model)
    kernels = layer_kernels(config, "cuda", fuse_norms=fuse_norms)
    assert len(kernels) <= MOST[model] - 2 * fuse_norms, kernels
    assert kernels.count(ATTENTION_KERNELS[0]) == 1, kernels  # exactly one layer counted
    assert not any(k.startswith(("split", "fused_concatenate")) for k in kernels), kernels
    if model == "qwen3":  # q_norm and k_norm: one kernel over the fused QKV, no split / concat around it
        assert sum(k.startswith("qk_norm") for k in kernels) == 1, kernels
    norms = [k for k in kernels if "rms_norm" in k]
    assert len(norms) == 2 and all(k.startswith("rms_norm_matmul") == fuse_norms for k in norms), kernels


@pytest.mark.parametrize("fuse_norms", [False, True])
def test_quantized_decode_layer_kernels(fuse_norms):
    """Llama-3.1-8B Q4_K_M (--quant q4_k_m): the same 11 kernels a layer, each quantized Linear one dequant-fused
    GEMV; with `--fuse_norms` both RMSNorms ride in the QKV and gate/up GEMVs (schedules/norm_gemv.py): 9."""
    _, config, _ = resolve("llama3")
    kernels = layer_kernels(config, "cuda", quant="q4_k_m", fuse_norms=fuse_norms)
    assert len(kernels) <= MOST["llama3"] - 2 * fuse_norms, kernels
    gemvs = [k for k in kernels if "dequantize_q" in k and "NT_matmul" in k]
    assert len(gemvs) == 4, kernels  # QKV, O, gate/up, down
    assert sum(k.startswith("rms_norm") for k in kernels) == 2 * (not fuse_norms), kernels
    assert sum(k.startswith("fused_rms_norm_dequantize_q") for k in gemvs) == 2 * fuse_norms, kernels
