"""A quantized model compiles for CUDA end to end (no GPU needed; nvcc, where present, builds the binaries).

The CPU tests run the quantized PrimFuncs through LLVM only; on CUDA they take Kiln's GPU rules
(QuantGemv with its padded M tiles in decode, QuantDequantize in prefill, dlight for the rest), and one
kernel CUDA codegen cannot emit (a thread-local buffer sized by the run-time row count) fails the whole
compile. The wide functions (`decode_wide`, `logits_wide`: unfused dequantize + the tensor-core GEMM, for
more than 8 sequences) must be in the library too; with `--fuse_norms` decode's GEMVs carrying their RMSNorm
(schedules/norm_gemv.py; gate/up's with silu·up, schedules/swiglu_gemv.py) compile as well. The tiny Llama's
GGUF is the Q4_K_M-like mix of tests/test_quant_models.py: Q4_K, Q6_K for layer 0's v projection (split q/k/v
matmuls), layer 1's down projection and the LM head, a Q3_K embedding. nvcc is left out (it would more than double the test's time): the failures live in TVM's CUDA codegen, and
tests/test_quant_kernels.py compiles the quantized kernels with nvcc.
"""

import re

import pytest
import yaml

from compile import driver
from formats.dtypes import DEFAULT_DTYPE
from test_gguf_source import random_model, write_model_gguf
from test_quant_models import CASES


@pytest.mark.parametrize("fuse_norms", [False, True], ids=["plain", "fuse_norms"])
def test_mixed_gguf_compiles_for_cuda(tmp_path, monkeypatch, fuse_norms):
    monkeypatch.setattr(driver, "enable_cuda_binaries", lambda arch: False)
    built = []
    compile_ = driver.tvm.compile
    monkeypatch.setattr(driver.tvm, "compile", lambda *a, **kw: built.append(compile_(*a, **kw)) or built[-1])
    cfg, tensors = random_model("llama", seed=5, head_dim=64, hidden=256, inter=512)
    gguf_path = write_model_gguf(tmp_path / "llama.gguf", cfg, tensors, qtype=CASES["llama"][1])
    out = driver.compile_artifact(model=str(gguf_path), target="cuda", dtype=DEFAULT_DTYPE["cuda"],
                                  out=str(tmp_path / "artifact"), weights=None, cuda_arch=None, context=256,
                                  page_size=16, prefill_chunk=64, max_batch=4, fuse_norms=fuse_norms)
    manifest = yaml.safe_load((out / "kiln.yaml").read_text())
    assert (out / manifest["library"]).stat().st_size > 0
    packed = manifest["quantization"]["tensors"]
    assert {packed["model.embed_tokens.weight"], packed["lm_head.weight"]} == {"q3_k", "q6_k"}
    assert any(t == "q4_k" for t in packed.values())
    vm_text = built[0].as_text()
    assert all(f"@{name}:" in vm_text for name in ("decode", "decode_wide", "logits", "logits_wide"))
    assert ("rms_norm_dequantize_q" in vm_text) == fuse_norms  # --fuse_norms: the norm-carrying GEMVs are called
    # gate/up's carrying silu·up as well (schedules/swiglu_gemv.py), with the norm under --fuse_norms
    assert [bool(re.search(rf"@{p}dequantize_q\w+_silu_multiply", vm_text)) for p in ("", "rms_norm_")] == \
        [not fuse_norms, fuse_norms]
