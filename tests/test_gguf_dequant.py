"""GGUF dequantization is bit-exact with gguf-py and with ggml's own dequantized values."""

import numpy as np
import pytest

from conftest import DATA

import gguf  # noqa: E402
from formats.gguf import GGUFFile  # noqa: E402

VECTORS = DATA / "ggml-quant-vectors" / "ggml-quant-vectors.gguf"
# The list, then the other types in the file (i-quants, ternary, MXFP4) that gguf also dequantizes.
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
         "IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S", "TQ1_0", "TQ2_0", "MXFP4"]

@pytest.fixture(scope="module")
def files():
    return GGUFFile(VECTORS), {t.name: t for t in gguf.GGUFReader(VECTORS).tensors}

def bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)

@pytest.mark.parametrize("qtype", TYPES)
def test_bit_exact(files, qtype):
    ours, theirs = files
    name = "src" if qtype == "F32" else f"{qtype.lower()}.q"
    got = ours.dequantize(name)
    ref = theirs[name]
    assert got.dtype == np.float32 and got.shape == (8, 512)
    assert ours.tensors[name][0].name == qtype
    np.testing.assert_array_equal(bits(got), bits(gguf.quants.dequantize(ref.data, ref.tensor_type).reshape(8, 512)))
    if qtype != "F32":  # ggml's own to_float output, stored as F32
        np.testing.assert_array_equal(bits(got), bits(ours.dequantize(f"{qtype.lower()}.deq")))
