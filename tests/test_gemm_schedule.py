"""The tensor-core GEMM rule: where it applies, what CUDA it produces, and that CPU is untouched.

No GPU here, so the CUDA side is compile-only: every model shape must be scheduled, the kernel
must use ldmatrix/mma.sync/cp.async, keep its fragments in registers (ptxas: no stack frame),
and the relax pipeline must route a model's fused Linear kernels to it. Numerics run on CPU
through the same relax pipeline (the rule must leave LLVM alone). Tensorize needs TVM's JSON
serialization, which crashes with some apache-tvm-ffi builds; CUDA scheduling therefore runs in
a subprocess so that such a crash fails these tests with a reason instead of killing pytest.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tvm
from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from schedules.matmul_tensorcore import MatmulTensorCore  # noqa: E402
from schedules.pipeline import gpu_rules, relax_pipeline  # noqa: E402

H100 = tvm.target.Target("nvidia/nvidia-h100")
MODEL_SHAPES = [(1024, 4096), (2048, 1024), (1024, 6144), (3072, 1024), (1024, 151936),
                (4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 128256)]


def nt_matmul(k: int, n: int, dtype: str = "bfloat16", m: int | None = None):
    """y[m, n] = (x[m, k] · w[n, k]^T accumulated in fp32).astype(dtype), as nn.Linear lowers."""
    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731
    rows = tirx.Var("m", "int64") if m is None else i64(m)
    x = te.placeholder((rows, i64(k)), dtype, name="x")
    w = te.placeholder((i64(n), i64(k)), dtype, name="w")
    r = te.reduce_axis((i64(0), i64(k)), "k")
    acc = te.compute((rows, i64(n)), lambda i, j: te.sum(
        x[i, r].astype("float32") * w[j, r].astype("float32"), axis=r), name="NT_matmul")
    y = te.compute((rows, i64(n)), lambda i, j: acc[i, j].astype(dtype), name="compute")
    return te.create_prim_func([x, w, y])


def _run(script: str, timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        crash = "Segfault" in proc.stderr or proc.returncode < 0
        hint = (" (a crash: tensorize serializes its intrinsic with tvm.ir.save_json, which "
                "segfaults with apache-tvm-ffi 0.1.15.post2; 0.1.14.post0 works)" if crash else "")
        pytest.fail(f"subprocess failed{hint}:\n{proc.stderr[-3000:]}")
    return proc.stdout


class Linear(nn.Module):
    """Kiln's Linear: fp32 accumulation, then cast back."""

    def __init__(self, k, n, dtype):
        self.weight = nn.Parameter((n, k), dtype)
        self.dtype = dtype

    def forward(self, x):
        return op.matmul(x, op.permute_dims(self.weight), out_dtype="float32").astype(self.dtype)


class Block(nn.Module):
    """o-proj + residual, gate_up, SiLU·mul, down-proj + residual: the fused epilogues."""

    def __init__(self, h, i, dtype):
        self.o, self.gate_up, self.down = Linear(h, h, dtype), Linear(h, 2 * i, dtype), Linear(
            i, h, dtype)

    def forward(self, x):
        h = x + self.o(x)
        g, u = op.split(self.gate_up(h), 2, axis=-1)
        return h + self.down(op.silu(g) * u)


def export_block(h, i, dtype):
    spec = {"forward": {"x": nn.spec.Tensor(["n", h], dtype),
                        "$": {"param_mode": "plain", "effect_mode": "none"}}}
    return Block(h, i, dtype).export_tvm(spec=spec)


def test_rule_declines_what_it_cannot_do():
    rule = MatmulTensorCore()
    assert rule.apply(nt_matmul(1024, 1024), tvm.target.Target("llvm"), False) is None
    assert rule.apply(nt_matmul(1024, 1024), tvm.target.Target("apple/m2-gpu"), False) is None
    volta = tvm.target.Target({"kind": "cuda", "arch": "sm_70"})
    assert rule.apply(nt_matmul(1024, 1024), volta, False) is None  # no bf16 mma / cp.async
    assert rule.apply(nt_matmul(1024, 1024, m=16), H100, False) is None  # static small M: GEMV
    assert rule.apply(nt_matmul(1024, 1024, "float32"), H100, False) is None


def test_gpu_rules_put_tensor_cores_first_for_cuda_only():
    assert isinstance(gpu_rules(H100)[0], MatmulTensorCore)
    assert not any(isinstance(r, MatmulTensorCore) for r in gpu_rules(tvm.target.Target("metal")))


def test_cpu_pipeline_unchanged_and_correct():
    """The CPU build of a block with every fused epilogue matches a float64 numpy reference."""
    h, i = 64, 96
    mod, params = export_block(h, i, "float32")
    target = tvm.target.Target("llvm")
    ex = tvm.compile(mod, target, relax_pipeline=relax_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, h)).astype("float32")
    ws = {n: (rng.standard_normal(p.shape) / np.sqrt(p.shape[1])).astype("float32")
          for n, p in params}
    got = vm["forward"](tvm.runtime.tensor(x, tvm.cpu()),
                        *[tvm.runtime.tensor(ws[n], tvm.cpu()) for n, _ in params]).numpy()
    x64 = x.astype("float64")
    hh = x64 + x64 @ ws["o.weight"].T
    gu = hh @ ws["gate_up.weight"].T
    g, u = gu[:, :i], gu[:, i:]
    ref = hh + ((g / (1 + np.exp(-g))) * u) @ ws["down.weight"].T
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_cuda_kernels_for_every_model_shape(tmp_path):
    """All ten Linear shapes get a tensor-core kernel; fragments stay in registers."""
    cu = str(tmp_path / "gemm.cu")
    out = _run(f"""
        import re, tvm
        from tests.test_gemm_schedule import nt_matmul, H100
        from schedules.matmul_tensorcore import MatmulTensorCore, TIR_PIPELINE
        CU = {cu!r}
        funcs = {{}}
        for k, n in {MODEL_SHAPES!r}:
            sch = MatmulTensorCore().apply(nt_matmul(k, n), H100, False)
            assert sch is not None, (k, n)
            funcs[f"mm_{{k}}_{{n}}"] = sch.mod["main"].with_attr("global_symbol", f"mm_{{k}}_{{n}}")
        with H100:
            lib = tvm.tirx.build(tvm.IRModule(funcs), target=H100, pipeline=TIR_PIPELINE)
            one = tvm.tirx.build(tvm.IRModule({{"mm_4096_4096": funcs["mm_4096_4096"]}}),
                                 target=H100, pipeline=TIR_PIPELINE)
        src = lib.imports[0].inspect_source()
        open(CU, "w").write(one.imports[0].inspect_source())
        print("kernels", src.count("__global__") // 2 or src.count("__global__"))
        print("mma", src.count("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"))
        print("ldmatrix", src.count("ldmatrix.sync.aligned.m8n8.x4.shared.b16"))
        print("cp_async", src.count("cp.async.cg.shared.global"))
        print("fragments", max(int(s) for s in re.findall(r"_warp_ptr\\[(\\d+)\\]", src)))
    """)
    stats = dict(line.split() for line in out.strip().splitlines())
    assert int(stats["kernels"]) >= len(MODEL_SHAPES)
    assert int(stats["mma"]) > 0 and int(stats["ldmatrix"]) > 0 and int(stats["cp_async"]) > 0
    assert int(stats["fragments"]) <= 128  # per-thread registers, not 32× lane-indexed arrays
    if shutil.which("nvcc"):
        ptxas = subprocess.run(
            ["nvcc", "--cubin", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas=-v",
             "-o", str(tmp_path / "gemm.cubin"), cu],
            capture_output=True, text=True, timeout=600)
        assert ptxas.returncode == 0, ptxas.stderr[-2000:]
        frames = [int(f) for f in re.findall(r"(\d+) bytes stack frame", ptxas.stderr)]
        assert frames and max(frames) == 0, "fragments spilled to local memory"


def test_model_linears_route_to_tensor_cores():
    """Through Kiln's relax pipeline, each fused Linear (cast / residual-add epilogues) of a
    bf16 block becomes an mma kernel; the SiLU·mul kernel is left to the other rules."""
    out = _run("""
        import re, tvm
        from tests.test_gemm_schedule import export_block, H100
        from schedules.pipeline import relax_pipeline
        from schedules.matmul_tensorcore import TIR_PIPELINE
        mod, _ = export_block(512, 1024, "bfloat16")
        ex = tvm.compile(mod, H100, relax_pipeline=relax_pipeline(H100), tir_pipeline=TIR_PIPELINE)
        src = ex.mod.imports[0].imports[0].inspect_source()
        pattern = r'extern "C" __global__ void (?:__launch_bounds__\\(\\d+\\) )?(\\w+)\\('
        chunks = re.split(pattern, src)
        for name, body in zip(chunks[1::2], chunks[2::2]):
            print(name, "mma.sync" in body)
    """)
    tensor_core = {}  # PrimFunc → has a kernel with mma (N ≤ 2048 also gets a GEMV kernel)
    for line in out.strip().splitlines():
        name, mma = line.split()
        func = re.sub(r"_kernel(_\d+)?$", "", name)
        tensor_core[func] = tensor_core.get(func, False) or mma == "True"
    matmuls = {k: v for k, v in tensor_core.items() if "NT_matmul" in k}
    assert len(matmuls) == 3 and all(matmuls.values()), tensor_core
    assert any("add" in k for k in matmuls)  # residual epilogue fused into the GEMM
