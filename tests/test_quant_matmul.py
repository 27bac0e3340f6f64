"""Quantized matmuls compiled for the CPU equal float64 numpy of gguf's dequantized weights.

ggml's own blocks (tests/data/ggml-quant-vectors: 8 x 512 per type) are repacked into Kiln's components;
one module holds a QuantLinear per type. `decode` (few rows) must fuse each dequantize into its matmul,
`prefill` (many rows) must keep it a separate kernel, and both must compute gguf.quants.dequantize(W) @ x.
"""

import ctypes
import re
import shutil
import subprocess

import numpy as np
import pytest
import tvm
from tvm import te
from tvm.relax.frontend import nn

from conftest import DATA

import gguf  # noqa: E402
from formats.gguf import GGUFFile  # noqa: E402
from compile.repack import repack  # noqa: E402
from formats.quant_values import dequantize_matmul_te  # noqa: E402
from model_defs.quant import QuantLinear, component_shapes, dequantize_te  # noqa: E402
from formats.quant_layout import QUANT_TYPES  # noqa: E402
from schedules.pipeline import _passes, relax_pipeline, tir_pipeline  # noqa: E402

VECTORS = DATA / "ggml-quant-vectors" / "ggml-quant-vectors.gguf"
TYPES = [*QUANT_TYPES, "f16"]  # and a GGUF F16 weight kept as stored
N, K = 8, 512
TARGET = tvm.target.Target("llvm")


@pytest.fixture(scope="module")
def weights():
    """{qtype: (components, float64 reference weight)} from ggml's bytes."""
    f = GGUFFile(VECTORS)
    out = {}
    for qtype in TYPES:
        name = f"{qtype}.q"
        ref = gguf.quants.dequantize(f.blocks(name), f.tensors[name][0]).reshape(N, K)
        comps = {"w": f.blocks(name).view(np.float16)} if qtype == "f16" else repack(qtype, f.blocks(name), K)
        out[qtype] = (comps, ref.astype(np.float64))
    return out


class _AllTypes(nn.Module):
    def __init__(self):
        self.linears = nn.ModuleList([QuantLinear(K, N, qtype, "float32") for qtype in TYPES])

    def decode(self, x):
        return tuple(lin(x) for lin in self.linears)

    def prefill(self, x):
        return tuple(lin(x) for lin in self.linears)


@pytest.fixture(scope="module")
def compiled(weights):
    packed = {"param_mode": "packed", "effect_mode": "none"}
    mod, params = _AllTypes().export_tvm(spec={"decode": {"x": nn.spec.Tensor(["b", 1, K], "float32"), "$": packed},
                                              "prefill": {"x": nn.spec.Tensor([1, "n", K], "float32"), "$": packed}})
    with tvm.transform.PassContext(opt_level=3), TARGET:
        lowered = mod
        for p in _passes(TARGET):  # up to the fusion decision, where the Relax functions still call_tir
            lowered = p(lowered)
            if p.info.name == "FuseDequantizeMatmul":
                break
        vm = tvm.relax.VirtualMachine(tvm.compile(mod, target=TARGET, relax_pipeline=relax_pipeline(TARGET),
                                                  tir_pipeline=tir_pipeline(TARGET)), tvm.cpu())
    arrays = []
    for name, _ in params:  # "linears.<i>.weight.<component>"
        _, i, _, comp = name.split(".")
        arrays.append(tvm.runtime.tensor(weights[TYPES[int(i)]][0][comp]))
    return lowered, vm, arrays


def _called(lowered, func: str) -> list[str]:
    """The PrimFuncs a lowered Relax function calls, in order."""
    return re.findall(r"call_tir\((?:cls\.)?(\w+)", lowered[func].script())


def test_fusion_decision(compiled):
    """decode: each packed type's matmul is one factored PrimFunc (dequantize_<qtype>_NT_matmul, its
    per-group dot products `group_dot` inside), the stored F16 weight's dequantize fused into its matmul;
    prefill: a separate dequantize kernel per type."""
    lowered = compiled[0]
    decode, prefill = _called(lowered, "decode"), _called(lowered, "prefill")
    assert all("NT_matmul" in n for n in decode if "dequantize" in n), decode
    factored = [n for n in decode if re.fullmatch(r"(fused_)?dequantize_q\w+_NT_matmul\w*", n)]
    assert len(factored) == len(TYPES) - 1 and all("group_dot" in lowered[n].script() for n in factored), decode
    assert [n for n in decode if n.startswith("fused_dequantize_f16")], decode
    assert len([n for n in prefill if n.startswith("dequantize")]) == len(TYPES)
    assert not any("dequantize" in n and "matmul" in n for n in prefill)


def _check(out, x, weights, types=TYPES):
    for qtype, y in zip(types, out):
        ref_w = weights[qtype][1]
        ref = x.astype(np.float64) @ ref_w.T
        bound = K * 2.0**-23 * (np.abs(x.astype(np.float64)) @ np.abs(ref_w).T) + 1e-30  # fp32 accumulation
        err = np.abs(y.numpy().astype(np.float64).reshape(ref.shape) - ref)
        assert (err <= bound).all(), f"{qtype}: max error {err.max()} over a bound of {bound.min()}"


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_decode_fused(compiled, weights, rows):
    _, vm, params = compiled
    x = np.random.default_rng(rows).standard_normal((rows, 1, K)).astype(np.float32)
    _check(vm["decode"](tvm.runtime.tensor(x), params), x.reshape(rows, K), weights)


@pytest.mark.parametrize("rows", [64, 100])
def test_prefill_separate(compiled, weights, rows):
    _, vm, params = compiled
    x = np.random.default_rng(rows).standard_normal((1, rows, K)).astype(np.float32)
    _check(vm["prefill"](tvm.runtime.tensor(x), params), x.reshape(rows, K), weights)


def test_dequantize_bit_exact(weights):
    """The dequantize PrimFunc's fp32 values are gguf.quants.dequantize's, bit for bit."""
    for qtype in TYPES:
        comps = [te.placeholder(s, dt, c) for c, (s, dt) in component_shapes(qtype, N, K).items()]
        w = dequantize_te(qtype, comps, K, "float32")
        lib = tvm.compile(te.create_prim_func([*comps, w]), target=TARGET)
        out = tvm.runtime.empty((N, K), "float32")
        lib(*[tvm.runtime.tensor(weights[qtype][0][c]) for c in component_shapes(qtype, N, K)], out)
        ref = weights[qtype][1].astype(np.float32)
        np.testing.assert_array_equal(out.numpy().view(np.uint32), ref.view(np.uint32), err_msg=qtype)


_BYTE_PERM_C = """
#include <stdint.h>
uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {  /* CUDA's: byte n of the result is byte
  (s >> 4n) & 7 of the 8 bytes y:x */
  uint64_t v = ((uint64_t)y << 32) | x; uint32_t r = 0;
  for (int n = 0; n < 4; ++n) r |= (uint32_t)((v >> (8 * ((s >> (4 * n)) & 7))) & 0xFF) << (8 * n);
  return r;
}
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler for the __byte_perm stand-in")
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_k", "q6_k"])
def test_cuda_byte_permute_codes(weights, qtype, tmp_path):
    """The CUDA form of the factored matmul (codes by __byte_perm, formats/quant_values.py) computes
    gguf's W @ x: run here on the CPU with a C stand-in of CUDA's __byte_perm."""
    lib = tmp_path / "byte_perm.so"
    (tmp_path / "byte_perm.c").write_text(_BYTE_PERM_C)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(tmp_path / "byte_perm.c")], check=True)
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)  # the JIT-compiled module resolves __byte_perm here
    comps = [te.placeholder(s, dt, c) for c, (s, dt) in component_shapes(qtype, N, K).items()]
    x = te.placeholder((3, K), "float32", "x")
    func = tvm.compile(te.create_prim_func([x, *comps, dequantize_matmul_te(qtype, x, comps, byte_perm=True)]),
                       target=TARGET)
    xs = np.random.default_rng(0).standard_normal((3, K)).astype(np.float32)
    out = tvm.runtime.empty((3, N), "float32")
    func(tvm.runtime.tensor(xs), *[tvm.runtime.tensor(weights[qtype][0][c]) for c in component_shapes(qtype, N, K)], out)
    _check([out], xs, {qtype: weights[qtype]}, [qtype])
