"""silu(gate)·up in the gate/up GEMV's epilogue at decode (schedules/swiglu_gemv.py).

The fused PrimFuncs must compute gate/up-then-silu·mul (numpy float64 as the reference: bf16 weights within
bf16 rounding, quantized ones from ggml's own blocks against gguf.quants.dequantize within fp32 rounding);
the Relax pass must apply on CUDA in `decode` only (bf16 and quantized weights), leave `decode_wide` and
prefill unfused, and decline on Metal; the CUDA schedules must compile: the bf16 one to StreamingGEMV's
kernel shape at every bucket, the quantized one (QuantGemv over the stacked components) for every type.
"""

from __future__ import annotations

import os
import re
import sys

import gguf
import ml_dtypes
import numpy as np
import pytest
import tvm
from tvm import relax, te, tirx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import DATA  # noqa: E402

from compile import targets  # noqa: E402
from compile.presets import resolve  # noqa: E402
from compile.quant_plan import plan_quantize, quant_type_of  # noqa: E402
from compile.repack import repack  # noqa: E402
from formats.gguf import GGUFFile  # noqa: E402
from formats.quant_layout import QUANT_TYPES  # noqa: E402
from formats.quant_values import dequantize_matmul_te  # noqa: E402
from model_defs.config import ModelConfig  # noqa: E402
from model_defs.spec import build_model, export  # noqa: E402
from schedules.attention.choice import paged_kv_kernels  # noqa: E402
from schedules.low_batch import LIMITS_AND_BUCKETS  # noqa: E402
from schedules.quant_gemv import QuantGemv  # noqa: E402
from schedules.quant_wide import AddWideFunctions  # noqa: E402
from schedules.swiglu_gemv import (  # noqa: E402
    BLOCK,
    EPILOGUE,
    FuseSwiGLU,
    silu_multiply_te,
    swiglu_gemv,
    swiglu_matmul_te,
)
from tests.test_low_batch import H100, check_streaming_kernels, kernel_source  # noqa: E402

VECTORS = DATA / "ggml-quant-vectors" / "ggml-quant-vectors.gguf"  # 8 × 512 a type: gate rows 0-3, up 4-7
i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731


def _silu_mul(gate_up: np.ndarray) -> np.ndarray:
    gate, up = np.split(gate_up, 2, axis=-1)
    return gate / (1 + np.exp(-gate)) * up


def _run_llvm(func: tirx.PrimFunc, inputs: list, out_shape, out_dtype: str) -> np.ndarray:
    lib = tvm.tirx.build(func, target="llvm")
    dev = tvm.cpu()
    out = tvm.runtime.empty(out_shape, out_dtype, dev)
    lib(*(tvm.runtime.tensor(a, dev) for a in inputs), out)
    return out.numpy().astype(np.float64)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_bf16_fused_equals_gate_up_then_silu_mul(rows):
    """bf16 in, bf16 out: within the output's bf16 rounding of float64's gate/up-then-silu·mul, and no further
    from it than the unfused graph, which also rounds gate, up, silu(gate) and the product to bf16."""
    k, size = 512, 64
    rng = np.random.default_rng(rows)
    bf = ml_dtypes.bfloat16
    x = (rng.standard_normal((rows, k)) * 2).astype(bf)
    w = (rng.standard_normal((2, size, k)) / np.sqrt(k)).astype(bf)
    xp = te.placeholder((i64(rows), i64(k)), "bfloat16", name="x")
    wp = te.placeholder((i64(2), i64(size), i64(k)), "bfloat16", name="w")
    func = te.create_prim_func([xp, wp, swiglu_matmul_te(xp, wp, "bfloat16")])
    got = _run_llvm(func, [x, w], (rows, 1, size), "bfloat16").reshape(rows, size)
    gate_up = x.astype(np.float64) @ w.reshape(2 * size, k).astype(np.float64).T
    want = _silu_mul(gate_up)
    err = np.abs(got - want)
    assert (err <= 2**-8 * np.abs(want) + 1e-5 * np.abs(want).max()).all()  # bf16's half-ulp (+ fp32 sums)
    r = lambda a: a.astype(bf).astype(np.float64)  # noqa: E731
    gate, up = np.split(r(gate_up), 2, axis=-1)
    unfused = r(r(gate / (1 + np.exp(-gate))) * up)
    assert err.max() <= np.abs(unfused - want).max()


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("qtype", ["q4_k", "q8_0", "q6_k"])
def test_quantized_fused_equals_dequantize_then_silu_mul(qtype, rows):
    """ggml's blocks repacked and viewed [2, 4, ...] (gate, up): dequantize_matmul_te on the stacked components
    plus the epilogue equals float64 numpy of gguf's dequantized weight, gate/up then silu·mul, within fp32."""
    f = GGUFFile(VECTORS)
    name = f"{qtype}.q"
    n, k = 8, 512
    weight = gguf.quants.dequantize(f.blocks(name), f.tensors[name][0]).reshape(n, k).astype(np.float64)
    comps = repack(qtype, f.blocks(name), k)
    stacked = [np.ascontiguousarray(c.reshape(2, n // 2, *c.shape[1:])) for c in comps.values()]
    x = np.random.default_rng(rows).standard_normal((rows, k)).astype(np.float32)
    xp = te.placeholder((i64(rows), i64(k)), "float32", name="x")
    views = [te.placeholder(tuple(i64(d) for d in c.shape), str(c.dtype), name=nm) for nm, c in zip(comps, stacked)]
    func = te.create_prim_func([xp, *views, silu_multiply_te(dequantize_matmul_te(qtype, xp, views), "float32")])
    got = _run_llvm(func, [x, *stacked], (rows, 1, n // 2), "float32").reshape(rows, n // 2)
    want = _silu_mul(x.astype(np.float64) @ weight.T)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def _decode_passes(model: str, target: tvm.target.Target, quant: str | None = None) -> tvm.IRModule:
    _, config, _ = resolve(model)
    cfg = ModelConfig.from_dict({**config, "num_hidden_layers": 1}, "test")
    kv = paged_kv_kernels(target, cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim, "bfloat16")
    types = None
    if quant:
        params = [(n, tuple(int(d) for d in p.shape)) for n, p in build_model(cfg, "bfloat16", None).named_parameters()]
        types = plan_quantize(quant_type_of(quant), params, cfg).types
    mod, _ = export(cfg, "bfloat16", target, 256, 1024, kv, types)
    with target:
        return tvm.transform.Sequential([AddWideFunctions(), FuseSwiGLU()])(mod)


def _fused_calls(func: relax.Function) -> int:
    """Calls of the fused PrimFunc (bf16's swiglu_matmul or a quantized type's dequantize_<qtype>_silu_multiply)."""
    calls = []
    relax.analysis.post_order_visit(func, lambda e: calls.append(e) if isinstance(e, relax.Call) and isinstance(
        e.args[0] if e.args else None, relax.GlobalVar) and e.args[0].name_hint.startswith((BLOCK, "dequantize_"))
        and e.args[0].name_hint.endswith((BLOCK, EPILOGUE)) else None)
    return len(calls)


def _silu_ops(func: relax.Function) -> int:
    ops = []
    relax.analysis.post_order_visit(func, lambda e: ops.append(e) if isinstance(e, relax.Call) and isinstance(
        e.op, tvm.ir.Op) and e.op.name == "relax.nn.silu" else None)
    return len(ops)


@pytest.mark.parametrize("quant", [None, "q4_k_m"])
def test_pass_fuses_decode_only_on_cuda(quant):
    """One layer: its gate/up, silu and multiply one call in `decode`; `decode_wide` and prefill unchanged."""
    mod = _decode_passes("qwen3", targets.tvm_target("cuda", targets.DEFAULT_CUDA_ARCH), quant)
    assert _fused_calls(mod["decode"]) == 1 and _silu_ops(mod["decode"]) == 0
    assert _fused_calls(mod["decode_wide"]) == 0 and _silu_ops(mod["decode_wide"]) == 1
    assert _fused_calls(mod["prefill"]) == 0 and _silu_ops(mod["prefill"]) == 1
    metal = _decode_passes("qwen3", tvm.target.Target("apple/m2-gpu"), quant)
    assert _fused_calls(metal["decode"]) == 0 and _silu_ops(metal["decode"]) == 1


def test_bf16_every_bucket_compiles_to_the_streaming_shape(tmp_path):
    """StreamingGEMV's kernel shape (tests/test_low_batch.py): 128 threads, W before x, warp-shuffle sums, no
    spill, at each bucket of Qwen3-0.6B's and Llama-3.1-8B's gate/up."""
    funcs = {}
    for k, size in ((1024, 3072), (4096, 14336)):
        x = te.placeholder((tirx.Var("m", "int64"), i64(k)), "bfloat16", name="x")
        w = te.placeholder((i64(2), i64(size), i64(k)), "bfloat16", name="w")
        func = te.create_prim_func([x, w, swiglu_matmul_te(x, w, "bfloat16")])
        for _, bucket in LIMITS_AND_BUCKETS:
            funcs[f"swiglu_{k}_{bucket}"] = swiglu_gemv(func, bucket).with_attr("global_symbol", f"swiglu_{k}_{bucket}")
    check_streaming_kernels(funcs, tmp_path)


@pytest.mark.parametrize("qtype", list(QUANT_TYPES))
def test_quantized_stacked_compiles_for_cuda(qtype):
    """QuantGemv takes the stacked PrimFunc of every type: three kernels (M tiles 1, 4, 8), each writing the
    product once per output from registers (CUDA codegen refuses a per-thread buffer of dynamic size)."""
    k, size = 1024, 256
    x = te.placeholder((tirx.Var("b", "int64"), i64(1), i64(k)), "bfloat16", name="x")
    shapes = QUANT_TYPES[qtype].shapes(2 * size, k)
    views = [te.placeholder((i64(2), i64(size), i64(shapes[nm][1])), c.dtype, name=nm)
             for nm, c in QUANT_TYPES[qtype].components.items()]
    out = silu_multiply_te(dequantize_matmul_te(qtype, x, views, byte_perm=True), "bfloat16")
    kernel = QuantGemv().kernel(te.create_prim_func([x, *views, out]), H100)
    assert kernel is not None
    src = kernel_source({"sw": kernel.with_attr("global_symbol", "sw")})
    assert len(set(re.findall(r"__global__ void __launch_bounds__\(\d+\) (sw_kernel\w*)\(", src))) == 3
    assert src.count("expf(") == 3  # silu once per output, in each kernel's epilogue
