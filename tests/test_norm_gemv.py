"""RMSNorm folded into the following GEMV at decode (schedules/norm_gemv.py).

The fused PrimFunc must compute norm-then-matmul (numpy float64 as the reference, within bf16 rounding);
the Relax pass must apply on CUDA in `decode` only, leave `decode_wide` (more than 8 rows) and prefill
unfused, and decline elsewhere (Metal, K off the 16-byte lane grid); the CUDA schedule must compile to
the StreamingGEMV shape (128 threads, 16-byte loads, a shuffle reduction, no spill) at every bucket.
"""

from __future__ import annotations

import os
import sys

import ml_dtypes
import numpy as np
import pytest
import tvm
from tvm import relax, te, tirx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from compile import targets  # noqa: E402
from compile.presets import resolve  # noqa: E402
from model_defs.config import ModelConfig  # noqa: E402
from compile.quant_plan import plan_quantize, quant_type_of  # noqa: E402
from model_defs.spec import build_model, export  # noqa: E402
from schedules.quant_fusion import FewRowFactoredMatmuls  # noqa: E402
from schedules.attention.choice import paged_kv_kernels  # noqa: E402
from schedules.norm_gemv import BLOCK, ROW_BUCKETS, FuseNormMatmul, norm_gemv, rms_norm_matmul_te  # noqa: E402
from schedules.quant_wide import AddWideFunctions  # noqa: E402
from tests.test_low_batch import check_streaming_kernels  # noqa: E402

EPS = 1e-6
QUANT_VECTORS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "ggml-quant-vectors",
                             "ggml-quant-vectors.gguf")
QN, QK = 8, 512  # the vectors' weight shape


def fused_func(k: int, n: int, dtype: str = "bfloat16", rows=None) -> tirx.PrimFunc:
    m = tirx.Var("m", "int64") if rows is None else tirx.IntImm("int64", rows)
    x = te.placeholder((m, tirx.IntImm("int64", k)), dtype, name="x")
    g = te.placeholder((tirx.IntImm("int64", k),), dtype, name="gamma")
    w = te.placeholder((tirx.IntImm("int64", n), tirx.IntImm("int64", k)), dtype, name="w")
    return te.create_prim_func([x, g, w, rms_norm_matmul_te(x, g, w, EPS, dtype)])


@pytest.mark.parametrize("rows, k, n", [(1, 256, 64), (3, 1024, 32)])
def test_fused_equals_norm_then_matmul(rows, k, n):
    """bf16 values in, bf16 out: within the output's bf16 rounding of float64's norm-then-matmul, and no
    further from it than the unfused graph (which also rounds the normed x to bf16). The inputs are held
    in fp32 here: LLVM's bf16 legalization miscompiles a tuple reduction over bf16 loads (CUDA reads bf16
    natively; bench/gpu_parity.py checks the bf16 kernels there); every product is fp32 either way."""
    rng = np.random.default_rng(rows)
    bf = ml_dtypes.bfloat16
    x = (rng.standard_normal((rows, k)) * 3).astype(bf).astype(np.float32)
    g = (1 + 0.5 * rng.standard_normal(k)).astype(bf).astype(np.float32)
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(bf).astype(np.float32)
    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731
    xp, gp, wp = (te.placeholder(tuple(i64(d) for d in a.shape), "float32", name=nm)
                  for a, nm in ((x, "x"), (g, "gamma"), (w, "w")))
    lib = tvm.tirx.build(te.create_prim_func([xp, gp, wp, rms_norm_matmul_te(xp, gp, wp, EPS, "bfloat16")]),
                         target="llvm")
    dev = tvm.cpu()
    out = tvm.runtime.empty((rows, n), "bfloat16", dev)
    lib(*(tvm.runtime.tensor(a, dev) for a in (x, g, w)), out)
    x64, g64, w64 = (a.astype(np.float64) for a in (x, g, w))
    normed = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + EPS) * g64
    want = normed @ w64.T
    err = np.abs(out.numpy().astype(np.float64) - want)
    assert (err <= 2**-8 * np.abs(want) + 1e-6 * np.abs(want).max()).all()  # bf16's half-ulp (+ fp32 sums)
    unfused = (normed.astype(bf).astype(np.float64) @ w64.T).astype(bf).astype(np.float64)
    assert err.max() <= np.abs(unfused - want).max()


def _decode_passes(model: str, target: tvm.target.Target, hidden: int | None = None,
                   quant: str | None = None) -> tvm.IRModule:
    """`model`'s one-layer module after the passes up to FuseNormMatmul (`quant`: --quant's types, whose
    matmuls FewRowFactoredMatmuls makes factored first)."""
    _, config, _ = resolve(model)
    config = {**config, "num_hidden_layers": 1, **({"hidden_size": hidden} if hidden else {})}
    cfg = ModelConfig.from_dict(config, "test")
    kv = paged_kv_kernels(target, cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim, "bfloat16")
    types = None
    if quant:
        params = [(n, tuple(int(d) for d in p.shape)) for n, p in build_model(cfg, "bfloat16", None).named_parameters()]
        types = plan_quantize(quant_type_of(quant), params, cfg).types
    mod, _ = export(cfg, "bfloat16", target, 256, 1024, kv, types)
    with target:
        return tvm.transform.Sequential([AddWideFunctions(fuse_norms=True), FewRowFactoredMatmuls(),
                                         FuseNormMatmul()])(mod)


def _fused_calls(func: relax.Function, prefix: str = BLOCK) -> int:
    calls = []
    relax.analysis.post_order_visit(func, lambda e: calls.append(e) if isinstance(e, relax.Call) and isinstance(
        e.args[0] if e.args else None, relax.GlobalVar) and e.args[0].name_hint.startswith(prefix) else None)
    return len(calls)


def _norm_ops(func: relax.Function) -> int:
    ops = []
    relax.analysis.post_order_visit(func, lambda e: ops.append(e) if isinstance(e, relax.Call) and isinstance(
        e.op, tvm.ir.Op) and e.op.name == "relax.nn.rms_norm" else None)
    return len(ops)


QUANT_FUSED = "rms_norm_dequantize_"  # FuseNormMatmul's PrimFunc for a packed weight


@pytest.mark.parametrize("quant, fused", [("q4k", 2), ("q8_0", 2), ("q4_k_m", 4)])
def test_pass_fuses_quantized_decode_on_cuda_and_cpu(quant, fused):
    """A packed weight's factored matmul takes the norm before it: QKV and gate/up (Q4_K_M's one-layer Llama has
    its v in Q6_K: q, k and v apart, each carrying the norm), so decode keeps only the final RMSNorm;
    decode_wide and prefill keep theirs. On the CPU too (the tests run it there); Metal declines."""
    for target in (targets.tvm_target("cuda", targets.DEFAULT_CUDA_ARCH), tvm.target.Target("llvm")):
        mod = _decode_passes("llama3", target, quant=quant)
        assert _fused_calls(mod["decode"], QUANT_FUSED) == fused and _norm_ops(mod["decode"]) == 1, target
        assert _fused_calls(mod["decode_wide"], QUANT_FUSED) == 0 and _norm_ops(mod["decode_wide"]) == 3
        assert _fused_calls(mod["prefill"], QUANT_FUSED) == 0
    metal = _decode_passes("llama3", tvm.target.Target("apple/m2-gpu"), quant=quant)
    assert _fused_calls(metal["decode"], QUANT_FUSED) == 0 and _norm_ops(metal["decode"]) == 3


def test_pass_fuses_decode_only_on_cuda():
    mod = _decode_passes("qwen3", targets.tvm_target("cuda", targets.DEFAULT_CUDA_ARCH))
    assert _fused_calls(mod["decode"]) == 2  # input_layernorm → QKV, post_attention_layernorm → gate/up
    assert _fused_calls(mod["decode_wide"]) == 0 and _fused_calls(mod["prefill"]) == 0
    metal = _decode_passes("qwen3", tvm.target.Target("apple/m2-gpu"))
    assert _fused_calls(metal["decode"]) == 0 and "decode_wide" not in [g.name_hint for g in metal.get_global_vars()]


def test_pass_declines_off_the_lane_grid():
    """K = 1000 is no whole number of 32 lanes × 8 bf16: the norm and the GEMV stay two kernels."""
    mod = _decode_passes("qwen3", targets.tvm_target("cuda", targets.DEFAULT_CUDA_ARCH), hidden=1000)
    assert _fused_calls(mod["decode"]) == 0


def test_every_bucket_compiles_to_the_streaming_shape(tmp_path):
    """StreamingGEMV's kernel shape (tests/test_low_batch.py): 128 threads, W before x, both sums reduced by
    warp shuffles, no spill, at each bucket of Qwen3-0.6B's and Llama-3.1-8B's QKV and gate/up."""
    funcs = {}
    for k, n in ((1024, 4096), (1024, 6144), (4096, 6144), (4096, 28672)):
        for _, bucket in ROW_BUCKETS:
            name = f"norm_gemv_{k}_{n}_{bucket}"
            funcs[name] = norm_gemv(fused_func(k, n), bucket).with_attr("global_symbol", name)
    check_streaming_kernels(funcs, tmp_path)


def _quant_weight(qtype: str):
    """(Kiln's components, gguf's float64 dequantization) of ggml's own blocks of `qtype` (8 x 512)."""
    import gguf

    from compile.repack import repack
    from formats.gguf import GGUFFile

    f = GGUFFile(QUANT_VECTORS)
    name = f"{qtype}.q"
    ref = gguf.quants.dequantize(f.blocks(name), f.tensors[name][0]).reshape(QN, QK)
    return repack(qtype, f.blocks(name), QK), ref.astype(np.float64)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("qtype", ["q4_k", "q6_k", "q8_0", "q4_0"])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_quantized_fused_equals_norm_then_dequantize_matmul(qtype, rows, dtype):
    """dequantize_matmul_te with `norm` (the PrimFunc FuseNormMatmul gives a packed weight) computes
    rms_norm(x, γ) · gguf.quants.dequantize(W)ᵀ: against float64 numpy within fp32 accumulation (the normed x is
    never rounded), with a dynamic row count as in `decode` (x [M, 1, K]). bf16 x and γ too: unlike the bf16
    weights' tuple reduction, LLVM computes this one right over bf16 loads (its tuple sums fp32 values only)."""
    from formats.quant_values import dequantize_matmul_te
    from model_defs.quant import component_shapes

    comps, w64 = _quant_weight(qtype)
    shapes = component_shapes(qtype, QN, QK)
    m = tirx.Var("m", "int64")
    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731
    cp = [te.placeholder(tuple(i64(d) for d in s), dt, c) for c, (s, dt) in shapes.items()]
    xp = te.placeholder((m, i64(1), i64(QK)), dtype, name="x")
    gp = te.placeholder((i64(QK),), dtype, name="gamma")
    y = dequantize_matmul_te(qtype, xp, cp, norm=(gp, EPS))
    lib = tvm.compile(te.create_prim_func([xp, gp, *cp, y]), target="llvm")
    rng = np.random.default_rng(rows)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    x = (rng.standard_normal((rows, 1, QK)) * 3).astype(np_dtype)
    g = (1 + 0.5 * rng.standard_normal(QK)).astype(np_dtype)
    out = tvm.runtime.empty((rows, 1, QN), "float32")
    lib(tvm.runtime.tensor(x), tvm.runtime.tensor(g), *(tvm.runtime.tensor(comps[c]) for c in shapes), out)
    x64 = x.reshape(rows, QK).astype(np.float64)
    normed = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + EPS) * g.astype(np.float64)
    want = normed @ w64.T
    bound = QK * 2.0**-23 * (np.abs(normed) @ np.abs(w64).T)  # fp32 sums and products, rstd to a few ulp
    err = np.abs(out.numpy().reshape(rows, QN).astype(np.float64) - want)
    assert (err <= bound).all(), f"max error {err.max()}, bound {bound.min()}"
