"""The values of docs/QUANT-LAYOUT.md's components as TE expressions, and the dequantize-matmul they make.

`parts` gives an element's (scale, code, min), bit-identical to `gguf.quants.dequantize` once combined
(model_defs/quant.py's dequantize PrimFunc). `dequantize_matmul_te` is the few-row matmul with the group
scale factored out, built by the compiler pass that picks it (schedules/quant_fusion.py) for the GEMV
rule (schedules/quant_gemv.py). Here, with the layout, because both the model definitions and the
schedules use it (formats is the layer both may import); only those import TVM through it.
"""

from __future__ import annotations

from tvm import te, tirx

from formats.quant_layout import quant_type


def _names(qtype: str) -> list[str]:
    """The components' names in PrimFunc argument order."""
    return list(quant_type(qtype).components)


def _bits(words: te.Tensor, n, k, bits: int):
    """The `bits`-bit code of element k of row n (element k at bit bits·(k % (32/bits)) of word k·bits/32)."""
    per = 32 // bits
    shift = ((k % per) * bits).astype("uint32")
    return (words[n, k // per] >> shift) & tirx.const(2**bits - 1, "uint32")


def _code(code, offset: int = 0):
    """`code` (a uint32 below 2^23) minus `offset` in fp32, without an int->float conversion: the code's
    bits below the exponent of 2^23 make the float 2^23 + code exactly, so one subtraction gives the
    exact value (GPUs convert integers at a quarter of the FMA rate)."""
    magic = tirx.reinterpret("float32", code | tirx.const(0x4B000000, "uint32"))
    return magic - tirx.const(float(2**23 + offset), "float32")


def _byte_code(words: te.Tensor, n, k, bits: int, offset: int = 0):
    """`_code` of a 4- or 8-bit code for CUDA: the code's byte and the exponent of 2^23 put together by one
    byte permute (`__byte_perm`, PRMT) instead of shift, mask and OR (three integer instructions at half
    the FMA rate). Nibbles 2j and 2j + 1 of a word are byte j of word & 0x0F0F0F0F and of
    (word >> 4) & 0x0F0F0F0F, which every 4 codes share; 8-bit codes get their sign bit flipped per word."""
    u32 = lambda v: tirx.const(v, "uint32")  # noqa: E731
    word = words[n, k // (32 // bits)]
    if bits == 8:
        v, byte = word ^ u32(0x80808080), k % 4
    else:
        v, byte = (word >> ((k % 2) * 4).astype("uint32")) & u32(0x0F0F0F0F), (k % 8) // 2
    made = tirx.call_pure_extern("uint32", "__byte_perm", v, u32(0x4B000000), (byte + 0x7650).astype("uint32"))
    return tirx.reinterpret("float32", made) - tirx.const(float(2**23 + offset), "float32")


def _q6_byte_code(q: te.Tensor, qh: te.Tensor, n, k):
    """`_byte_code` of a Q6_K code (low nibble | high 2 bits << 4) minus 32: the high bits of the 4 codes
    that share a byte-permuted word (bits 4j + 2h of qh's half, j = 0..3) are spread to bits 8j + 4 by one
    byte permute, a shift and two masks, then merged into the nibbles' bytes, so that per code only the
    final permute remains (instead of two shifts, two masks and two ORs)."""
    u32 = lambda v: tirx.const(v, "uint32")  # noqa: E731
    h = (k % 2).astype("uint32")
    hi = qh[n, k // 16] >> (((k // 8) % 2).astype("uint32") * u32(16) + h * u32(2))
    doubled = tirx.call_pure_extern("uint32", "__byte_perm", hi, u32(0), u32(0x1100))  # bytes 0, 0, 1, 1
    spread = (doubled & u32(0x30003000)) | ((doubled << u32(4)) & u32(0x00300030))
    v = ((q[n, k // 8] >> (h * u32(4))) & u32(0x0F0F0F0F)) | spread
    made = tirx.call_pure_extern("uint32", "__byte_perm", v, u32(0x4B000000), ((k % 8) // 2 + 0x7650).astype("uint32"))
    return tirx.reinterpret("float32", made) - tirx.const(float(2**23 + 32), "float32")


def _q4_fraction_code(words: te.Tensor, n, k):
    """A 4-bit code q as the fraction 0.5 + q/32 for CUDA, with no subtraction per code: nibbles 2j and 2j + 1
    of a word, as 8q, are byte j of (word << 3) & 0x78787878 and of (word >> 1) & 0x78787878 (which every 4
    codes share); one byte permute puts that byte next to the sign and exponent of 0.5f (0x3F000000), as the
    top of its mantissa. The group scale and min absorb the map back to q (`parts`), so that per weight only
    the permute and the FMA with x remain: `_byte_code`'s subtraction of 2^23 was a seventh of Q4_K's GEMV
    instructions. (The same for Q6_K's codes measured slower on the H100: bench/RESULTS.md.)"""
    u32 = lambda v: tirx.const(v, "uint32")  # noqa: E731
    v = ((words[n, k // 8] >> ((k % 2) * 4).astype("uint32")) << u32(3)) & u32(0x78787878)
    made = tirx.call_pure_extern("uint32", "__byte_perm", v, u32(0x3F000000), ((k % 8) // 2 * 256 + 0x7054).astype("uint32"))
    return tirx.reinterpret("float32", made)


WITH_MIN = ("q4_k", "q5_k", "q2_k")  # types whose value subtracts a min
GROUP = {"q8_0": 32, "q4_0": 32, "q4_k": 32, "q5_k": 32, "q6_k": 16, "q2_k": 16, "q3_k": 16}  # elements a scale


def parts(qtype: str, c: dict, n, k, byte_perm: bool = False):
    """(scale, code, min) of element (n, k) in fp32, its value scale · code − min (min None: 0); scale and
    min are constant over k's group of GROUP[qtype] elements. Every product is exact in fp32. `byte_perm`
    (CUDA only, for the GEMV): Q8_0, Q4_0 and Q6_K codes by byte permutes (`_byte_code`), the same values;
    Q4_K codes as fractions c = 0.5 + q/32 (`_q4_fraction_code`): q = 32·c − 16, so the scale becomes
    32 · scale and the min min + 16 · scale: the same value within one fp32 rounding of the min, which a
    matmul's fp32 sum has anyway."""
    def f32(x):
        return x.astype("float32")

    def u32(v):
        return tirx.const(v, "uint32")

    if qtype == "q8_0":  # the byte as int8: flipping its sign bit offsets it by 128
        code = _byte_code(c["q"], n, k, 8, 128) if byte_perm else _code(_bits(c["q"], n, k, 8) ^ u32(0x80), 128)
        return f32(c["d"][n, k // 32]), code, None
    if qtype == "q4_0":
        return f32(c["d"][n, k // 32]), _byte_code(c["q"], n, k, 4, 8) if byte_perm else _code(_bits(c["q"], n, k, 4), 8), None
    d = f32(c["d"][n, k // 256])
    if qtype in ("q4_k", "q5_k"):
        scale, low = d * f32(c["sc"][n, k // 32]), f32(c["dmin"][n, k // 256]) * f32(c["m"][n, k // 32])
        if qtype == "q4_k" and byte_perm:  # q = 32·c − 16
            return scale * 32.0, _q4_fraction_code(c["q"], n, k), low + scale * 16.0
        q = _bits(c["q"], n, k, 4)
        return scale, _code(q | (_bits(c["qh"], n, k, 1) << u32(4))) if qtype == "q5_k" else _code(q), low
    if qtype == "q6_k":
        code = (_q6_byte_code(c["q"], c["qh"], n, k) if byte_perm else
                _code(_bits(c["q"], n, k, 4) | (_bits(c["qh"], n, k, 2) << u32(4)), 32))
        return d * f32(c["sc"][n, k // 16]), code, None
    if qtype == "q2_k":
        sc = c["sc"][n, k // 16]
        return (d * f32(sc & tirx.const(15, "uint8")), _code(_bits(c["q"], n, k, 2)),
                f32(c["dmin"][n, k // 256]) * f32(sc >> tirx.const(4, "uint8")))
    if qtype == "q3_k":  # q - 4 * (1 - qh) = (q | qh << 2) - 4
        return d * f32(c["sc"][n, k // 16]), _code(_bits(c["q"], n, k, 2) | (_bits(c["qh"], n, k, 1) << u32(2)), 4), None
    raise ValueError(qtype)


class _OneOfStack:
    """A component of one matrix of a stack (components [S, N, ...]): `[n, j]` reads `[*which, n, j]`, so that
    `parts` indexes it as an [N, ...] component."""

    def __init__(self, tensor: te.Tensor, which: tuple):
        self.tensor, self.which = tensor, which

    def __getitem__(self, index: tuple):
        return self.tensor[(*self.which, *index)]


def dequantize_matmul_te(qtype: str, x: te.Tensor, components: list[te.Tensor], byte_perm: bool = False,
                         norm: tuple[te.Tensor, float] | None = None) -> te.Tensor:
    """x · dequantize(W)ᵀ in fp32 ([..., K] x [N, K] -> [..., N]), the group scale factored out of the
    inner sum: per group g of GROUP[qtype] elements Σ_k (a·q_k − b)·x_k = a·Σ_k q_k·x_k − b·Σ_k x_k, with
    Σ_k x_k shared by every row of W. A GEMV then does per weight only the code's int→float and one FMA
    (schedules/quant_gemv.py); the rounding differs from the unfactored sum within fp32's.

    Blocks (named for the rules): `dequantize_<qtype>_codes` [N, K] (the codes as floats), `group_scale`
    and `group_min` [N, K/G], `group_dot` [..., N, K/G] and `group_sum` [..., K/G] (reductions over a
    group), then `NT_matmul` [..., N] (the reduction over groups, its reads all plain iterators, so that a
    schedule can pad its row count). Components with one more leading axis, [S, N, ...] (S matrices one
    after the other viewed apart: gate and up as [2, I, ...], schedules/swiglu_gemv.py), give every weight
    block that axis before N and `NT_matmul` [..., S, N].

    `norm` (γ [K], eps): rms_norm(x, γ) · dequantize(W)ᵀ instead (schedules/norm_gemv.py), the RMSNorm carried
    by the matmul: `norm_scaled` [..., K] = γ·x in fp32 is what `group_dot` and `group_sum` read, `group_square`
    [..., K/G] = Σ x² per group (per row of x, like `group_sum`), `NT_matmul` a pair (the sum, Σx²) reduced
    over groups, and `norm_rstd` multiplies the sum by rsqrt(Σx²/K + eps): no rounding of the normed x."""
    stack = tuple(components[0].shape[:-2])  # () or (S,)
    rows, cols = components[0].shape[-2], x.shape[-1]
    lead = len(x.shape) - 1  # x's row axes

    def c(which):
        return {name: _OneOfStack(t, tuple(which)) for name, t in zip(_names(qtype), components)}

    group = GROUP[qtype]
    index = lambda v: tirx.IntImm(str(x.shape[-1].ty), v)  # noqa: E731  (x's index type: int64 from Relax)
    ngroups = cols // group
    f32 = lambda v: v.astype("float32")  # noqa: E731
    xs = x if norm is None else te.compute(x.shape, lambda *i: f32(x[i]) * f32(norm[0][i[-1]]), name="norm_scaled")
    codes = te.compute((*stack, rows, cols), lambda *w: parts(qtype, c(w[:-2]), w[-2], w[-1], byte_perm)[1],
                       name=f"dequantize_{qtype}_codes")
    scale = te.compute((*stack, rows, ngroups), lambda *w: parts(qtype, c(w[:-2]), w[-2], w[-1] * group, byte_perm)[0],
                       name="group_scale")
    t = te.reduce_axis((index(0), index(group)), "t")
    dot = te.compute((*x.shape[:-1], *stack, rows, ngroups), lambda *i: te.sum(
        f32(xs[(*i[:lead], i[-1] * group + t)]) * codes[(*i[lead:-1], i[-1] * group + t)], axis=t), name="group_dot")
    g = te.reduce_axis((index(0), ngroups), "g")

    def per_group(name, value):  # [..., K/G]: Σ value(x index) over each group, once per row of x
        s = te.reduce_axis((index(0), index(group)), "s")
        return te.compute((*x.shape[:-1], ngroups), lambda *i: te.sum(value((*i[:-1], i[-1] * group + s)), axis=s),
                          name=name)

    if qtype in WITH_MIN:
        low = te.compute((*stack, rows, ngroups), lambda *w: parts(qtype, c(w[:-2]), w[-2], w[-1] * group, byte_perm)[2],
                         name="group_min")
        xsum = per_group("group_sum", lambda i: f32(xs[i]))
        term = lambda *i: scale[(*i[lead:], g)] * dot[(*i, g)] - low[(*i[lead:], g)] * xsum[(*i[:lead], g)]  # noqa: E731
    else:
        term = lambda *i: scale[(*i[lead:], g)] * dot[(*i, g)]  # noqa: E731
    out_shape = (*x.shape[:-1], *stack, rows)
    if norm is None:
        return te.compute(out_shape, lambda *i: te.sum(term(*i), axis=g), name="NT_matmul")
    square = per_group("group_square", lambda i: f32(x[i]) * f32(x[i]))
    pair_sum = te.comm_reducer(lambda a, b: (a[0] + b[0], a[1] + b[1]),
                               lambda t0, t1: (tirx.const(0, t0), tirx.const(0, t1)), name="pair_sum")
    total, squares = te.compute(out_shape, lambda *i: pair_sum((term(*i), square[(*i[:lead], g)]), axis=g),
                                name="NT_matmul")
    eps = tirx.const(norm[1], "float32")
    return te.compute(total.shape, lambda *i: total[i] * tirx.rsqrt(squares[i] / tirx.Cast("float32", cols) + eps), name="norm_rstd")
