"""Kernels a decoder layer launches per decode step (issue 12), counted statically (bench/decode_kernels.py).

A fusion that silently stops applying (a renamed PrimFunc, a pattern that no longer matches, a rule that
declines) shows up here as more kernels a layer, without a GPU. The counts are the real model shapes'
(Qwen3-0.6B, Llama-3.1-8B) on CUDA, with the runtime's kernels for each paged-attention call included.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.decode_kernels import ATTENTION_KERNELS, layer_kernels  # noqa: E402
from compile.presets import resolve  # noqa: E402

# the layer: QKV GEMV (+ for Qwen3 one q/k-norm kernel), the attention call's kernels, O + residual,
# RMSNorm, gate/up GEMV, SwiGLU-prologue down GEMV + residual, the next layer's RMSNorm
MOST = {"qwen3": 11, "llama3": 10}


@pytest.mark.parametrize("model", sorted(MOST))
def test_decode_layer_kernels(model):
    _, config, _ = resolve(model)
    kernels = layer_kernels(config, "cuda")
    assert len(kernels) <= MOST[model], kernels
    assert kernels.count(ATTENTION_KERNELS[0]) == 1
    swiglu = [k for k in kernels if "silu_multiply" in k]
    assert len(swiglu) == 1 and "NT_matmul" in swiglu[0], kernels  # the product is the down GEMV's prologue
    assert not any(k.startswith(("split", "fused_concatenate")) for k in kernels), kernels
    if model == "qwen3":
        assert sum("qk_norm" in k for k in kernels) == 1 and not any(k.startswith("rms_norm1") for k in kernels)


def test_quantized_down_projection_stays_for_quantgemv():
    """A packed down weight keeps its own fused dequantize-matmul (QuantGemv takes it): the SwiGLU
    product stays a kernel of its own there."""
    _, config, _ = resolve("qwen3")
    kernels = layer_kernels(config, "cuda", quant="q4k")
    assert any(k.startswith("fused_dequantize") for k in kernels), kernels
    assert not any("silu_multiply" in k and "NT_matmul" in k for k in kernels), kernels
