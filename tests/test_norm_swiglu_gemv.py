"""The RMSNorm before gate/up folded into the gate/up·SwiGLU GEMV under `--fuse_norms` (schedules/swiglu_gemv.py
composing norm_gemv.py's prologue with its epilogue).

The fused PrimFuncs must compute rmsnorm → gate/up → silu·mul (numpy float64 as the reference: bf16 weights
within the output's bf16 rounding and never further from it than the unfused graph, packed ones from ggml's own
blocks within fp32 accumulation); the Relax pass must apply in `decode` only, with `--fuse_norms` only, on CUDA
(bf16 and packed weights) and the CPU (packed), not Metal; the CUDA kernels must compile: bf16 to StreamingGEMV's
shape at every bucket without a spill, packed ones to QuantGemv's three M tiles for every type.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import tvm
from tvm import relax, te, tirx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from compile import targets  # noqa: E402
from formats.quant_layout import QUANT_TYPES  # noqa: E402
from formats.quant_values import dequantize_matmul_te  # noqa: E402
from schedules.norm_gemv import ROW_BUCKETS, norm_gemv, rms_norm_matmul_te  # noqa: E402
from schedules.quant_gemv import QuantGemv  # noqa: E402
from schedules.swiglu_gemv import BLOCK, silu_multiply_te  # noqa: E402
from tests.test_low_batch import H100, check_streaming_kernels, kernel_source  # noqa: E402
from tests.test_swiglu_gemv import (  # noqa: E402
    _decode_passes,
    _fused_calls,
    _run_llvm,
    _silu_mul,
    _silu_ops,
    stacked_vectors,
)

EPS = 1e-6
i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731


def _normed(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + EPS) * g.astype(np.float64)


def _bf16_func(k: int, size: int, rows, dtype: str = "bfloat16") -> tirx.PrimFunc:
    x = te.placeholder((rows, i64(k)), dtype, name="x")
    g = te.placeholder((i64(k),), dtype, name="gamma")
    w = te.placeholder((i64(2), i64(size), i64(k)), dtype, name="w")
    out = silu_multiply_te(rms_norm_matmul_te(x, g, w, EPS, "float32"), "bfloat16")
    return te.create_prim_func([x, g, w, out])


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_bf16_fused_equals_norm_gate_up_silu_mul(rows):
    """bf16 values in, bf16 out: within the output's bf16 rounding of float64's rmsnorm → gate/up → silu·mul,
    and no further from it than the unfused graph, which rounds the normed x, gate and up, silu(gate) and the
    product to bf16 (here all stay fp32 and the result is rounded once). The inputs are held in fp32, as in
    tests/test_norm_gemv.py: LLVM's bf16 legalization miscompiles a tuple reduction over bf16 loads."""
    k, size = 512, 64
    rng = np.random.default_rng(rows)
    bf = ml_dtypes.bfloat16
    x = (rng.standard_normal((rows, k)) * 3).astype(bf).astype(np.float32)
    g = (1 + 0.5 * rng.standard_normal(k)).astype(bf).astype(np.float32)
    w = (rng.standard_normal((2, size, k)) / np.sqrt(k)).astype(bf).astype(np.float32)
    got = _run_llvm(_bf16_func(k, size, i64(rows), "float32"), [x, g, w], (rows, 1, size), "bfloat16")
    w64 = w.reshape(2 * size, k).astype(np.float64)
    want = _silu_mul(_normed(x, g) @ w64.T)
    err = np.abs(got.reshape(rows, size) - want)
    assert (err <= 2**-8 * np.abs(want) + 1e-5 * np.abs(want).max()).all()  # bf16's half-ulp (+ fp32 sums)
    r = lambda a: a.astype(bf).astype(np.float64)  # noqa: E731
    gate, up = np.split(r(r(_normed(x, g)) @ w64.T), 2, axis=-1)
    unfused = r(r(gate / (1 + np.exp(-gate))) * up)
    assert err.max() <= np.abs(unfused - want).max()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("qtype", ["q4_k", "q8_0", "q6_k"])
def test_quantized_fused_equals_norm_dequantize_silu_mul(qtype, rows, dtype):
    """ggml's blocks repacked and viewed [2, 4, ...] (gate, up), the PrimFunc FuseSwiGLU builds with the norm
    (dequantize_matmul_te with `norm`, then silu·mul), a dynamic row count as in `decode` (x [M, 1, K]): against
    float64 numpy of rmsnorm → gguf.quants.dequantize'd gate/up → silu·mul, within fp32 accumulation carried
    through silu·mul (|∂/∂gate| ≤ 1.1·|up|, |∂/∂up| = |silu(gate)|) plus the product's fp32 rounding."""
    weight, stacked = stacked_vectors(qtype)
    n, k = weight.shape
    xp = te.placeholder((tirx.Var("m", "int64"), i64(1), i64(k)), dtype, name="x")
    gp = te.placeholder((i64(k),), dtype, name="gamma")
    views = [te.placeholder(tuple(i64(d) for d in c.shape), str(c.dtype), name=nm) for nm, c in stacked.items()]
    out = silu_multiply_te(dequantize_matmul_te(qtype, xp, views, norm=(gp, EPS)), "float32")
    rng = np.random.default_rng(rows)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    x = (rng.standard_normal((rows, 1, k)) * 3).astype(np_dtype)
    g = (1 + 0.5 * rng.standard_normal(k)).astype(np_dtype)
    got = _run_llvm(te.create_prim_func([xp, gp, *views, out]), [x, g, *stacked.values()], (rows, 1, 1, n // 2),
                    "float32")
    normed = _normed(x.reshape(rows, k), g)
    gate, up = np.split(normed @ weight.T, 2, axis=-1)
    sum_gate, sum_up = np.split(k * 2.0**-23 * (np.abs(normed) @ np.abs(weight).T), 2, axis=-1)
    want = _silu_mul(normed @ weight.T)
    bound = 1.1 * np.abs(up) * sum_gate + np.abs(gate / (1 + np.exp(-gate))) * sum_up + 2**-21 * np.abs(want)
    err = np.abs(got.reshape(rows, n // 2) - want)
    assert (err <= bound).all(), f"max error {err.max()}, bound {bound.min()}"


def _norm_ops(func: relax.Function) -> int:
    ops = []
    relax.analysis.post_order_visit(func, lambda e: ops.append(e) if isinstance(e, relax.Call) and isinstance(
        e.op, tvm.ir.Op) and e.op.name == "relax.nn.rms_norm" else None)
    return len(ops)


def _norm_carrying_calls(func: relax.Function) -> int:
    calls = []
    relax.analysis.post_order_visit(func, lambda e: calls.append(e) if isinstance(e, relax.Call) and isinstance(
        e.args[0] if e.args else None, relax.GlobalVar) and e.args[0].name_hint.startswith("rms_norm_")
        and e.args[0].name_hint.endswith((BLOCK, "silu_multiply")) else None)
    return len(calls)


@pytest.mark.parametrize("quant", [None, "q4_k_m"])
def test_pass_folds_the_norm_into_decode_swiglu(quant):
    """One Qwen3 layer with --fuse_norms: decode's post-attention RMSNorm, gate/up, silu and multiply are one call
    (its input_layernorm and the final norm are left to FuseNormMatmul, which runs after), on CUDA and for packed
    weights on the CPU (bf16, and fp32, whose matmul has no cast after it); `decode_wide` and prefill keep all three
    norms; without --fuse_norms the norm stays apart; Metal declines."""
    cuda = targets.tvm_target("cuda", targets.DEFAULT_CUDA_ARCH)
    on = [(cuda, "bfloat16")] + ([(tvm.target.Target("llvm"), d) for d in ("bfloat16", "float32")] if quant else [])
    for target, dtype in on:
        mod = _decode_passes("qwen3", target, quant, fuse_norms=True, dtype=dtype)
        assert _norm_carrying_calls(mod["decode"]) == 1 and _fused_calls(mod["decode"]) == 1, target
        assert _norm_ops(mod["decode"]) == 2 and _silu_ops(mod["decode"]) == 0, target
        for name in ("decode_wide", "prefill"):
            assert _norm_ops(mod[name]) == 3 and _fused_calls(mod[name]) == 0 and _silu_ops(mod[name]) == 1
    plain = _decode_passes("qwen3", cuda, quant)
    assert _norm_carrying_calls(plain["decode"]) == 0 and _fused_calls(plain["decode"]) == 1
    assert _norm_ops(plain["decode"]) == 3
    for target in (tvm.target.Target("apple/m2-gpu"), *([] if quant else [tvm.target.Target("llvm")])):
        mod = _decode_passes("qwen3", target, quant, fuse_norms=True)
        assert _fused_calls(mod["decode"]) == 0 and _norm_ops(mod["decode"]) == 3, target


def test_bf16_every_bucket_compiles_to_the_streaming_shape(tmp_path):
    """StreamingGEMV's kernel shape (tests/test_low_batch.py: 128 threads, W before x, warp-shuffle sums, no spill)
    at each of norm_gemv's buckets (1, 2, 4, 8 rows) of Qwen3-0.6B's and Llama-3.1-8B's gate/up, silu once an
    output (one expf a kernel, after the reduction)."""
    funcs = {}
    for k, size in ((1024, 3072), (4096, 14336)):
        func = _bf16_func(k, size, tirx.Var("m", "int64"))
        for _, bucket in ROW_BUCKETS:
            name = f"norm_swiglu_{k}_{bucket}"
            funcs[name] = norm_gemv(func, bucket).with_attr("global_symbol", name)
    check_streaming_kernels(funcs, tmp_path)
    assert kernel_source(funcs).count("expf(") == len(funcs)


def _quant_func(qtype: str, k: int, size: int) -> tirx.PrimFunc:
    """The norm-carrying gate/up·SwiGLU PrimFunc FuseSwiGLU gives a packed [2·size, k] weight on CUDA."""
    x = te.placeholder((tirx.Var("b", "int64"), i64(1), i64(k)), "bfloat16", name="x")
    g = te.placeholder((i64(k),), "bfloat16", name="gamma")
    shapes = QUANT_TYPES[qtype].shapes(2 * size, k)
    views = [te.placeholder((i64(2), i64(size), i64(shapes[nm][1])), c.dtype, name=nm)
             for nm, c in QUANT_TYPES[qtype].components.items()]
    out = silu_multiply_te(dequantize_matmul_te(qtype, x, views, byte_perm=True, norm=(g, EPS)), "bfloat16")
    return te.create_prim_func([x, g, *views, out])


@pytest.mark.parametrize("qtype", list(QUANT_TYPES))
def test_quantized_compiles_for_cuda(qtype):
    """QuantGemv takes the norm-carrying stacked PrimFunc of every type: three kernels (M tiles 1, 4, 8), each
    computing silu·up once per output from registers."""
    kernel = QuantGemv().kernel(_quant_func(qtype, 1024, 256), H100)
    assert kernel is not None
    src = kernel_source({"nsw": kernel.with_attr("global_symbol", "nsw")})
    assert len(set(re.findall(r"__global__ void __launch_bounds__\(\d+\) (nsw_kernel\w*)\(", src))) == 3
    assert src.count("expf(") == 3


@pytest.mark.parametrize("qtype", ["q4_k", "q6_k", "q8_0"])
def test_batch_one_kernel_normalizes_once_a_block(qtype):
    """At Llama-3.1-8B's gate/up, batch 1's kernel (the chain's first; 4 row threads a block walk the same K) makes
    γ·x, Σγx and Σx² a group into shared memory before its last barrier, and reads no x or γ from global memory
    after it: the K loop's per-thread work is the plain GEMV's, not the norm's again (bench/RESULTS.md, "Why
    `--fuse_norms` slows the quantized decode"). The 4- and 8-row kernels keep x and γ in registers."""
    src = kernel_source({"nsw": QuantGemv().kernel(_quant_func(qtype, 4096, 14336), H100).with_attr("global_symbol",
                                                                                                  "nsw")})
    bodies = dict(re.findall(r"void __launch_bounds__\(\d+\) (nsw_kernel\w*)\([^)]*\) \{\n(.*?)\n\}\n", src, re.S))
    first = bodies["nsw_kernel"]
    prologue, loop = first.rsplit("__syncthreads();", 1)  # one warp a row: the lanes reduce by shuffles
    assert "norm_scaled_shared" in prologue and re.search(r"\*\(float4\*\)\(norm_scaled_shared_ptr", loop)
    assert re.search(r"\bx_ptr\b", prologue) and re.search(r"\bgamma_ptr\b", prologue)
    assert not re.search(r"\bx_ptr\b|\bgamma_ptr\b", loop)
    assert all("shared" not in bodies[k].replace("red_buf", "") for k in ("nsw_kernel_1", "nsw_kernel_2"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_quantized_nvcc_no_spills_at_model_shapes(tmp_path):
    """Q4_K, Q6_K and Q8_0 at Llama-3.1-8B's and Qwen3-0.6B's gate/up (4096 → 2 × 14336, 1024 → 2 × 3072): every
    M-tile kernel builds with nvcc for sm_90a without a spill (registers a thread: bench/RESULTS.md)."""
    funcs = {}
    for k, size in ((4096, 14336), (1024, 3072)):
        for qtype in ("q4_k", "q6_k", "q8_0"):
            name = f"nsw_{qtype}_{k}"
            funcs[name] = QuantGemv().kernel(_quant_func(qtype, k, size), H100).with_attr("global_symbol", name)
    cu = tmp_path / "k.cu"
    cu.write_text(kernel_source(funcs))
    res = subprocess.run(["nvcc", "-cubin", "-w", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
                          "-o", str(tmp_path / "k.cubin"), str(cu)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores", res.stderr)
    assert len(frames) == 3 * len(funcs) and all(f == ("0", "0") for f in frames), frames
