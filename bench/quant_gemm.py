"""Dequant-fused GEMV/GEMM benchmark on the real shapes of Llama-3.1-8B and Qwen3-0.6B.
(work in progress)"""

from __future__ import annotations

# Components of each type (docs/QUANT-LAYOUT.md): name -> (dtype, elements of K per entry)
COMPONENTS = {
    "q8_0": {"q": ("uint32", 4), "d": ("float16", 32)},
    "q4_0": {"q": ("uint32", 8), "d": ("float16", 32)},
    "q4_k": {"q": ("uint32", 8), "sc": ("uint8", 32), "m": ("uint8", 32), "d": ("float16", 256),
             "dmin": ("float16", 256)},
    "q5_k": {"q": ("uint32", 8), "qh": ("uint32", 32), "sc": ("uint8", 32), "m": ("uint8", 32),
             "d": ("float16", 256), "dmin": ("float16", 256)},
    "q6_k": {"q": ("uint32", 8), "qh": ("uint32", 16), "sc": ("int8", 16), "d": ("float16", 256)},
    "q2_k": {"q": ("uint32", 16), "sc": ("uint8", 16), "d": ("float16", 256), "dmin": ("float16", 256)},
    "q3_k": {"q": ("uint32", 16), "qh": ("uint32", 32), "sc": ("int8", 16), "d": ("float16", 256)},
}


def dequant_value(qtype: str, c: dict, n, k):
    """fp32 value of element (n, k) from component tensors `c` (te tensors or buffers)."""
    from tvm import tirx

    f32 = lambda e: e.astype("float32")  # noqa: E731
    u32 = lambda v: tirx.const(v, "uint32")  # noqa: E731

    def bits(name, b):
        per = 32 // b
        word = c[name][n, k // per]
        return (word >> (u32(b) * (k % per).astype("uint32"))) & u32(2 ** b - 1)

    if qtype == "q8_0":
        return f32(c["d"][n, k // 32]) * f32(bits("q", 8).astype("int8"))
    if qtype == "q4_0":
        return f32(c["d"][n, k // 32]) * f32(bits("q", 4).astype("int32") - 8)
    if qtype in ("q4_k", "q5_k"):
        q = bits("q", 4) if qtype == "q4_k" else bits("q", 4) | (bits("qh", 1) << u32(4))
        d, dmin = f32(c["d"][n, k // 256]), f32(c["dmin"][n, k // 256])
        return (d * f32(c["sc"][n, k // 32])) * f32(q) - dmin * f32(c["m"][n, k // 32])
    if qtype == "q6_k":
        q = (bits("q", 4) | (bits("qh", 2) << u32(4))).astype("int32") - 32
        return (f32(c["d"][n, k // 256]) * f32(c["sc"][n, k // 16])) * f32(q)
    if qtype == "q2_k":
        sc = c["sc"][n, k // 16]
        d, dmin = f32(c["d"][n, k // 256]), f32(c["dmin"][n, k // 256])
        return (d * f32(sc & tirx.const(15, "uint8"))) * f32(bits("q", 2)) - dmin * f32(sc >> tirx.const(4, "uint8"))
    if qtype == "q3_k":
        q = bits("q", 2).astype("int32") - (tirx.const(4, "int32") - bits("qh", 1).astype("int32") * 4)
        return (f32(c["d"][n, k // 256]) * f32(c["sc"][n, k // 16])) * f32(q)
    raise ValueError(qtype)


def dequant_matmul(qtype: str, k: int, n: int, dtype: str = "float16", epilogue: str = "cast", m=None):
    """The fused PrimFunc a quantized Linear becomes: dequantize (fp32) then y = x · Wᵀ (fp32
    accumulation) then the epilogue: "cast" (y.astype(dtype)), "residual" (r + cast, 3-D x) or
    "logits" (fp32 out)."""
    from tvm import te, tirx

    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731
    rows = tirx.Var("m", "int64") if m is None else i64(m)
    comps = {name: te.placeholder((i64(n), i64(k // per)), dt, name=f"w_{name}")
             for name, (dt, per) in COMPONENTS[qtype].items()}
    w = te.compute((i64(n), i64(k)), lambda j, kk: dequant_value(qtype, comps, j, kk), name="dequantize")
    r = te.reduce_axis((i64(0), i64(k)), "k")
    params = list(comps.values())
    if epilogue == "residual":
        x = te.placeholder((i64(1), rows, i64(k)), dtype, name="x")
        res = te.placeholder((i64(1), rows, i64(n)), dtype, name="res")
        acc = te.compute((i64(1), rows, i64(n)), lambda b, i, j: te.sum(
            x[b, i, r].astype("float32") * w[j, r], axis=r), name="NT_matmul")
        y = te.compute((i64(1), rows, i64(n)), lambda b, i, j: res[b, i, j] + acc[b, i, j].astype(dtype),
                       name="T_add")
        return te.create_prim_func([x, *params, res, y])
    x = te.placeholder((rows, i64(k)), dtype, name="x")
    acc = te.compute((rows, i64(n)), lambda i, j: te.sum(
        x[i, r].astype("float32") * w[j, r], axis=r), name="NT_matmul")
    if epilogue == "logits":
        return te.create_prim_func([x, *params, acc])
    y = te.compute((rows, i64(n)), lambda i, j: acc[i, j].astype(dtype), name="compute")
    return te.create_prim_func([x, *params, y])


def dequantize_func(qtype: str, k: int, n: int, dtype: str = "bfloat16"):
    """The stand-alone dequantize of prefill: W[n, k] in `dtype` from the components."""
    from tvm import te, tirx

    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731
    comps = {name: te.placeholder((i64(n), i64(k // per)), dt, name=f"w_{name}")
             for name, (dt, per) in COMPONENTS[qtype].items()}
    w = te.compute((i64(n), i64(k)), lambda j, kk: dequant_value(qtype, comps, j, kk).astype(dtype),
                   name="dequantize")
    return te.create_prim_func([*comps.values(), w])
