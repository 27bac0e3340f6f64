"""Kiln attention kernels and KilnPagedKVCache, on a machine without a GPU.

CUDA kernels: compiled to CUDA source (and by nvcc when present) and checked for the properties
they exist for (split-KV grid, cp.async pipeline, 16-byte page loads, wgmma on sm_90a, no register
spills, no serialized wgmma). Metal forms: compiled to Metal source (no PTX, Metal's limits).
Numerics on GPU: bench/attention.py (float32 reference before every timing; the Metal forms run there
compiled for CUDA).
The cache class: on llvm it must be TVM's cache with TVM's CPU kernels (the model's CPU tests rely on
it) and match a float64 numpy attention; on CUDA and Metal its decode and prefill slots hold Kiln's kernels.
"""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode
from tvm.runtime import ShapeTuple

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from model_defs.kv_cache import KilnPagedKVCache  # noqa: E402
from schedules.attention.choice import paged_kv_kernels  # noqa: E402
from schedules.attention.decode import decode_kernel  # noqa: E402
from schedules.attention.metal_prefill import metal_prefill_kernel  # noqa: E402
from schedules.attention.prefill import prefill_kernel  # noqa: E402
from schedules.attention.prefill_hopper import prefill_hopper_kernel  # noqa: E402
from schedules.pdl import pdl_tir_pipeline  # noqa: E402

CUDA = tvm.target.Target("nvidia/nvidia-h100", host="llvm")
METAL = tvm.target.Target("apple/m2-gpu", host="llvm")


def _source(funcs, target):
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    with target:
        lib = tvm.tirx.build(mod, target=target)
    return lib.imports[0].inspect_source()


def _cuda_source(funcs):
    return _source(funcs, CUDA)


@pytest.fixture(scope="module")
def decode_src():
    return _cuda_source({"kiln_decode_paged_kv": decode_kernel(8, 32, 128, "bfloat16")})


def test_decode_kernel_structure(decode_src):
    kernels = re.findall(r'extern "C" __global__ void __launch_bounds__\((\d+)\) (\w+)\(', decode_src)
    names = {n: int(t) for t, n in kernels}
    # one kernel (8 rows x 16 lanes): the splits' merge is done by the last split block to arrive
    assert names == {"kiln_decode_paged_kv_kernel": 128}, names
    body = decode_src.split("kiln_decode_paged_kv_kernel(", 2)[2]
    # arrival: the states stored, a barrier, one acquire-release atomic a block (no __threadfence); the last
    # one merges the splits' states from L2, a chunk of 16 splits in flight (a 4-float vector and an lse each)
    assert "__device__ unsigned int kiln_split_arrivals_ar[1024];" in decode_src
    assert body.count("kiln_split_arrive_ar(") == 1 and "kiln_threadfence" not in body
    assert "atom.acq_rel.gpu.global.add.u32" in decode_src
    assert body.index("__syncthreads();") < body.index("kiln_split_arrive_ar(")
    assert body.count("kiln_ldcg4(") == 16 and body.count("kiln_ldcg(") == 16
    # K and V tiles arrive by 16-byte cp.async, 4-stage pipeline: 3 groups may stay in flight
    # (3 prologue tiles, unrolled + 1 in the loop) x (K, V) x 4 tokens
    assert body.count("kiln_cp_async16(") == 4 * 2 * 4
    assert "kiln_cp_async_wait3();" in body
    # dot products reduced over the 16 lanes of a row by warp shuffles (4 steps x 4 tokens x 4 heads)
    assert body.count("__shfl_xor_sync") == 64
    # the shared-memory reads of K/V are 16-byte vectors
    assert len(re.findall(r"\*\(uint4\*\)\(k_loc_ptr \+ \d+\) = kv_sm_ptr\[", body)) == 4  # kv_sm is uint4-typed


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("source,kernels", [("decode_src", 1), ("decode_variants_src", 3)])
def test_decode_kernel_nvcc_no_spills(source, kernels, request, tmp_path):
    src = tmp_path / "decode.cu"
    src.write_text(request.getfixturevalue(source))
    res = subprocess.run(["nvcc", "-cubin", "-w", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "--resource-usage",
                          "-o", str(tmp_path / "decode.cubin"), str(src)], capture_output=True, text=True, check=True)
    report = res.stdout + res.stderr
    assert report.count("0 bytes spill stores, 0 bytes spill loads") == kernels, report
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", report)]
    assert max(regs) <= 168, regs  # 3 blocks of 128 threads per SM (the 3-stage form fits 3)


@pytest.fixture(scope="module")
def decode_variants_src():
    """The variants (the fenced arrival, page tables before the PDL wait, fewer pages a split with the 32-split
    merge), as the model builds them for sm_90a (PDL pipeline)."""
    funcs = {"sc": decode_kernel(8, 32, 128, "bfloat16", arrive="sc"),
             "pw": decode_kernel(8, 32, 128, "bfloat16", pdl_prewait=True),
             "p2": decode_kernel(8, 32, 128, "bfloat16", min_split_pages=2, merge_chunk=32)}
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    with CUDA:
        lib = tvm.tirx.build(mod, target=CUDA, pipeline=pdl_tir_pipeline())
    return lib.imports[0].inspect_source()


def _kernel_body(src, name):
    return src.split(f" {name}_kernel(", 2)[2].split(") {\n", 1)[1].split('extern "C"')[0]


def test_decode_fenced_arrival(decode_variants_src):
    """sc: every thread's state stored and fenced, a barrier, one relaxed atomic a block between fences."""
    body = _kernel_body(decode_variants_src, "sc")
    assert body.count("kiln_split_arrive(") == 1 and body.count("kiln_threadfence();") == 1
    assert "kiln_split_arrive_ar(" not in body


def test_decode_page_tables_before_the_pdl_wait(decode_variants_src):
    """pw: the trigger first, the page-table reads before the (one) wait, q and the pages after it; the pass
    adds no wait of its own. Every other kernel keeps the pass's wait first."""
    wait, trigger = "tvm_builtin_ptx_griddepcontrol_wait();", "tvm_builtin_ptx_griddepcontrol_launch_dependents();"
    body = _kernel_body(decode_variants_src, "pw")
    statements = [line.strip() for line in body.splitlines() if line.strip() and not line.strip().startswith(("alignas", "__shared__", "extern"))]
    assert statements[0] == trigger and body.count(wait) == 1 and body.count(trigger) == 1
    at = body.index(wait)
    assert "page_indptr_ptr[" in body[:at] and "page_values_ptr[" in body[:at] and "length_info_ptr[" in body[:at]
    assert "Q_ptr[" not in body[:at] and "kiln_cp_async16(" not in body[:at] and "O_part_ptr[" not in body[:at]
    for other in ("sc", "p2"):
        assert [line.strip() for line in _kernel_body(decode_variants_src, other).splitlines() if line.strip()][0] == wait


@pytest.mark.parametrize("arch,pdl,prewait", [("sm_90a", True, True), ("sm_90a", False, False), ("sm_80", True, False)])
def test_the_cache_gets_the_prewait_decode_only_with_pdl(arch, pdl, prewait):
    """What the compiler hands the KV cache: the page tables before the wait where the artifact uses PDL (sm_90+,
    not --no-pdl); elsewhere the plain kernel, whose wait (if any) the PDL pass places."""
    from compile.targets import tvm_target

    decode = paged_kv_kernels(tvm_target("cuda", arch), 8, 32, 128, "bfloat16", pdl)["decode"]
    assert ("griddepcontrol" in decode.script()) is prewait


def test_decode_kernel_other_shapes_build():
    """GQA group 4 with fp16, group 7 (Qwen2-7B), MHA (group 1), head_dim 64."""
    shapes = {"a": (1, 4, 128, "float16"), "b": (4, 28, 128, "bfloat16"), "c": (16, 16, 128, "bfloat16"),
              "d": (8, 32, 64, "float16")}
    src = _cuda_source({n: decode_kernel(*shape) for n, shape in shapes.items()})
    for n in shapes:
        assert f" {n}_kernel(" in src and f" {n}_kernel_1(" not in src


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_metal_forms_build_for_metal_within_its_limits(dtype):
    """Decode and both prefills as Metal source: no PTX, <= 1024 threads, <= 32 KB threadgroup memory."""
    funcs = {"dec": decode_kernel(8, 32, 128, dtype, form="metal"), "dec7": decode_kernel(4, 28, 128, dtype, form="metal")}
    h_kv, h_qo, d = (8, 32, 128) if dtype == "float16" else (8, 32, 64)  # bf16 tiles are fp32 on Metal
    funcs.update({f"pf_{k}": metal_prefill_kernel(k, h_kv, h_qo, d, dtype) for k in ("ragged", "paged")})
    src = _source(funcs, METAL)
    for name in funcs:
        assert f"kernel void {name}_kernel(" in src
    assert "kernel void dec_kernel_1(" in src  # Metal's decode keeps its split-merge kernel
    assert "asm" not in src and "simd_shuffle" in src
    for kernel in src.split("kernel void ")[1:]:
        body = kernel.split("\nkernel void")[0]
        smem = sum(int(n) * (2 if t.startswith("half") else 4) * (int(t[-1]) if t[-1].isdigit() else 1)
                   for t, n in re.findall(r"threadgroup (\w+) \w+\[(\d+)\];", body))
        assert smem <= 32 * 1024, (kernel[:40], smem)


@pytest.fixture(scope="module")
def prefill_src():
    return _cuda_source({f"kiln_prefill_{k}": prefill_kernel(k, 8, 32, 128, "bfloat16") for k in ("ragged", "paged")})


def test_prefill_fa2_kernels_use_tensor_cores(prefill_src):
    for kind in ("ragged", "paged"):
        body = prefill_src.split(f"kiln_prefill_{kind}_kernel(", 2)[2].split("extern \"C\"")[0]
        # per 64-token KV tile and warp (16 rows): S = Q K^T is 8 n-tiles x 8 k-steps, O += P V 16 n-tiles x 4
        assert body.count("kiln_mma_16816_bf16(") == 64 + 64
        assert body.count("kiln_ldsm_x4(") == 8 + 32  # Q: 8 k-steps; K: 8 n-tiles x 4 k-step pairs
        assert body.count("kiln_ldsm_x4_t(") == 32  # V: 4 k-steps x 8 n-tile pairs, transposed
        assert body.count("kiln_ex2(") == 2 * 8 * 2  # softmax exponentials (2 rows x 16 columns) on MUFU
        assert "kiln_cp_async_wait1();" in body and body.count("kiln_syncthreads();") == 2
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in prefill_src


def _ptxas_report(src_text, tmp_path):
    src = tmp_path / "k.cu"
    src.write_text(src_text)
    res = subprocess.run(["nvcc", "-cubin", "-w", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
                          "-o", str(tmp_path / "k.cubin"), str(src)], capture_output=True, text=True, check=True)
    return res.stdout + res.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_prefill_fa2_kernels_nvcc_no_spills(prefill_src, tmp_path):
    report = _ptxas_report(prefill_src, tmp_path)
    assert report.count("0 bytes spill stores, 0 bytes spill loads") == 2, report


@pytest.fixture(scope="module")
def hopper_src():
    return _cuda_source({f"kiln_prefill_{k}": prefill_hopper_kernel(k, 8, 32, 128, "bfloat16") for k in ("ragged", "paged")})


def test_prefill_hopper_kernels_use_wgmma(hopper_src):
    for kind in ("ragged", "paged"):
        # one warpgroup (64 query rows), two blocks per SM
        assert re.search(rf"__launch_bounds__\(128, 2\) kiln_prefill_{kind}_kernel\(", hopper_src)
        body = hopper_src.split(f"kiln_prefill_{kind}_kernel(", 2)[2].split("extern \"C\"")[0]
        # per 64-token KV tile and warpgroup: S = Q K^T is 8 k-steps of m64n64k16 from shared memory;
        # O += P V is 4 k-steps of m64n128k16 with P from registers (in the loop, and for the last tile)
        assert body.count("kiln_wgmma_m64n64k16_ss_bf16_t0(") == 8
        assert body.count("kiln_wgmma_m64n128k16_rs_bf16_t1(") == 2 * 4
        # the softmax of tile t waits for S only (P V of tile t - 1 stays in flight), then for P V
        assert "kiln_wgmma_wait1_f32(" in body and "kiln_wgmma_wait0_f64(" in body
        # cp.async writes reach the tensor cores' proxy before the barrier
        assert body.count("kiln_fence_proxy_async();") == 2
        assert body.count("kiln_ex2(") == 2 * 8 * 2
    assert "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16" in hopper_src
    assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in hopper_src


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_prefill_hopper_kernels_nvcc_no_spills_no_serialization(hopper_src, tmp_path):
    report = _ptxas_report(hopper_src, tmp_path)
    assert report.count("0 bytes spill stores, 0 bytes spill loads") == 2, report
    assert "C7512" not in report and "serialized" not in report, report  # wgmma kept asynchronous
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", report)]
    assert max(regs) <= 255, regs


# ---------------------------------------------------------------- the cache class in a model
NQ, NKV, HD, HID = 4, 2, 32, 32


class _Attn(nn.Module):
    """One attention layer over the paged cache: qkv projection, cache attention, output."""

    def __init__(self, target, dtype, head_dim=HD):
        self.target, self.dtype, self.hd = target, dtype, head_dim
        self.qkv = nn.Linear(HID, (NQ + 2 * NKV) * head_dim, bias=False, dtype=dtype)

    def forward(self, x, kv: PagedKVCache):
        b, s, _ = x.shape
        qkv = nn.op.reshape(self.qkv(x), (b, s, NQ + 2 * NKV, self.hd))
        o = kv.attention_with_fused_qkv(0, qkv, NQ, sm_scale=self.hd ** -0.5)
        return nn.op.reshape(o, (b, s, NQ * self.hd))

    def prefill(self, x, kv: PagedKVCache):
        return self.forward(x, kv)

    def create_paged_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                              support_sliding_window):
        return KilnPagedKVCache(
            attn_kind="mha", max_batch_size=max_batch_size, max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size, page_size=page_size, support_sliding_window=support_sliding_window,
            layer_partition=relax.ShapeExpr([0, 1]), num_hidden_layers=1, num_attention_heads=NQ,
            num_key_value_heads=NKV, qk_head_dim=self.hd, v_head_dim=self.hd, mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0, rope_mode=RopeMode.NONE, rope_scale=1, rope_theta=10000, rope_scaling={},
            rope_ext_factors=relax.prim_value(0), rotary_dim=self.hd, enable_disaggregation=False, dtype=self.dtype,
            target=self.target, kernels=paged_kv_kernels(self.target, NKV, NQ, self.hd, self.dtype))


def _export(target, dtype, head_dim=HD):
    model = _Attn(target, dtype, head_dim)
    mod, params = model.export_tvm(spec={
        "prefill": {"x": nn.spec.Tensor([1, "n", HID], dtype), "kv": nn.spec.Object(object_type=PagedKVCache),
                    "$": {"param_mode": "packed", "effect_mode": "none"}},
        "create_paged_kv_cache": {"max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int,
                                  "page_size": int, "support_sliding_window": int,
                                  "$": {"param_mode": "none", "effect_mode": "none"}}})
    return mod, params


@pytest.mark.parametrize("head_dim", [32, 128])
def test_cache_cuda_uses_kiln_kernels(head_dim):
    """Kiln's decode for any head size; Kiln's prefill kernels where its tiles fit (64, 128)."""
    mod, _ = _export(CUDA, "float16", head_dim)
    names = {gv.name_hint for gv in mod.get_global_vars()}
    create = [c for c in str(mod["create_paged_kv_cache"]).splitlines() if "paged_attention_kv_cache_create" in c][0]
    assert "kiln_decode_paged_kv" in create and "batch_decode_paged_kv" not in names, names
    kiln_prefill = {"kiln_prefill_ragged", "kiln_prefill_paged"}
    if head_dim == 128:
        assert kiln_prefill <= names and all(n in create for n in kiln_prefill)
        assert "batch_prefill_ragged_kv" not in names
        assert all("kiln_wgmma" in mod[n].script() for n in kiln_prefill)  # sm_90a: the wgmma kernels
    else:
        assert not kiln_prefill & names and "batch_prefill_ragged_kv" in names


def test_cache_cuda_before_hopper_uses_mma_sync_prefill():
    """wgmma exists only on sm_90a: other CUDA archs get the FlashAttention-2 (mma.sync) prefill."""
    spec = dict(CUDA.export())
    spec.update(arch="sm_80", tag="")
    spec.pop("keys", None)
    mod, _ = _export(tvm.target.Target(spec, host="llvm"), "float16", 128)
    for n in ("kiln_prefill_ragged", "kiln_prefill_paged"):
        script = mod[n].script()
        assert "kiln_mma_16816" in script and "kiln_wgmma" not in script


@pytest.mark.parametrize("head_dim", [32, 128])
def test_cache_metal_uses_kiln_metal_forms(head_dim):
    """Metal gets the plain-TIR decode and prefill (a whole model compiles with them: test_compile_targets)."""
    mod, _ = _export(tvm.target.Target("apple/m2-gpu"), "float16", head_dim)
    names = {gv.name_hint for gv in mod.get_global_vars()}
    kiln = {"kiln_decode_paged_kv", "kiln_metal_prefill_ragged", "kiln_metal_prefill_paged"}
    assert kiln <= names and not {"batch_decode_paged_kv", "batch_prefill_ragged_kv"} & names, names


def test_cache_metal_bf16_wide_heads_keep_tvm_prefill():
    """bfloat16 tiles are float32 on Metal: at head_dim 128 they exceed 32 KB, so TVM's prefill stays."""
    mod, _ = _export(tvm.target.Target("apple/m2-gpu"), "bfloat16", 128)
    names = {gv.name_hint for gv in mod.get_global_vars()}
    assert "kiln_decode_paged_kv" in names and "kiln_metal_prefill_ragged" not in names
    assert "batch_prefill_ragged_kv" in names


def test_cache_llvm_prefill_and_decode_match_numpy():
    """On llvm the class is TVM's cache with *_cpu kernels: two sequences, prefill then decode."""
    target = tvm.target.Target("llvm")
    mod, params = _export(target, "float32")
    assert "kiln_decode_paged_kv" not in {gv.name_hint for gv in mod.get_global_vars()}
    ex = tvm.compile(mod, target)
    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    rng = np.random.default_rng(0)
    w = rng.standard_normal(((NQ + 2 * NKV) * HD, HID)).astype("float32") * 0.3
    g = lambda n: tvm.get_global_func("vm.builtin." + n)  # noqa: E731
    kv = vm["create_paged_kv_cache"](ShapeTuple([2]), ShapeTuple([128]), ShapeTuple([64]), ShapeTuple([16]), ShapeTuple([0]))
    hist = {0: [], 1: []}

    def step(lens):
        g("kv_state_begin_forward")(kv, ShapeTuple([0, 1]), ShapeTuple(lens))
        x = rng.standard_normal((1, sum(lens), HID)).astype("float32")
        out = vm["prefill"](tvm.runtime.tensor(x, dev), kv, [tvm.runtime.tensor(w, dev)]).numpy()[0]
        g("kv_state_end_forward")(kv)
        qkv = (x[0].astype("float64") @ w.T.astype("float64")).reshape(-1, NQ + 2 * NKV, HD)
        ref, start = [], 0
        for sid, n in zip((0, 1), lens):
            new = qkv[start:start + n]
            hist[sid].append(new)
            allk = np.concatenate(hist[sid])
            k, v = allk[:, NQ:NQ + NKV], allk[:, NQ + NKV:]
            m = len(allk)
            for i in range(n):
                pos = m - n + i
                for h in range(NQ):
                    s = new[i, h] @ k[: pos + 1, h // (NQ // NKV)].T * HD ** -0.5
                    p = np.exp(s - s.max())
                    ref.append(p @ v[: pos + 1, h // (NQ // NKV)] / p.sum())
            start += n
        np.testing.assert_allclose(out.reshape(-1, HD), np.array(ref), rtol=1e-4, atol=1e-4)

    g("kv_state_add_sequence")(kv, 0)
    g("kv_state_add_sequence")(kv, 1)
    step([19, 5])
    for _ in range(3):
        step([1, 1])
