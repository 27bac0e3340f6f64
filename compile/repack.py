"""GGUF quantized blocks -> Kiln's packed components (docs/QUANT-LAYOUT.md), and back to float32.

Repacking is a bit permutation done with whole-array numpy operations (over every block of a chunk of
rows at once), so the converter can repack a 128256 x 4096 embedding in seconds. `dequantize_components`
is the numpy reference of the layout's formulas: bit-identical to `gguf.quants.dequantize` of the blocks
the components came from, which is what the tests and the kernels are checked against.
"""

from __future__ import annotations

import numpy as np

from formats.errors import KilnError
from formats.quant_layout import QUANT_TYPES, quant_type

_CHUNK_WEIGHTS = 1 << 24  # weights repacked per step: bounds the temporaries to tens of MB
_U32 = np.dtype("<u4")
_SHIFT2 = np.array([0, 2, 4, 6], np.uint8)


def _f16(b: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 field at `offset` of every block: float16 [B, 1]."""
    return np.ascontiguousarray(b[:, offset:offset + 2]).view("<f2")


def _nibble_pairs(qs: np.ndarray) -> np.ndarray:
    """Chunks of L bytes holding elements 0..L-1 in low nibbles and L..2L-1 in high ones -> 4-bit codes."""
    even, odd = qs[..., 0::2], qs[..., 1::2]
    low = (even & 15) | (odd << 4)
    high = (even >> 4) | (odd & 0xF0)
    return np.concatenate([low, high], axis=-1).reshape(len(qs), -1).view(_U32)


def _two_bit_fields(qs: np.ndarray) -> np.ndarray:
    """Chunks of 32 bytes holding element 32g + l in bits 2g..2g+1 of byte l -> 2-bit codes."""
    f = (qs.reshape(*qs.shape[:-1], 1, 8, 4) >> _SHIFT2.reshape(4, 1, 1)) & 3  # [B, C, g, l // 4, l % 4]
    packed = f[..., 0] | (f[..., 1] << 2) | (f[..., 2] << 4) | (f[..., 3] << 6)
    return packed.reshape(len(qs), -1).view(_U32)


def _bit_planes(x: np.ndarray) -> np.ndarray:
    """32 bytes holding element 32j + l in bit j of byte l (Q3_K hmask, Q5_K qh) -> 1-bit codes."""
    bits = (x[:, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    return np.packbits(bits, axis=-1, bitorder="little").reshape(len(x), -1).view(_U32)


def _k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of 6-bit (scale, min) pairs -> sc, m uint8 [B, 8] (ggml's get_scale_min_k4)."""
    lo, mid, top = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 63, (top & 15) | ((lo >> 6) << 4)], axis=-1)
    m = np.concatenate([mid & 63, (top >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc, m


def _q3_scales(s: np.ndarray) -> np.ndarray:
    """Q3_K's 12 bytes of sixteen 6-bit scales -> the signed scales (stored value - 32), int8 [B, 16]."""
    low = np.concatenate([s[:, 0:8] & 15, s[:, 0:8] >> 4], axis=-1)
    high = (s[:, None, 8:12] >> _SHIFT2[:, None]) & 3  # [B, s // 4, s % 4]
    return (low | (high.reshape(len(s), 16) << 4)).view(np.int8) - np.int8(32)


def _q8_0(b):
    return {"q": np.ascontiguousarray(b[:, 2:]).view(_U32), "d": _f16(b, 0)}


def _q4_0(b):
    return {"q": _nibble_pairs(b[:, None, 2:18]), "d": _f16(b, 0)}


def _q2_k(b):
    return {"q": _two_bit_fields(b[:, 16:80].reshape(-1, 2, 32)), "sc": b[:, :16], "d": _f16(b, 80),
            "dmin": _f16(b, 82)}


def _q3_k(b):
    return {"q": _two_bit_fields(b[:, 32:96].reshape(-1, 2, 32)), "qh": _bit_planes(b[:, :32]),
            "sc": _q3_scales(b[:, 96:108]), "d": _f16(b, 108)}


def _q4_k(b):
    sc, m = _k4_scales(b[:, 4:16])
    return {"q": _nibble_pairs(b[:, 16:144].reshape(-1, 4, 32)), "sc": sc, "m": m, "d": _f16(b, 0),
            "dmin": _f16(b, 2)}


def _q5_k(b):
    sc, m = _k4_scales(b[:, 4:16])
    return {"q": _nibble_pairs(b[:, 48:176].reshape(-1, 4, 32)), "qh": _bit_planes(b[:, 16:48]), "sc": sc, "m": m,
            "d": _f16(b, 0), "dmin": _f16(b, 2)}


def _q6_k(b):
    return {"q": _nibble_pairs(b[:, :128].reshape(-1, 2, 64)), "qh": _two_bit_fields(b[:, 128:192].reshape(-1, 2, 32)),
            "sc": b[:, 192:208].view(np.int8), "d": _f16(b, 208)}


_REPACK = {"q8_0": _q8_0, "q4_0": _q4_0, "q2_k": _q2_k, "q3_k": _q3_k, "q4_k": _q4_k, "q5_k": _q5_k, "q6_k": _q6_k}
assert _REPACK.keys() == QUANT_TYPES.keys()


def repack(qtype: str, blocks: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """GGUF blocks uint8 [N, row bytes] of rows of `k` weights -> Kiln's components (names, dtypes, shapes
    of formats.quant_layout), holding the same bits; a size that does not match is a KilnError."""
    t = quant_type(qtype)
    blocks = np.asarray(blocks)
    if blocks.dtype != np.uint8 or blocks.ndim != 2 or k <= 0 or k % t.block or blocks.shape[1] != t.row_bytes(k):
        want = (f"uint8 [N, {t.row_bytes(k)}] ({k // t.block} blocks of {t.block_bytes} bytes)" if k > 0 and
                k % t.block == 0 else f"K a multiple of {t.block}")
        raise KilnError(f"{qtype}: rows of K={k} weights need {want}, got {blocks.dtype} {list(blocks.shape)}")
    n = blocks.shape[0]
    out = {c: np.empty(s, t.components[c].dtype) for c, s in t.shapes(n, k).items()}
    step = max(1, _CHUNK_WEIGHTS // k)
    for r in range(0, n, step):
        rows = blocks[r:r + step]
        for c, a in _REPACK[qtype](rows.reshape(-1, t.block_bytes)).items():
            out[c][r:r + step] = a.reshape(len(rows), -1)
    return out


def _codes(words: np.ndarray, bits: int) -> np.ndarray:
    """b-bit codes uint32 [N, W] -> one uint8 per element [N, W * 32 / b] (the layout's bit-field rule)."""
    b = np.ascontiguousarray(words, _U32).view(np.uint8)
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    return ((b[..., None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(len(b), -1)


def _per_weight(x: np.ndarray, k: int) -> np.ndarray:
    """A per-block array [N, k / n] as float32, repeated to every weight [N, k]."""
    return np.repeat(x.astype(np.float32), k // x.shape[1], axis=1)


def dequantize_components(qtype: str, comps: dict[str, np.ndarray]) -> np.ndarray:
    """float32 [N, K] from Kiln's components by docs/QUANT-LAYOUT.md's formulas: the numpy reference that
    must equal `gguf.quants.dequantize` bit for bit (every product is exact in fp32, so order is free).
    Works through chunks of rows, so a vocabulary-sized tensor needs no more than its output in memory."""
    t = quant_type(qtype)
    n, k = len(comps["q"]), comps["q"].shape[1] * t.components["q"].per_entry
    for c, shape in t.shapes(n, k).items():
        a = comps.get(c)
        if a is None or a.shape != shape or a.dtype != t.components[c].dtype:
            got = "missing" if a is None else f"{a.dtype} {list(a.shape)}"
            raise KilnError(f"{qtype} component {c!r}: expected {t.components[c].dtype} {list(shape)}, got {got}")
    out = np.empty((n, k), np.float32)
    step = max(1, _CHUNK_WEIGHTS // k)
    for r in range(0, n, step):
        out[r:r + step] = _dequantize(qtype, {c: comps[c][r:r + step] for c in t.components}, k)
    return out


def _dequantize(qtype: str, comps: dict[str, np.ndarray], k: int) -> np.ndarray:
    d = _per_weight(comps["d"], k)
    if qtype == "q8_0":
        return d * np.ascontiguousarray(comps["q"]).view(np.int8).astype(np.float32)
    if qtype == "q4_0":
        return d * (_codes(comps["q"], 4).astype(np.float32) - np.float32(8))
    if qtype == "q6_k":
        q = (_codes(comps["q"], 4) | (_codes(comps["qh"], 2) << 4)).astype(np.float32) - np.float32(32)
        return (d * _per_weight(comps["sc"], k)) * q
    if qtype == "q3_k":
        q = _codes(comps["q"], 2).astype(np.float32) - np.float32(4) * (1 - _codes(comps["qh"], 1)).astype(np.float32)
        return (d * _per_weight(comps["sc"], k)) * q
    dmin = _per_weight(comps["dmin"], k)
    if qtype == "q2_k":
        sc = comps["sc"]
        return (d * _per_weight(sc & 15, k)) * _codes(comps["q"], 2).astype(np.float32) - dmin * _per_weight(sc >> 4, k)
    q = _codes(comps["q"], 4)
    if qtype == "q5_k":
        q = q | (_codes(comps["qh"], 1) << 4)
    return (d * _per_weight(comps["sc"], k)) * q.astype(np.float32) - dmin * _per_weight(comps["m"], k)
