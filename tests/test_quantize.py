"""Kiln's quantizers write ggml's bytes: equal to ggml's own blocks of two vector files for every type,
equal to gguf-py's ggml-exact Q8_0/Q4_0 on edge cases, and every type's round trip stays within a step."""

import time

import gguf
import numpy as np
import pytest

from conftest import DATA
from compile.quantize import quantize, row_fallback
from formats.errors import KilnError
from formats.quant_layout import QUANT_TYPES

VECTORS = DATA / "ggml-quant-vectors" / "ggml-quant-vectors.gguf"  # ggml's bytes, 8 x 512
EDGES = DATA / "ggml-quant-edges" / "ggml-quant-edges.gguf"  # ggml's bytes on 48 x 1024 edge-case rows
BITS = {"q8_0": 8, "q4_0": 4, "q2_k": 2, "q3_k": 3, "q4_k": 4, "q5_k": 5, "q6_k": 6}
SYMMETRIC = {"q8_0", "q4_0", "q3_k", "q6_k"}  # d·q with signed codes; the others d·sc·q - dmin·m


def ggml_type(qtype):
    return gguf.GGMLQuantizationType[qtype.upper()]


def dequantize(qtype, blocks, shape):
    return gguf.quants.dequantize(blocks, ggml_type(qtype)).reshape(shape)


@pytest.fixture(scope="module", params=[VECTORS, EDGES], ids=["vectors", "edges"])
def ggml_file(request):
    return {t.name: t for t in gguf.GGUFReader(request.param).tensors}


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_ggml_bytes(ggml_file, qtype):
    """A file's `src` (F32 rows, see its README) quantized by Kiln is ggml's `<type>.q`, byte for byte."""
    src = np.asarray(ggml_file["src"].data)
    ref = ggml_file[f"{qtype}.q"]
    assert ref.tensor_type == ggml_type(qtype) and src.ndim == 2
    np.testing.assert_array_equal(quantize(qtype, src), np.asarray(ref.data).reshape(len(src), -1))


def edge_rows(rng, k=256):
    """Rows that exercise each rounding rule's corner: zeros, outliers, exact ties, fp16 grids, tiny scales."""
    normal = rng.standard_normal((4, k)).astype(np.float32)
    outlier = normal.copy()
    outlier[0, 7], outlier[1, 100], outlier[2, 31], outlier[3, 32] = 1e4, -6e4, 1e3, -1e3
    ties = np.tile(np.arange(-127, 129, dtype=np.float32) - 0.5, (1, k // 256 + 1))[:, :k]  # Q8_0: id 1, x.5
    ties[0, ::32] = 127  # absmax 127 in every block
    halves = (rng.integers(-16, 17, (2, k)) / 2).astype(np.float32)  # Q4_0: absmax -8 -> id -1, x + 8.5 integral
    halves[:, ::32] = -8
    return np.concatenate([
        np.zeros((2, k), np.float32), normal, outlier, ties, halves,
        rng.standard_normal((2, k)).astype(np.float16).astype(np.float32),
        (rng.standard_normal((2, k)) * 1e-30).astype(np.float32),
        np.full((1, k), -3.25, np.float32), np.abs(normal[:1]),
    ])


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_edge_cases_match_gguf(qtype):
    x = edge_rows(np.random.default_rng(3))
    ref = gguf.quants.quantize(x, ggml_type(qtype))
    np.testing.assert_array_equal(quantize(qtype, x), ref)


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_round_trip(qtype):
    """Dequantized weights are within one step of their block's code grid, 2^bits codes over [-amax, amax]
    (codes around zero) or [min(min, 0), max] (scale and min), 1% slack for the fp16 scales; zero rows stay zero."""
    t = QUANT_TYPES[qtype]
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal((8, 1024)), rng.laplace(size=(8, 1024)), rng.uniform(0, 2, (4, 1024)),
                        edge_rows(rng, 1024)[:8]]).astype(np.float32)
    deq = dequantize(qtype, quantize(qtype, x), x.shape)
    xb, err = x.reshape(-1, t.block), np.abs(deq - x).reshape(-1, t.block)
    if qtype in SYMMETRIC:
        step = 2 * np.abs(xb).max(axis=1) / (2 ** BITS[qtype] - 1)
    else:
        step = (xb.max(axis=1) - np.minimum(xb.min(axis=1), 0)) / (2 ** BITS[qtype] - 1)
    assert np.all(err.max(axis=1) <= 1.01 * step), np.max(err.max(axis=1) / np.maximum(step, 1e-30))
    np.testing.assert_array_equal(deq[len(x) - 8:len(x) - 6], 0)  # edge_rows' zero rows


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_chunks_and_rate(qtype, monkeypatch):
    """Blocks quantized in several steps (the last one short) give the bytes of one step; prints the rate."""
    import compile.quantize as quantize_module
    x = np.random.default_rng(7).standard_normal((12, 4096)).astype(np.float32)
    t0 = time.perf_counter()
    whole = quantize(qtype, x)
    print(f"{qtype}: {x.size / (time.perf_counter() - t0) / 1e6:.2f} M weights/s")
    monkeypatch.setitem(quantize_module._CHUNK_BLOCKS, qtype, 5)
    np.testing.assert_array_equal(quantize(qtype, x), whole)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_k"])
def test_half_precision_sources(qtype):
    """bf16 / fp16 weights (safetensors' usual dtypes) quantize as their exact float32 values."""
    import ml_dtypes
    x = np.random.default_rng(9).standard_normal((4, 512)).astype(np.float32)
    for dtype in (np.float16, ml_dtypes.bfloat16):
        half = x.astype(dtype)
        np.testing.assert_array_equal(quantize(qtype, half), quantize(qtype, half.astype(np.float32)))


@pytest.mark.parametrize("qtype, x, match", [
    ("q4_k", np.zeros((2, 300), np.float32), r"q4_k: rows of K=300 .*row_fallback"),
    ("q8_0", np.zeros((2, 48), np.float32), r"q8_0: rows of K=48 .*32-weight blocks"),
    ("q6_k", np.zeros(256, np.float32), r"q6_k: quantize takes float weights \[N, K\]"),
    ("q4_0", np.zeros((1, 32), np.int32), r"q4_0: quantize takes float weights"),
    ("q4_1", np.zeros((1, 32), np.float32), r"q4_1.*q8_0, q4_0"),
    ("q6_k", np.where(np.arange(3 * 512).reshape(3, 512) == 777, np.float32(np.inf), np.float32(1)),
     r"q6_k: row 1 holds NaN or Inf"),
    ("q8_0", np.full((5, 64), np.nan, np.float32), r"q8_0: row 0 holds NaN or Inf"),
])
def test_bad_input(qtype, x, match):
    with pytest.raises(KilnError, match=match):
        quantize(qtype, x)


@pytest.mark.parametrize("qtype, k, want", [
    ("q4_k", 4096, "q4_k"), ("q8_0", 96, "q8_0"),
    ("q2_k", 896, "q4_0"), ("q3_k", 896, "q4_0"), ("q6_k", 896, "q8_0"),  # Qwen2.5-0.5B's hidden size
    ("q4_k", 576, "q8_0"), ("q5_k", 576, "q8_0"),  # llama.cpp: Q5_0 / Q5_1, not native in Kiln
    ("q4_k", 100, None), ("q6_k", 48, None), ("q4_0", 48, None), ("q8_0", 1000, None),
])
def test_row_fallback(qtype, k, want):
    got, reason = row_fallback(qtype, k)
    assert got == want
    if want == qtype:
        assert reason == ""
    else:
        assert f"K={k}" in reason and "\n" not in reason
        if want is not None:  # the fallback's blocks fit the row
            assert quantize(want, np.ones((1, k), np.float32)).shape == (1, QUANT_TYPES[want].row_bytes(k))


def test_sums_are_sequential():
    """ggml adds in order; numpy's reduce along the leading axis must too (pairwise summation would not)."""
    from compile.quantize import _seqsum
    rng = np.random.default_rng(11)
    terms = (rng.standard_normal((32, 4096)) * np.exp2(rng.integers(-12, 24, (32, 4096)))).astype(np.float32)
    ordered = np.float32(0) + np.zeros(4096, np.float32)
    for row in terms:
        ordered = ordered + row
    pairwise = np.ascontiguousarray(terms.T).sum(axis=1)
    assert np.any(pairwise != ordered)  # the data tells the two orders apart
    np.testing.assert_array_equal(_seqsum(terms).view(np.uint32), ordered.view(np.uint32))


def test_bad_row_named_across_chunks(monkeypatch):
    import compile.quantize as quantize_module
    monkeypatch.setitem(quantize_module._CHUNK_BLOCKS, "q8_0", 5)  # chunks start mid-row (2 blocks a row)
    x = np.ones((6, 64), np.float32)
    x[3, 40] = np.nan
    with pytest.raises(KilnError, match="q8_0: row 3 holds NaN"):
        quantize("q8_0", x)
