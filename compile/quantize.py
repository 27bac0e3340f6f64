"""Float weights -> GGUF block bytes, byte-identical to ggml's reference quantizers (`quantize_row_*_ref`,
no imatrix), so `--quant` writes exactly what llama-quantize would (../shared/notes/QUANT.md §2, §6).

Every operation mirrors ggml's C source in float32 and in its order: sums are sequential (np.add.reduce
over the leading positions axis adds row after row; never a pairwise sum along a contiguous axis),
`nearest_int` is round-half-even (np.rint), Q8_0 rounds half away from zero, Q4_0 truncates x + 8.5, and
re-quantization divides by the fp16-rounded scales. Python loops run only over search steps (and Q3_K's
positions); each step works on every sub-block of a chunk of rows at once, held position-major
([positions, sub-blocks]) so every operand is contiguous.
"""

from __future__ import annotations

import numpy as np

from formats.errors import KilnError
from formats.quant_layout import QUANT_TYPES, quant_type

F32 = np.float32
_EPS = F32(1e-15)  # ggml's GROUP_MAX_EPS
# Blocks quantized per step: the k-quants' [positions, sub-blocks] temporaries stay inside the L2 cache.
_CHUNK_BLOCKS = {"q8_0": 1 << 15, "q4_0": 1 << 15, "q2_k": 256, "q3_k": 1024, "q4_k": 256, "q5_k": 256, "q6_k": 256}


def _seqsum(terms: np.ndarray) -> np.ndarray:
    """ggml's `s = 0; for i: s += t[i]` over the first axis (float32, in order)."""
    return np.add.reduce(terms, axis=0, initial=F32(0))  # along a non-contiguous axis: row by row, in order


def _absmax(x: np.ndarray) -> np.ndarray:
    """The signed value of the first element of largest |x| along the first axis (+0 if all are zero, as
    ggml's `if (amax < fabsf(v))` loop leaves it)."""
    v = np.take_along_axis(x, np.abs(x).argmax(axis=0)[None], axis=0)[0]
    return np.where(v == 0, F32(0), v)


def _fp16_round(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 bytes [.., 2], the stored value as float32): ggml keeps the fp16 and computes with its value."""
    h = v.astype(np.float16)
    return h.view(np.uint8).reshape(*v.shape, 2), h.astype(F32)


def _qx(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """`make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)` on x [n, S]: (scale [S], L [n, S] in 0..2·nmax-1)."""
    mx = _absmax(x)
    zero = np.abs(mx) < _EPS
    mx = np.where(zero, F32(1), mx)
    w = x * x
    wx = w * x
    l, t = np.empty_like(x), np.empty_like(x)

    def fit(iscale):  # L = clamp(nearest_int(iscale * x), -nmax, nmax - 1); sum w·x·L, sum w·L·L
        np.clip(np.rint(np.multiply(x, iscale, out=t), out=l), -nmax, nmax - 1, out=l)
        return _seqsum(np.multiply(wx, l, out=t)), _seqsum(np.multiply(np.multiply(w, l, out=t), l, out=t))

    iscale = F32(-nmax) / mx
    sumlx, suml2 = fit(iscale)
    best_iscale = iscale  # L is a function of the iscale that set it: rebuild it once at the end
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(F32(nmax) + F32(0.1) * F32(step)) / mx
            sumlx, suml2 = fit(iscale)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            best_iscale = np.where(better, iscale, best_iscale)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    fit(best_iscale)
    l += nmax
    l[:, zero] = 0
    scale[zero] = 0
    return scale, l


def _q3(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`make_q3_quants(n, 4, x, L, do_rmse=true)` on x [n, S]: (scale [S], L [n, S] in 0..7)."""
    nmax = 4
    mx = _absmax(x)
    zero = np.abs(mx) < _EPS
    mx = np.where(zero, F32(1), mx)
    L = np.clip(np.rint((F32(-nmax) / mx) * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx, suml2 = _seqsum(wx * L), _seqsum((w * L) * L)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(5):
            changed = False
            for i in range(len(x)):
                without = sumlx - wx[i] * L[i]  # ggml's slx before position i's new code is added
                sl2 = suml2 - (w[i] * L[i]) * L[i]
                new = np.clip(np.rint((x[i] * sl2) / without), -nmax, nmax - 1)
                slx = without + wx[i] * new
                sl2 = sl2 + (w[i] * new) * new
                take = (without > 0) & (new != L[i]) & (sl2 > 0) & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
                if take.any():
                    changed = True
                    L[i] = np.where(take, new, L[i])
                    sumlx = np.where(take, slx, sumlx)
                    suml2 = np.where(take, sl2, suml2)
            if not changed:  # a sweep that changes nothing would change nothing again: ggml's break
                break
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, F32(0), L + nmax)


def _kx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, nstep: int, mad: bool):
    """`make_qkx2_quants(n, nmax, x, w, L, &min, Laux, rmin, 0.1, nstep, mad)` on x, w [n, S]:
    (scale [S], the_min [S], L [n, S] in 0..nmax). Temporaries are reused in place: this loop is most of
    the k-quants' time."""
    mn = np.minimum(x.min(axis=0), F32(0))
    mx = x.max(axis=0)
    sum_w, sum_x = _seqsum(w), _seqsum(w * x)
    flat = mx == mn
    nmax_f = F32(nmax)
    t, l, wl = np.empty_like(x), np.empty_like(x), np.empty_like(x)

    def codes(iscale, minimum, out):  # clamp(nearest_int(iscale * (x - min)), 0, nmax)
        np.rint(np.multiply(np.subtract(x, minimum, out=t), iscale, out=t), out=out)
        return np.clip(out, 0, nmax_f, out=out)

    def error(scale, minimum, codes):  # sum_i w * err(scale * L + min - x), err = |.| or ^2
        np.subtract(np.add(np.multiply(codes, scale, out=t), minimum, out=t), x, out=t)
        np.abs(t, out=t) if mad else np.multiply(t, t, out=t)
        return _seqsum(np.multiply(t, w, out=t))

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = nmax_f / (mx - mn)
        scale = F32(1) / iscale
        best = error(scale, mn, codes(iscale, mn, l))
        # L is a function of (iscale, min) at the step that set it: keep those, rebuild L once at the end
        best_iscale, best_mn = iscale, mn
        for step in range(nstep + 1):
            iscale = (F32(rmin) + F32(0.1) * F32(step) + nmax_f) / (mx - mn)
            codes(iscale, mn, l)
            np.multiply(w, l, out=wl)
            sum_l = _seqsum(wl)
            sum_l2 = _seqsum(np.multiply(wl, l, out=t))
            sum_xl = _seqsum(np.multiply(wl, x, out=t))
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_min[positive] = 0
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            cur = error(this_scale, this_min, l)
            better = (det > 0) & (cur < best)
            best_iscale = np.where(better, iscale, best_iscale)
            best_mn = np.where(better, mn, best_mn)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
        L = codes(best_iscale, best_mn, l)
    L[:, flat] = 0
    scale[flat] = 0
    return scale, -mn, L


def _sub_blocks(xb: np.ndarray, n: int) -> np.ndarray:
    """Blocks [B, 256] -> position-major sub-blocks [n, B * 256 / n]."""
    return np.ascontiguousarray(xb.reshape(-1, n).T)


def _blocks_of(sub: np.ndarray, b: int) -> np.ndarray:
    """Position-major sub-blocks [n, S] -> [B, 256] in element order."""
    return sub.T.reshape(b, -1)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """Codes [B, 256] in 0..3 -> ggml's 64 bytes: qs[32h + l] holds element 128h + 32g + l at bits 2g."""
    f = L.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (f[:, :, 0] | (f[:, :, 1] << 2) | (f[:, :, 2] << 4) | (f[:, :, 3] << 6)).reshape(-1, 64)


def _high_bits(L: np.ndarray, split: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes [B, 256] below 2·split -> (codes mod split, the 32 bytes whose bit j of byte l is set if element
    32j + l ≥ split): Q3_K's hmask, Q5_K's qh."""
    high = (L >= split).reshape(-1, 8, 32).astype(np.uint8)
    mask = np.zeros(high[:, 0].shape, np.uint8)
    for j in range(8):
        mask |= high[:, j] << j
    return L & np.uint8(split - 1), mask


def _q8_0(x: np.ndarray) -> np.ndarray:
    amax = np.abs(x).max(axis=1)
    d = amax / F32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1) / d, F32(0))
    v = x * inv[:, None]
    r = np.trunc(v)  # roundf: half away from zero (v - trunc(v) is exact)
    r += np.where(np.abs(v - r) >= F32(0.5), np.sign(v), F32(0))
    dbytes, _ = _fp16_round(d)
    return np.concatenate([dbytes, r.astype(np.int8).view(np.uint8)], axis=1)


def _q4_0(x: np.ndarray) -> np.ndarray:
    d = _absmax(x.T) / F32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1) / d, F32(0))
    q = np.minimum(F32(15), np.trunc(x * inv[:, None] + F32(8.5))).astype(np.uint8)
    dbytes, _ = _fp16_round(d)
    return np.concatenate([dbytes, q[:, :16] | (q[:, 16:] << 4)], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    b = len(x)
    xs = _sub_blocks(x, 16)
    scales, L = _qx(xs, 32)
    scales = scales.reshape(b, 16)
    max_scale = _absmax(scales.T)
    zero = np.abs(max_scale) < _EPS
    with np.errstate(divide="ignore"):
        iscale = F32(-128) / np.where(zero, F32(1), max_scale)
        dbytes, d = _fp16_round(F32(1) / iscale)
    sc = np.minimum(F32(127), np.rint(iscale[:, None] * scales))  # [B, 16]
    D = (d[:, None] * sc).reshape(-1)  # per sub-block
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(np.rint(xs / D), -32, 31) + 32
    L = _blocks_of(np.where(D != 0, requant, L), b).astype(np.uint8)
    lo = (L & 15).reshape(b, 2, 2, 2, 32)  # [B, h, g // 2, g % 2, l]
    ql = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(b, 128)
    qh = _pack_2bit(L >> 4)
    out = np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), dbytes], axis=1)
    out[zero] = 0
    return out


def _k_scale_bytes(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit (scale, min) pairs [B, 8] -> ggml's 12 packed bytes (the inverse of get_scale_min_k4)."""
    s = np.empty((len(ls), 12), np.uint8)
    s[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    s[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    s[:, 8:12] = (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)
    return s


def _max_and_inverse(v: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """A block's largest sub-block scale (or min) [B, n] -> [B], as ggml's `max = 0; if (v > max) max = v`,
    and levels / max (0 where max is 0)."""
    top = np.maximum(v.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        return top, np.where(top > 0, F32(levels) / top, F32(0))


def _scale_index(v: np.ndarray, inv: np.ndarray, limit: int) -> np.ndarray:
    """`MIN(limit, (uint8_t)nearest_int(inv * v))`: the C cast wraps before the clamp."""
    return np.minimum(limit, np.rint(inv[:, None] * v).astype(np.int64) & 255).astype(np.uint8)


def _q45_k(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K / Q5_K shared steps: (codes [B, 256] in 0..nmax, the 4 header fields as bytes [B, 16])."""
    b = len(x)
    xs = _sub_blocks(x, 32)
    av = np.sqrt(_seqsum(xs * xs) / F32(32))
    scales, mins, L = _kx2(xs, av + np.abs(xs), nmax, rmin, nstep, mad=False)
    scales, mins = scales.reshape(b, 8), mins.reshape(b, 8)
    (max_scale, inv_scale), (max_min, inv_min) = _max_and_inverse(scales, 63), _max_and_inverse(mins, 63)
    ls, lm = _scale_index(scales, inv_scale, 63), _scale_index(mins, inv_min, 63)
    dbytes, d = _fp16_round(max_scale / F32(63))
    mbytes, dmin = _fp16_round(max_min / F32(63))
    D = (d[:, None] * ls).reshape(-1)
    dm = (dmin[:, None] * lm).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(np.rint((xs + dm) / D), 0, nmax)
    L = _blocks_of(np.where(D != 0, requant, L), b).astype(np.uint8)
    return L, np.concatenate([dbytes, mbytes, _k_scale_bytes(ls, lm)], axis=1)


def _nibbles(L: np.ndarray) -> np.ndarray:
    """Codes [B, 256] in 0..15 -> ggml's 128 bytes: qs[32c + l] = element 64c + l | element 64c + 32 + l << 4."""
    p = L.reshape(-1, 4, 2, 32)
    return (p[:, :, 0] | (p[:, :, 1] << 4)).reshape(-1, 128)


def _q4_k(x: np.ndarray) -> np.ndarray:
    L, head = _q45_k(x, 15, -1.0, 20)
    return np.concatenate([head, _nibbles(L)], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    L, head = _q45_k(x, 31, -0.5, 15)
    low, qh = _high_bits(L, 16)
    return np.concatenate([head, qh, _nibbles(low)], axis=1)


def _q2_k(x: np.ndarray) -> np.ndarray:
    b = len(x)
    xs = _sub_blocks(x, 16)
    scales, mins, L = _kx2(xs, np.abs(xs), 3, -0.5, 15, mad=True)
    scales, mins = scales.reshape(b, 16), mins.reshape(b, 16)
    (max_scale, inv_scale), (max_min, inv_min) = _max_and_inverse(scales, 15), _max_and_inverse(mins, 15)
    ls = np.rint(inv_scale[:, None] * scales).astype(np.int64)
    lm = np.rint(inv_min[:, None] * mins).astype(np.int64)
    sc = ((ls & 255) | ((lm << 4) & 255)).astype(np.uint8)  # y.scales[j] = l; y.scales[j] |= l << 4
    dbytes, d = _fp16_round(max_scale / F32(15))  # 0 where no scale is positive, as ggml's else branch
    mbytes, dmin = _fp16_round(max_min / F32(15))
    D = (d[:, None] * (sc & 15)).reshape(-1)
    dm = (dmin[:, None] * (sc >> 4)).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(np.rint((xs + dm) / D), 0, 3)
    L = _blocks_of(np.where(D != 0, requant, L), b).astype(np.uint8)
    return np.concatenate([sc, _pack_2bit(L), dbytes, mbytes], axis=1)


def _q3_k(x: np.ndarray) -> np.ndarray:
    b = len(x)
    xs = _sub_blocks(x, 16)
    scales, L = _q3(xs)
    scales = scales.reshape(b, 16)
    max_scale = _absmax(scales.T)
    nonzero = max_scale != 0
    with np.errstate(divide="ignore"):
        iscale = F32(-32) / np.where(nonzero, max_scale, F32(1))
        l = (np.rint(iscale[:, None] * scales).astype(np.int64) + 128) % 256 - 128  # (int8_t)nearest_int(..)
    s6 = np.where(nonzero[:, None], np.clip(l, -32, 31) + 32, 0).astype(np.uint8)  # [B, 16]
    dbytes, d = _fp16_round(np.where(nonzero, F32(1) / iscale, F32(0)))
    D = (d[:, None] * (s6.astype(F32) - F32(32))).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(np.rint(xs / D), -4, 3) + 4
    L = _blocks_of(np.where(D != 0, requant, L), b).astype(np.uint8)
    low, hmask = _high_bits(L, 4)
    packed = np.empty((b, 12), np.uint8)
    packed[:, :8] = (s6[:, :8] & 15) | ((s6[:, 8:] & 15) << 4)
    top = (s6 >> 4).reshape(b, 4, 4)  # [B, j // 4, j % 4]
    packed[:, 8:] = top[:, 0] | (top[:, 1] << 2) | (top[:, 2] << 4) | (top[:, 3] << 6)
    return np.concatenate([hmask, _pack_2bit(low), packed, dbytes], axis=1)


_QUANTIZE = {"q8_0": _q8_0, "q4_0": _q4_0, "q2_k": _q2_k, "q3_k": _q3_k, "q4_k": _q4_k, "q5_k": _q5_k, "q6_k": _q6_k}
assert _QUANTIZE.keys() == QUANT_TYPES.keys()


def quantize(qtype: str, x: np.ndarray) -> np.ndarray:
    """float weights [N, K] -> GGUF blocks uint8 [N, K / block · block bytes], byte for byte what ggml's
    `quantize_row_<type>_ref` writes (llama-quantize without an imatrix). float16/bfloat16 are upcast
    exactly, as llama-quantize does; K must fill whole blocks (see row_fallback for rows that do not).
    Rows are independent: quantize(x)[a:b] == quantize(x[a:b])."""
    t = quant_type(qtype)
    x = np.asarray(x)
    if x.ndim != 2 or not (np.issubdtype(x.dtype, np.floating) or x.dtype.name == "bfloat16"):
        raise KilnError(f"{qtype}: quantize takes float weights [N, K], got {x.dtype} {list(x.shape)}")
    n, k = x.shape
    if k % t.block:
        raise KilnError(f"{qtype}: rows of K={k} weights do not fill {t.block}-weight blocks; "
                        f"use row_fallback({qtype!r}, {k}) for the type llama.cpp falls back to")
    blocks = x.astype(F32, copy=False).reshape(-1, t.block)
    out = np.empty((len(blocks), t.block_bytes), np.uint8)
    step = _CHUNK_BLOCKS[qtype]
    for i in range(0, len(blocks), step):
        chunk = blocks[i:i + step]
        if not np.isfinite(chunk).all():  # ggml's rounding assumes finite values; NaN/Inf would be silent garbage
            row = (i + int(np.argmin(np.isfinite(chunk).all(axis=1)))) * t.block // k
            raise KilnError(f"{qtype}: row {row} holds NaN or Inf weights; the source tensor is corrupt")
        out[i:i + step] = _QUANTIZE[qtype](chunk)
    return out.reshape(n, t.row_bytes(k))


# llama.cpp's tensor_type_fallback for rows that do not fill a 256-weight super-block, with Kiln's native
# types: llama.cpp's Q5_0 (for Q4_K) and Q5_1 (for Q5_K) become q8_0, never less precise than its choice.
_FALLBACK = {"q2_k": ("q4_0", ""), "q3_k": ("q4_0", ""), "q6_k": ("q8_0", ""),
             "q4_k": ("q8_0", " (llama.cpp's Q5_0 is not native in Kiln)"),
             "q5_k": ("q8_0", " (llama.cpp's Q5_1 is not native in Kiln)")}


def row_fallback(qtype: str, k: int) -> tuple[str | None, str]:
    """The type rows of `k` weights get when `qtype` is asked for, and a one-line reason for the compile log
    ("" when `qtype` fits): a k-quant falls back as llama.cpp does (QUANT.md §4); if no 32-weight type fits
    either, None (the tensor stays unquantized, where llama.cpp writes F16 or refuses)."""
    t = quant_type(qtype)
    if k % t.block == 0:
        return qtype, ""
    fallback, note = _FALLBACK.get(qtype, (None, ""))
    if fallback and k % QUANT_TYPES[fallback].block == 0:
        return fallback, f"K={k} is not a multiple of {qtype}'s {t.block}-weight block: {fallback} instead{note}"
    return None, f"K={k} is not a multiple of 32: kept unquantized (no {qtype} or fallback block fits)"
