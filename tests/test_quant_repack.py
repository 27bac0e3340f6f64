"""Repacking GGUF blocks into Kiln's components loses no bit: dequantizing the components equals
gguf.quants.dequantize of the blocks exactly, on ggml's own bytes and on random blocks."""

import gguf
import numpy as np
import pytest

from conftest import DATA
from compile.repack import dequantize_components, repack
from formats.errors import KilnError
from formats.quant_layout import QUANT_TYPES

VECTORS = DATA / "ggml-quant-vectors" / "ggml-quant-vectors.gguf"
EDGES = DATA / "ggml-quant-edges" / "ggml-quant-edges.gguf"
# Byte offsets of each block's fp16 scales: random bytes there could be NaN/Inf, whose products need not match.
FP16_FIELDS = {"q8_0": [0], "q4_0": [0], "q2_k": [80, 82], "q3_k": [108], "q4_k": [0, 2], "q5_k": [0, 2],
               "q6_k": [208]}


def bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def reference(qtype, blocks, n, k):
    return gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype.upper()]).reshape(n, k)


def check(qtype, blocks, n, k):
    t = QUANT_TYPES[qtype]
    comps = repack(qtype, blocks, k)
    assert comps.keys() == t.components.keys()
    for c, shape in t.shapes(n, k).items():
        assert comps[c].dtype == np.dtype(t.components[c].dtype) and comps[c].shape == shape, c
    np.testing.assert_array_equal(bits(dequantize_components(qtype, comps)), bits(reference(qtype, blocks, n, k)))


@pytest.fixture(scope="module")
def vectors():
    return {t.name: t for t in gguf.GGUFReader(VECTORS).tensors}


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_ggml_bytes(vectors, qtype):
    t = vectors[f"{qtype}.q"]
    assert t.tensor_type.name.lower() == qtype
    blocks = np.asarray(t.data).reshape(8, -1)
    check(qtype, blocks, 8, 512)
    # and ggml's own dequantized values
    deq = np.asarray(vectors[f"{qtype}.deq"].data).reshape(8, 512)
    np.testing.assert_array_equal(bits(dequantize_components(qtype, repack(qtype, blocks, 512))), bits(deq))


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_ggml_edge_blocks(qtype):
    """ggml's blocks of edge-case rows (zeros, ties, flat sub-blocks, outliers: tests/data/ggml-quant-edges)."""
    t = {t.name: t for t in gguf.GGUFReader(EDGES).tensors}[f"{qtype}.q"]
    check(qtype, np.asarray(t.data).reshape(48, -1), 48, 1024)


def random_blocks(qtype, n, k, rng):
    """uint8 [n, row bytes]: random bytes, with finite fp16 scales of every magnitude and both signs."""
    t = QUANT_TYPES[qtype]
    blocks = rng.integers(0, 256, (n, k // t.block, t.block_bytes), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        scale = rng.standard_normal((n, k // t.block)) * np.exp2(rng.integers(-20, 12, (n, k // t.block)))
        blocks[:, :, off:off + 2] = scale.astype(np.float16).view(np.uint8).reshape(n, -1, 2)
    return blocks.reshape(n, -1)


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_random_blocks(qtype):
    check(qtype, random_blocks(qtype, 37, 1024, np.random.default_rng(len(qtype))), 37, 1024)


def test_chunked_rows(monkeypatch):
    """Rows repacked and dequantized in several chunks (the last one short) land where one chunk puts them."""
    import compile.repack as repack_module
    blocks = random_blocks("q2_k", 11, 512, np.random.default_rng(1))
    whole = repack("q2_k", blocks, 512)
    values = dequantize_components("q2_k", whole)
    monkeypatch.setattr(repack_module, "_CHUNK_WEIGHTS", 3 * 512)
    chunked = repack("q2_k", blocks, 512)
    for c, a in chunked.items():
        np.testing.assert_array_equal(a, whole[c])
    np.testing.assert_array_equal(bits(dequantize_components("q2_k", chunked)), bits(values))


@pytest.mark.parametrize("qtype, blocks, k", [
    ("q4_k", np.zeros((4, 143), np.uint8), 256),
    ("q8_0", np.zeros((4, 34), np.uint8), 64),
    ("q6_k", np.zeros((4, 210), np.uint8), 200),
    ("q4_0", np.zeros((4, 18), np.float32), 32),
    ("q4_0", np.zeros(18, np.uint8), 32),
])
def test_wrong_size(qtype, blocks, k):
    with pytest.raises(KilnError, match=rf"{qtype}: rows of K={k} .*got"):
        repack(qtype, blocks, k)


def test_unknown_type():
    with pytest.raises(KilnError, match="q4_1.*q8_0, q4_0"):
        repack("q4_1", np.zeros((1, 20), np.uint8), 32)
