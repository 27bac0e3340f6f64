"""The tensor-core GEMM rules: where they apply, what CUDA they produce, and that CPU is untouched.

No GPU here, so the CUDA side is compile-only: every model shape must be scheduled; the mma.sync
kernel must use ldmatrix/mma.sync/cp.async and the Hopper kernel TMA/wgmma, both keeping their
accumulators in registers (ptxas: no stack frame); the relax pipeline must route a model's fused
Linear kernels to wgmma on sm_90a and to mma.sync on sm_80. Numerics run on CPU: the relax
pipeline (the rules must leave LLVM alone) and the Hopper rule's epilogue extraction (the fused
cast / residual / bias code it generates, run through LLVM). Tensorize needs TVM's JSON
serialization, which crashes with some apache-tvm-ffi builds; CUDA scheduling therefore runs in
a subprocess so that such a crash fails these tests with a reason instead of killing pytest.
"""

from __future__ import annotations

import functools
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
from schedules.matmul_wgmma import MatmulWgmma, analyze, splits  # noqa: E402
from schedules.pipeline import gpu_rules, relax_pipeline  # noqa: E402

H100 = tvm.target.Target("nvidia/nvidia-h100")
A100 = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
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


def test_wgmma_rule_declines_what_it_cannot_do():
    rule = MatmulWgmma()
    assert rule.apply(nt_matmul(1024, 1024), tvm.target.Target("llvm"), False) is None
    assert rule.apply(nt_matmul(1024, 1024), A100, False) is None  # no wgmma before sm_90a
    assert rule.apply(nt_matmul(1024, 1024, m=16), H100, False) is None  # static small M: GEMV
    assert rule.apply(nt_matmul(1024, 1024, "float32"), H100, False) is None
    assert rule.apply(nt_matmul(1024, 1020), H100, False) is None  # TMA row pitch: N, K % 8
    assert rule.apply(nt_matmul(1024, 1024), H100, False) is not None


def test_gpu_rules_put_tensor_cores_first_for_cuda_only():
    assert isinstance(gpu_rules(H100)[0], MatmulWgmma)
    assert isinstance(gpu_rules(H100)[1], MatmulTensorCore)
    metal = gpu_rules(tvm.target.Target("metal"))
    assert not any(isinstance(r, (MatmulTensorCore, MatmulWgmma)) for r in metal)


@functools.cache
def _dispatch(k: int, n: int, rule=None):
    """The rule's PrimFunc for a K→N matmul with a dynamic M, and M's variable."""
    func = nt_matmul(k, n)
    return (rule or MatmulWgmma()).apply(func, H100, False).mod["main"], analyze(func).m


def _kernels_run(k: int, n: int, rows: int, rule=None) -> set[str]:
    """The wgmma helpers (`m64n<rows>`, `+setmaxnreg` for the tilings that re-balance registers,
    `+split_k` where partial sums are added by a second kernel) or "gemv" (StreamingGEMV) that the
    rule's row dispatch of a K→N matmul with a dynamic M runs for `rows` rows: `branch_on_rows` loops of zero trips
    skipped. (0.27 has no stmt_functor in Python: the kernels are told apart in their script.)"""
    func, m = _dispatch(k, n, rule)
    analyzer = tvm.sym.Analyzer()
    analyzer.bind(m, tirx.IntImm("int64", rows))
    branch = lambda s: isinstance(s, tirx.For) and s.loop_var.name in ("small_m", "large_m")  # noqa: E731
    found = set()

    def visit(stmt):
        parts = list(stmt.seq) if isinstance(stmt, tirx.SeqStmt) else [stmt]
        if not any(branch(s) for s in parts):
            text = str(stmt)
            tags = ("+setmaxnreg" if "kiln_setmaxnreg" in text else "") + (
                "+split_k" if "split_k_partials" in text else "")
            found.update({k + tags for k in re.findall(r"kiln_wgmma_(m64n\d+)k16", text)} or {"gemv"})
            return
        for s in parts:
            if branch(s) and int(analyzer.simplify(s.extent)) > 0:
                visit(s.body)

    visit(func.body.block.body)
    return found


def test_wgmma_rule_picks_the_kernel_by_row_count():
    """Dynamic M: the weight-streaming middle kernels (swapped roles, no register re-balancing, K
    split where N has very few tiles) in buckets of 32 / 64 / 128 rows, then the 128-row tiles, then the
    256-column ones. Without them, N = 1024 (8 column tiles) takes StreamingGEMV up to 32 rows."""
    expect = {9: "m64n32", 16: "m64n32", 32: "m64n32", 33: "m64n64", 64: "m64n64", 65: "m64n128+split_k",
              128: "m64n128+split_k", 129: "m64n128+setmaxnreg", 4096: "m64n256+setmaxnreg"}
    for rows, kernel in expect.items():  # Llama's O projection: 64 weight tiles, or 32 and K split
        assert _kernels_run(4096, 4096, rows) == {kernel}, rows
    assert _kernels_run(4096, 28672, 16) == {"m64n32"}  # gate/up: 448 tiles fill the GPU unsplit
    assert _kernels_run(4096, 28672, 128) == {"m64n128"}
    # QKV: 48 tiles of 128 weight rows, no more blocks than the 128×128 tiles that follow
    assert _kernels_run(4096, 6144, 64) == {"m64n64"} and _kernels_run(4096, 6144, 100) == {"m64n128+setmaxnreg"}
    assert _kernels_run(2048, 1024, 16) == {"m64n32+split_k"}  # Qwen's O: 16 tiles
    without = MatmulWgmma(middle=())
    assert _kernels_run(4096, 4096, 16, without) == {"m64n128+setmaxnreg"}
    assert _kernels_run(2048, 1024, 16, without) == {"gemv"}


def test_splits_only_where_tiles_leave_most_sms_idle():
    assert splits(64, 64, 132) == 1  # Llama O, 64 weight rows a tile: 64 blocks beat 128 and a sum
    assert splits(32, 64, 132) == 4  # 128 rows a tile: 32 tiles → 128 blocks
    assert splits(32, 224, 132) == 4  # down: K = 14336
    assert splits(16, 32, 132) == 8 and splits(16, 48, 132) == 8  # Qwen's O and down (N = 1024)
    assert splits(8, 16, 132) == 4  # at least MIN_SPLIT_STEPS k-steps of 64 a part
    assert splits(2374, 16, 132) == 1 and splits(448, 64, 132) == 1  # LM head, gate/up
    assert splits(8, 6, 132) == 1  # K too short to split


def _epilogue_only(func, acc_of):
    """`func` with its matmul replaced by `acc_of(row, col)`: what MatmulWgmma stores, on any target."""
    g = analyze(func)
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True, check_well_formed=False)
    def body():
        for row, col in T.grid(T.Cast("int32", g.m), g.n):
            T.buffer_store(g.out, g.epilogue(row, col, acc_of(row, col)), g.out_index(row, col))

    return func.with_body(body.body).with_attr("global_symbol", "epilogue")


def test_wgmma_epilogue_matches_the_model_on_cpu():
    """The fused Linear PrimFuncs of a real block (cast; cast + residual, on [1, n, K] rows): the
    epilogue the Hopper rule extracts, run through LLVM, equals numpy on the same accumulators."""
    from tvm.relax.backend.cuda import pipeline as cuda_passes

    mod, _ = export_block(64, 96, "float16")
    with H100:
        mod = tvm.transform.Sequential([relax.transform.FuseTransposeMatmul(),
                                        *cuda_passes.library_dispatch_passes(H100),
                                        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                        relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
    matmuls = {gv.name_hint: f for gv, f in mod.functions_items()
               if isinstance(f, tirx.PrimFunc) and "NT_matmul" in gv.name_hint}
    assert len(matmuls) == 3 and sum("add" in n for n in matmuls) == 2
    rng = np.random.default_rng(0)
    for name, func in matmuls.items():
        acc = lambda r, c: tirx.Cast("float32", r) * tirx.FloatImm("float32", 0.25) - tirx.Cast("float32", c)  # noqa: E731
        lib = tvm.tirx.build(_epilogue_only(func, acc), target="llvm")
        args = [np.zeros([int(d) if isinstance(d, tirx.IntImm) else 5 for d in p.shape], str(p.dtype))
                for p in func.params]
        for a in args[2:-1]:
            a[...] = rng.standard_normal(a.shape)
        tensors = [tvm.runtime.tensor(a) for a in args]
        lib(*tensors)
        rows, cols = np.meshgrid(np.arange(5), np.arange(args[-1].shape[-1]), indexing="ij")
        ref = (rows * 0.25 - cols).astype("float16").reshape(args[-1].shape)
        if "add" in name:
            ref = (args[2].astype("float32") + ref.astype("float32")).astype("float16")
        np.testing.assert_array_equal(tensors[-1].numpy(), ref, err_msg=name)


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


def test_wgmma_kernels_for_every_model_shape(tmp_path):
    """All ten Linear shapes get TMA + wgmma kernels (both tilings, the middle's three buckets), which
    ptxas assembles for sm_90a with the accumulators in registers."""
    funcs = {}
    for k, n in MODEL_SHAPES:
        sch = MatmulWgmma().apply(nt_matmul(k, n), H100, False)
        assert sch is not None, (k, n)
        funcs[f"mm_{k}_{n}"] = sch.mod["main"].with_attr("global_symbol", f"mm_{k}_{n}")
    with H100:
        lib = tvm.tirx.build(tvm.IRModule(funcs), target=H100)
    src = lib.imports[0].inspect_source()
    assert src.count("wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16") == 1  # one helper
    assert src.count("kiln_wgmma_m64n256k16_ss_bf16_t0(") > len(MODEL_SHAPES) * 4  # 4 k16 steps a stage
    assert src.count("kiln_wgmma_m64n128k16_ss_bf16_t0(") > 0  # the few-rows tiling
    for rows in (32, 64):  # the middle's row buckets (128 shares the helper above)
        assert src.count(f"kiln_wgmma_m64n{rows}k16_ss_bf16_t0(") >= 4 * len(MODEL_SHAPES)
    assert "split_k_partials" in src
    assert src.count("const __grid_constant__ CUtensorMap") >= 4 * len(MODEL_SHAPES)
    assert "cp.async.bulk.tensor.2d" in src
    if shutil.which("nvcc"):
        cu = tmp_path / "wgmma.cu"
        cu.write_text(src)
        ptxas = subprocess.run(
            ["nvcc", "--cubin", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas=-v",
             "-o", str(tmp_path / "wgmma.cubin"), str(cu)],
            capture_output=True, text=True, timeout=600)
        assert ptxas.returncode == 0, ptxas.stderr[-2000:]
        assert "C7508" not in ptxas.stderr, "setmaxnreg ignored"
        frames = [int(f) for f in re.findall(r"(\d+) bytes stack frame", ptxas.stderr)]
        assert frames and max(frames) == 0, "accumulators spilled to local memory"


@pytest.mark.parametrize("target, instruction", [(H100, "kiln_wgmma_m64n"), (A100, "mma.sync")])
def test_model_linears_route_to_tensor_cores(target, instruction):
    """Through Kiln's relax pipeline, each fused Linear (cast / residual-add epilogues) of a
    bf16 block becomes a tensor-core kernel (wgmma on sm_90a, mma.sync on sm_80); the SiLU·mul
    kernel is left to the other rules."""
    out = _run(f"""
        import re, tvm
        from tests.test_gemm_schedule import export_block, {"H100" if target is H100 else "A100"} as target
        from schedules.pipeline import relax_pipeline
        from schedules.matmul_tensorcore import TIR_PIPELINE
        mod, _ = export_block(512, 1024, "bfloat16")
        with target:
            ex = tvm.compile(mod, target, relax_pipeline=relax_pipeline(target), tir_pipeline=TIR_PIPELINE)
        src = ex.mod.imports[0].imports[0].inspect_source()
        pattern = r'extern "C" __global__ void (?:__launch_bounds__\\(\\d+\\) )?(\\w+)\\('
        chunks = re.split(pattern, src)
        for name, body in zip(chunks[1::2], chunks[2::2]):
            print(name, {instruction!r} in body)
    """)
    tensor_core = {}  # PrimFunc → has a kernel with mma (N ≤ 2048 also gets a GEMV kernel)
    for line in out.strip().splitlines():
        name, mma = line.split()
        func = re.sub(r"_kernel(_\d+)?$", "", name)
        tensor_core[func] = tensor_core.get(func, False) or mma == "True"
    matmuls = {k: v for k, v in tensor_core.items() if "NT_matmul" in k}
    assert len(matmuls) == 3 and all(matmuls.values()), tensor_core
    assert any("add" in k for k in matmuls)  # residual epilogue fused into the GEMM
