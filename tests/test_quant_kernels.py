"""The quantized-weight kernels (schedules/quant_gemv.py, quant_dequantize.py, quant_dispatch.py).

No GPU here: the CUDA and Metal forms are compile-only (every packed type, each epilogue, the
properties the speed depends on: 16-byte code-word loads, no register spills). Numerics on the CPU:
the fused dequantize-matmul PrimFunc these rules take, built for LLVM (which the rules leave alone),
equals float64 numpy of the packed layout (docs/QUANT-LAYOUT.md) dequantized then multiplied.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tvm
import tvm_ffi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.quant_gemm import COMPONENTS, dequant_matmul, dequantize_func  # noqa: E402
from schedules.quant_dequantize import QuantDequantize  # noqa: E402
from schedules.quant_dispatch import QuantKernels  # noqa: E402
from schedules.quant_gemv import QuantGemv  # noqa: E402

CUDA = tvm.target.Target("nvidia/nvidia-h100", host="llvm")
METAL = tvm.target.Target("apple/m2-gpu", host="llvm")
TYPES = list(COMPONENTS)


def random_components(qtype: str, n: int, k: int, rng) -> dict:
    comps = {}
    for name, (dt, per) in COMPONENTS[qtype].items():
        shape = (n, k // per)
        if dt == "uint32":
            comps[name] = rng.integers(0, 2 ** 32, shape, dtype=np.uint32)
        elif dt == "float16":
            comps[name] = (rng.random(shape) * 2e-3 + 5e-4).astype(np.float16)
        elif dt == "uint8":
            comps[name] = rng.integers(0, 256 if name == "sc" and qtype == "q2_k" else 64, shape, dtype=np.uint8)
        else:
            comps[name] = rng.integers(-32, 32, shape, dtype=np.int8)
    return comps


def numpy_dequantize(qtype: str, c: dict, k: int) -> np.ndarray:
    """float64 W[n, k] from the layout table of docs/QUANT-LAYOUT.md."""
    def bits(name, b):
        per = 32 // b
        words = np.repeat(c[name].astype(np.uint64), per, axis=1)
        return ((words >> ((np.arange(k) % per) * b).astype(np.uint64)) & (2 ** b - 1)).astype(np.int64)

    def per_k(name, group):
        return np.repeat(c[name].astype(np.float64), group, axis=1)

    if qtype == "q8_0":
        q = bits("q", 8)
        return per_k("d", 32) * np.where(q >= 128, q - 256, q)
    if qtype == "q4_0":
        return per_k("d", 32) * (bits("q", 4) - 8)
    if qtype in ("q4_k", "q5_k"):
        q = bits("q", 4) + (16 * bits("qh", 1) if qtype == "q5_k" else 0)
        return per_k("d", 256) * per_k("sc", 32) * q - per_k("dmin", 256) * per_k("m", 32)
    if qtype == "q6_k":
        return per_k("d", 256) * per_k("sc", 16) * ((bits("q", 4) | bits("qh", 2) << 4) - 32)
    if qtype == "q2_k":
        sc = np.repeat(c["sc"].astype(np.int64), 16, axis=1)
        return per_k("d", 256) * (sc & 15) * bits("q", 2) - per_k("dmin", 256) * (sc >> 4)
    if qtype == "q3_k":
        return per_k("d", 256) * per_k("sc", 16) * (bits("q", 2) - 4 * (1 - bits("qh", 1)))
    raise ValueError(qtype)


@pytest.mark.parametrize("qtype", TYPES)
def test_fused_matmul_on_llvm_equals_numpy(qtype):
    """The PrimFunc the rules schedule, as the CPU runs it: logits of 3 rows, K = 512 (two super-blocks)."""
    k, n, m = 512, 16, 3
    rng = np.random.default_rng(0)
    comps = random_components(qtype, n, k, rng)
    x = rng.standard_normal((m, k)).astype(np.float32)
    func = dequant_matmul(qtype, k, n, "float32", "logits")
    lib = tvm.tirx.build(tvm.IRModule({"main": func}), target="llvm")
    y = tvm.runtime.empty((m, n), "float32")
    lib["main"](tvm.runtime.tensor(x), *(tvm.runtime.tensor(v) for v in comps.values()), y)
    ref = x.astype(np.float64) @ numpy_dequantize(qtype, comps, k).T
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def _cuda_source(funcs: dict) -> str:
    with CUDA:
        lib = tvm.tirx.build(tvm.IRModule(funcs), target=CUDA)
    return lib.imports[0].inspect_source()


@pytest.mark.parametrize("qtype", TYPES)
def test_gemv_cuda_every_type_and_epilogue(qtype):
    """Each epilogue of the model (cast, residual, fp32 logits) with a dynamic M: three kernels
    (M tiles 1, 4, 8), the code words loaded 16 bytes at a time."""
    funcs = {}
    for epilogue in ("cast", "residual", "logits"):
        f = QuantGemv().kernel(dequant_matmul(qtype, 1024, 64, "bfloat16", epilogue))
        assert f is not None, epilogue
        funcs[epilogue] = f.with_attr("global_symbol", epilogue)
    src = _cuda_source(funcs)
    for epilogue in funcs:
        assert len(re.findall(rf"__global__ void __launch_bounds__\(\d+\) {epilogue}_kernel\w*\(", src)) == 3
    assert "*(uint4*)(w_q_local" in src


def test_rules_decline_plain_matmuls():
    """No packed operand: not ours (the bf16 model's Linears keep their rules)."""
    from tests.test_gemm_schedule import nt_matmul

    assert QuantGemv().kernel(nt_matmul(1024, 64)) is None
    assert QuantDequantize().kernel(nt_matmul(1024, 64)) is None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_gemv_and_dequantize_nvcc_no_spills(tmp_path):
    funcs = {f"gemv_{q}": QuantGemv().kernel(dequant_matmul(q, 4096, 4096, "bfloat16", "residual"))
             for q in ("q4_k", "q6_k", "q8_0")}
    funcs.update({f"deq_{q}": QuantDequantize().kernel(dequantize_func(q, 4096, 4096)) for q in ("q4_k", "q8_0")})
    cu = tmp_path / "k.cu"
    cu.write_text(_cuda_source({k: f.with_attr("global_symbol", k) for k, f in funcs.items()}))
    res = subprocess.run(["nvcc", "-cubin", "-w", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
                          "-o", str(tmp_path / "k.cubin"), str(cu)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "bytes stack frame" in res.stderr
    assert re.findall(r"(\d+) bytes stack frame", res.stderr) and all(
        v == "0" for v in re.findall(r"(\d+) bytes spill stores", res.stderr))


@pytest.mark.parametrize("qtype", ["q4_k", "q6_k", "q8_0", "q3_k"])
def test_metal_forms_build(qtype):
    """Plain TIR (no simdgroups): the fused GEMV and the dequantize kernel lower to Metal."""
    gemv = QuantGemv().kernel(dequant_matmul(qtype, 1024, 64, "float16", "residual"))
    deq = QuantDequantize().kernel(dequantize_func(qtype, 1024, 64, "float16"))
    with METAL:
        lib = tvm.tirx.build(tvm.IRModule({"gemv": gemv.with_attr("global_symbol", "gemv"),
                                           "deq": deq.with_attr("global_symbol", "deq")}), target=METAL)
    src = lib.imports[0].inspect_source()
    assert "kernel void gemv_kernel" in src and "kernel void deq_kernel" in src
    assert "simdgroup" not in src


def test_dispatch_pass_schedules_for_gpus_and_leaves_llvm_alone():
    mod = tvm.IRModule({"gemv": dequant_matmul("q4_k", 1024, 64), "deq": dequantize_func("q4_k", 1024, 64)})
    with tvm.target.Target("llvm"):
        cpu = QuantKernels()(mod)
    assert tvm_ffi.structural_equal(cpu, mod)
    with CUDA:
        gpu = QuantKernels()(mod)
    assert all("tir.is_scheduled" in gpu[name].attrs for name in ("gemv", "deq"))
