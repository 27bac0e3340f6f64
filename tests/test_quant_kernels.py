"""The quantized-weight kernels (schedules/quant_gemv.py, quant_dequantize.py, quant_dispatch.py).

No GPU here: the CUDA and Metal forms are compile-only (every packed type, each epilogue, the
properties the speed depends on: 16-byte code-word loads, no register spills), and the relax
pipeline must hand a quantized model's fused decode matmuls and prefill dequantize kernels to these
rules on GPUs and leave the CPU alone (tests/test_quant_matmul.py checks the CPU numerics against
gguf). The GPU numerics are checked by bench/quant_gemm.py on the H100 (bench/RESULTS.md).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import tvm
import tvm_ffi
from tvm.relax.frontend import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.quant_gemm import dequant_matmul, dequantize_func  # noqa: E402
from formats.quant_layout import QUANT_TYPES  # noqa: E402
from model_defs.quant import QuantLinear  # noqa: E402
from schedules.pipeline import _passes  # noqa: E402
from schedules.quant_dequantize import QuantDequantize  # noqa: E402
from schedules.quant_dispatch import QuantKernels  # noqa: E402
from schedules.quant_gemv import QuantGemv  # noqa: E402

CUDA = tvm.target.Target("nvidia/nvidia-h100", host="llvm")
METAL = tvm.target.Target("apple/m2-gpu", host="llvm")
TYPES = list(QUANT_TYPES)


def _cuda_source(funcs: dict) -> str:
    with CUDA:
        lib = tvm.tirx.build(tvm.IRModule(funcs), target=CUDA)
    return lib.imports[0].inspect_source()


@pytest.mark.parametrize("qtype", TYPES)
def test_gemv_cuda_every_type_and_epilogue(qtype):
    """Each epilogue of the model (cast, residual, the decode model's cast-then-add, fp32 logits) with
    a dynamic M: three kernels (M tiles 1, 4, 8), a chunk's code words loaded at once (16 bytes; 8 for
    the 2-bit types). Every per-thread buffer must have a static size, or CUDA codegen refuses it."""
    funcs = {}
    for epilogue in ("cast", "residual", "cast_residual", "logits"):
        f = QuantGemv().kernel(dequant_matmul(qtype, 1024, 64, "bfloat16", epilogue, byte_perm=True))
        assert f is not None, epilogue
        funcs[epilogue] = f.with_attr("global_symbol", epilogue)
    src = _cuda_source(funcs)
    for epilogue in funcs:
        assert len(set(re.findall(rf"__global__ void __launch_bounds__\(\d+\) ({epilogue}_kernel\w*)\(", src))) == 3
    assert ("*(uint2*)(w_q_local" if qtype in ("q2_k", "q3_k") else "*(uint4*)(w_q_local") in src


def _launches(func) -> list[tuple[int, int, int]]:
    """(lanes, row threads, rows a block) of each kernel of a scheduled chain, in the order of its M tiles."""
    binds = re.findall(r'T\.thread_binding\((?:T\.int64\()?(\w+)\)?, thread="(blockIdx\.x|threadIdx\.[xy])"\)', func.script())
    kernels = []
    for extent, tag in binds:
        if tag == "blockIdx.x":
            kernels.append({})
        kernels[-1].setdefault(tag, int(extent))
    return [(k["threadIdx.x"], k["threadIdx.y"], k["blockIdx.x"]) for k in kernels]


@pytest.mark.parametrize("qtype", ["q4_k", "q6_k", "q8_0"])
def test_gemv_tiling_per_shape(qtype):
    """The rule of schedules/quant_gemv.py's `tiling`, as its docstring says: at M tile 1, 64 lanes × 1 row
    thread × 2 rows, unroll 2 (Q8_0: 2 row threads, no unroll), below MANY_ROWS rows (Llama-3.1-8B's QKV, O,
    down); from MANY_ROWS on 32 lanes
    × 4 row threads, Q4_K 4 rows a thread, the others 2 rows and unroll 4 (gate/up, LM head); M tiles 4 and
    8: 32 × 4 × 2. Lanes shrink to divide K's 32-element chunks (Qwen3-0.6B's K = 1024 has 32), and the
    kernels QuantGemv builds launch those threads."""
    from schedules.quant_gemv import MANY_ROWS, tiling

    for k, n in [(4096, 6144), (4096, 4096), (14336, 4096), (4096, 28672), (4096, 128256), (1024, 151936)]:
        few = n < MANY_ROWS
        want = ((64, 2, 2, 1) if qtype == "q8_0" else (64, 1, 2, 2)) if few else \
            (32, 4, 4, 1) if qtype == "q4_k" else (32, 4, 2, 4)
        got = tiling(n, qtype, 1)
        assert (got.lanes, got.row_threads, got.rows_per_thread, got.unroll) == want, (k, n)
        for tile in (4, 8):
            got = tiling(n, qtype, tile)
            assert (got.lanes, got.row_threads, got.rows_per_thread, got.unroll) == (32, 4, 2, 1), (k, n, tile)
        lanes = min(want[0], k // 32)
        kernels = _launches(QuantGemv().kernel(dequant_matmul(qtype, k, n, "bfloat16", "cast", byte_perm=True)))
        assert kernels == [(lanes, want[1], n // (want[1] * want[2])), (32, 4, n // 8), (32, 4, n // 8)], (k, n)
    assert tiling(12, qtype, 1).rows_per_thread == 2 and tiling(12, qtype, 8).rows_per_thread == 1


def test_rules_decline_plain_matmuls():
    """No packed operand: not ours (the bf16 model's Linears keep their rules)."""
    from tests.test_gemm_schedule import nt_matmul

    assert QuantGemv().kernel(nt_matmul(1024, 64)) is None
    assert QuantDequantize().kernel(nt_matmul(1024, 64)) is None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_gemv_and_dequantize_nvcc_no_spills(tmp_path):
    funcs = {f"gemv_{q}": QuantGemv().kernel(dequant_matmul(q, 4096, 4096, "bfloat16", "residual", byte_perm=True))
             for q in ("q4_k", "q6_k", "q8_0")}
    funcs.update({f"deq_{q}": QuantDequantize().kernel(dequantize_func(q, 4096, 4096)) for q in ("q4_k", "q8_0")})
    cu = tmp_path / "k.cu"
    cu.write_text(_cuda_source({k: f.with_attr("global_symbol", k) for k, f in funcs.items()}))
    res = subprocess.run(["nvcc", "-cubin", "-w", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
                          "-o", str(tmp_path / "k.cubin"), str(cu)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores", res.stderr)
    assert len(frames) == 3 * 3 + 2 and all(f == ("0", "0") for f in frames), frames


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("k, n", [(4096, 6144), (4096, 28672)], ids=["qkv", "gate_up"])
def test_norm_carrying_gemv_nvcc_no_spills(k, n, tmp_path):
    """The GEMV with the RMSNorm before it folded in (`--fuse_norms`, schedules/norm_gemv.py) at Llama-3.1-8B's
    QKV and gate/up: its three M-tile kernels per type build with nvcc without spills, γ read with 16-byte loads
    beside x, and the M = 1 kernel within 24 registers a thread of the plain GEMV's (ptxas -v; the M-tile 4 and 8
    kernels take ~1.5x the plain ones' registers, bench/RESULTS.md)."""
    funcs = {}
    for q in ("q4_k", "q6_k", "q8_0"):
        for norm in (False, True):
            name = f"gemv_{q}{'_norm' if norm else ''}"
            f = QuantGemv().kernel(dequant_matmul(q, k, n, "bfloat16", "cast", byte_perm=True, norm=norm))
            funcs[name] = f.with_attr("global_symbol", name)
    src = _cuda_source(funcs)
    assert "*(uint4*)(gamma_local" in src
    cu = tmp_path / "k.cu"
    cu.write_text(src)
    res = subprocess.run(["nvcc", "-cubin", "-w", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
                          "-o", str(tmp_path / "k.cubin"), str(cu)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    used = {name: int(regs) for name, regs in
            re.findall(r"Compiling entry function '(\w+)'.*?Used (\d+) registers", res.stderr, re.S)}
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores", res.stderr)
    assert len(used) == len(frames) == 6 * 3 and all(f == ("0", "0") for f in frames), frames
    for q in ("q4_k", "q6_k", "q8_0"):  # M = 1's kernel (the first of the chain): batch 1's
        assert used[f"gemv_{q}_norm_kernel"] <= used[f"gemv_{q}_kernel"] + 24, used


@pytest.mark.parametrize("qtype", ["q4_k", "q6_k", "q8_0", "q3_k"])
def test_metal_forms_build(qtype):
    """Plain TIR (no simdgroups): the fused GEMV (K = 4096: 64 lanes at M = 1, a row's K over two
    simdgroups) and the dequantize kernel lower to Metal."""
    gemv = QuantGemv().kernel(dequant_matmul(qtype, 4096, 64, "float16", "residual"), METAL)
    deq = QuantDequantize().kernel(dequantize_func(qtype, 1024, 64, "float16"), METAL)
    with METAL:
        lib = tvm.tirx.build(tvm.IRModule({"gemv": gemv.with_attr("global_symbol", "gemv"),
                                           "deq": deq.with_attr("global_symbol", "deq")}), target=METAL)
    src = lib.imports[0].inspect_source()
    assert "kernel void gemv_kernel" in src and "kernel void deq_kernel" in src
    assert "simdgroup" not in src


def test_dispatch_pass_leaves_llvm_alone():
    mod = tvm.IRModule({"gemv": dequant_matmul("q4_k", 1024, 64), "deq": dequantize_func("q4_k", 1024, 64)})
    with tvm.target.Target("llvm"):
        assert tvm_ffi.structural_equal(QuantKernels()(mod), mod)


class _Model(nn.Module):
    """One QuantLinear per type plus a residual add, called in decode (b rows) and prefill (n rows)."""

    def __init__(self, k):
        self.linears = nn.ModuleList([QuantLinear(k, k, qtype, "float16") for qtype in TYPES])

    def decode(self, x):
        return tuple(x + lin(x) for lin in self.linears)

    def prefill(self, x):
        return tuple(x + lin(x) for lin in self.linears)


@pytest.mark.parametrize("target", [CUDA, METAL], ids=["cuda", "metal"])
def test_pipeline_routes_quantized_linears_to_these_rules(target):
    """In the model's own pipeline each fused decode matmul (fused_dequantize_*_NT_matmul*) and each
    prefill dequantize PrimFunc (dequantize_* with its cast to fp16) is scheduled by QuantKernels, for
    all 7 types."""
    k = 512
    packed = {"param_mode": "packed", "effect_mode": "none"}
    mod, _ = _Model(k).export_tvm(spec={"decode": {"x": nn.spec.Tensor(["b", 1, k], "float16"), "$": packed},
                                       "prefill": {"x": nn.spec.Tensor([1, "n", k], "float16"), "$": packed}})
    with tvm.transform.PassContext(opt_level=3), target:
        for p in _passes(target):
            mod = p(mod)
            if p.info.name == "KilnQuantKernels":
                break
    names = [gv.name_hint for gv, f in mod.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint.startswith(("fused_dequantize", "dequantize"))]
    assert len([n for n in names if "NT_matmul" in n]) == len(TYPES), names
    assert len([n for n in names if "matmul" not in n]) == len(TYPES), names
    assert all(mod[n].attrs and "tirx.is_scheduled" in mod[n].attrs for n in names), names


def test_decode_matmuls_read_fp32_weights_prefill_the_model_dtype():
    """FewRowWeightsInFp32: a fused decode matmul multiplies by the fp32 dequantized weight (no
    rounding to the model dtype in between); prefill's dequantize kernel still writes fp16 for the GEMM."""
    packed = {"param_mode": "packed", "effect_mode": "none"}
    mod, _ = _Model(512).export_tvm(spec={"decode": {"x": nn.spec.Tensor(["b", 1, 512], "float16"), "$": packed},
                                         "prefill": {"x": nn.spec.Tensor([1, "n", 512], "float16"), "$": packed}})
    with tvm.transform.PassContext(opt_level=3), CUDA:
        for p in _passes(CUDA):
            mod = p(mod)
            if p.info.name == "FuseDequantizeMatmul":
                break
    funcs = {gv.name_hint: f for gv, f in mod.functions_items() if "dequantize" in gv.name_hint}
    fused = [f for name, f in funcs.items() if "NT_matmul" in name]
    separate = [f for name, f in funcs.items() if "matmul" not in name]
    assert len(fused) == len(separate) == len(TYPES), sorted(funcs)
    for f in fused:  # the dequantized weight, an intermediate of the default dtype (fp32)
        assert re.search(r"dequantize_\w+ = T.sblock_alloc_buffer\(\(T.int64\(512\), T.int64\(512\)\)\)", f.script())
    for f in separate:
        assert f.params[-1].dtype == "float16"
