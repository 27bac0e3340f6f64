"""Quantized GEMV/GEMM benchmark: Kiln's kernels on packed weights vs copy bandwidth and bf16 cuBLAS.

Two halves, as bench/gemm.py (the GPU box has only a runtime-only TVM):
  python bench/quant_gemm.py build --out DIR   (here: TVM + nvcc)
      for Q4_K, Q6_K and Q8_0 and every Linear shape of Llama-3.1-8B and Qwen3-0.6B: the
      dequant-fused GEMV (QuantGemv, dynamic M, the model's epilogue), the stand-alone dequantize
      kernel (QuantDequantize, bf16) and the bf16 wgmma GEMM (MatmulWgmma) that follows it in prefill.
  python bench/quant_gemm.py run DIR [--results bench/RESULTS.md]   (GPU box)
      random packed components on the GPU (random code words, fp16 scales of realistic size); every
      GEMV variant checked at M = 1, 3, 8, 33 against a torch fp32 dequantize-then-matmul reference
      before any timing; then GEMV at M = 1, 2, 4, 8 as % of the measured copy bandwidth
      counting the packed bytes (CUPTI's kernel time and back to back behind a spin kernel; a --pdl
      build back to back only), and
      dequantize + GEMM at M = 128, 512, 2048 as % of torch.matmul (cuBLAS, bf16) in the same run;
      rotating input sets of >= 3x L2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

QTYPES = ["q4_k", "q6_k", "q8_0"]
GEMV_MS = [1, 2, 4, 8]
GEMM_MS = [128, 512, 2048]
CHECK_MS = [1, 3, 8, 33]  # checked before any timing: each branch of the M chain, rows past a tile
NORM_EPS = 1e-5  # the norm-carrying variants' RMSNorm epsilon (Llama-3.1-8B's)


def dequant_matmul(qtype: str, k: int, n: int, dtype: str = "bfloat16", epilogue: str = "cast",
                   byte_perm: bool = False, norm: bool = False):
    """The PrimFunc a quantized Linear becomes in decode: y = x · Wᵀ accumulated in fp32 over a dynamic row
    count with the group scales factored out (formats/quant_values.py's dequantize_matmul_te, as
    schedules/quant_fusion.py makes it; `byte_perm` as it does for CUDA), then the epilogue: "cast"
    (y.astype(dtype)), "residual" (r + cast, 3-D x), "cast_residual" (the decode model's own form of it:
    x [M, 1, K], the cast a block of its own before the add) or "logits" (fp32 out). `norm` ("cast" and
    "logits"): rms_norm(x, γ) · Wᵀ, the RMSNorm carried by the GEMV (schedules/norm_gemv.py), γ after x."""
    from tvm import te, tirx

    from formats.quant_values import dequantize_matmul_te
    from model_defs.quant import component_shapes

    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731
    rows = tirx.Var("m", "int64")
    comps = [te.placeholder(shape, dt, f"w_{name}") for name, (shape, dt) in component_shapes(qtype, n, k).items()]

    if epilogue == "residual":
        x = te.placeholder((i64(1), rows, i64(k)), dtype, name="x")
        res = te.placeholder((i64(1), rows, i64(n)), dtype, name="res")
        acc = dequantize_matmul_te(qtype, x, comps, byte_perm)
        y = te.compute((i64(1), rows, i64(n)), lambda b, i, j: res[b, i, j] + acc[b, i, j].astype(dtype),
                       name="T_add")
        return te.create_prim_func([x, *comps, res, y])
    if epilogue == "cast_residual":
        x = te.placeholder((rows, i64(1), i64(k)), dtype, name="x")
        res = te.placeholder((rows, i64(1), i64(n)), dtype, name="res")
        acc = dequantize_matmul_te(qtype, x, comps, byte_perm)
        cast = te.compute((rows, i64(1), i64(n)), lambda i, o, j: acc[i, o, j].astype(dtype), name="compute")
        y = te.compute((rows, i64(1), i64(n)), lambda i, o, j: res[i, o, j] + cast[i, o, j], name="T_add")
        return te.create_prim_func([x, *comps, res, y])
    x = te.placeholder((rows, i64(k)), dtype, name="x")
    gamma = [te.placeholder((i64(k),), dtype, name="gamma")] if norm else []
    acc = dequantize_matmul_te(qtype, x, comps, byte_perm, (gamma[0], NORM_EPS) if norm else None)
    if epilogue == "logits":
        return te.create_prim_func([x, *gamma, *comps, acc])
    y = te.compute((rows, i64(n)), lambda i, j: acc[i, j].astype(dtype), name="compute")
    return te.create_prim_func([x, *gamma, *comps, y])


def dequantize_func(qtype: str, k: int, n: int, dtype: str = "bfloat16"):
    """Prefill's stand-alone dequantize PrimFunc (model_defs/quant.py's): W[n, k] in `dtype`."""
    from tvm import te

    from model_defs.quant import component_shapes, dequantize_te

    comps = [te.placeholder(shape, dt, f"w_{name}") for name, (shape, dt) in component_shapes(qtype, n, k).items()]
    return te.create_prim_func([*comps, dequantize_te(qtype, comps, k, dtype)])


def _epilogue(model: str, index: int, n_shapes: int) -> str:
    """The model's epilogue per Linear: O and down projections add the residual, the LM head
    writes fp32 logits, the rest cast."""
    return "logits" if index == n_shapes - 1 else "residual" if index in (1, 3) else "cast"


SPLIT_KV = {"llama3.1-8b-kv": [(4096, 1024)]}  # k_proj / v_proj apart: a *_K_M layer whose attn_v type differs
MIX = [  # (count, type, (K, N)) of a Llama-3.1-8B Q4_K_M-like decode step (compile/quant_mix.py): 16 of the 32
    (16, "q4_k", (4096, 6144)),  # layers have attn_v and ffn_down in Q6_K, so their q, k, v run apart; the
    (16, "q4_k", (4096, 4096)),  # LM head is Q6_K. q_proj as O's shape; 129 Q4_K tensors with the embedding
    (16, "q4_k", (4096, 1024)),
    (16, "q6_k", (4096, 1024)),
    (32, "q4_k", (4096, 4096)),
    (32, "q4_k", (4096, 28672)),
    (16, "q4_k", (14336, 4096)),
    (16, "q6_k", (14336, 4096)),
    (1, "q6_k", (4096, 128256)),
]


def _cases(models: str = ""):
    """(model, K, N, epilogue) of every Linear shape, of the models whose name starts with `models`."""
    from bench.gemm import SHAPES

    for model, shapes in SHAPES.items():
        if not model.startswith(models):
            continue
        for index, (k, n) in enumerate(shapes):
            yield model, k, n, _epilogue(model, index, len(shapes))
    for model, shapes in SPLIT_KV.items():
        if model.startswith(models):
            yield from ((model, k, n, "cast") for k, n in shapes)


# ------------------------------------------------------------------------------------ build
def build(out: str, variants: dict, gemv_only: bool = False, nvcc: bool = True, models: str = "",
          pdl: str | None = None) -> None:
    import tvm

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.gemm import _prim_func, export_kernels
    from schedules.matmul_wgmma import MatmulWgmma
    from schedules.quant_dequantize import QuantDequantize
    from schedules.pdl import DEFAULT_TRIGGER
    from schedules.quant_gemv import QuantGemv, QuantGemvConfig

    target = tvm.target.Target("nvidia/nvidia-h100")
    funcs = {}
    for _, k, n, epilogue in _cases(models):
        if not gemv_only:
            sch = MatmulWgmma().apply(_prim_func(k, n, "bfloat16", "cast"), target, False)
            funcs[f"gemm_k{k}_n{n}"] = sch.mod["main"]
        for qtype in QTYPES:
            if not gemv_only:
                funcs[f"deq_{qtype}_k{k}_n{n}"] = QuantDequantize().kernel(dequantize_func(qtype, k, n))
            for name, cfg in variants.items():
                tiling = {f: v for f, v in cfg.items() if f != "norm"}
                if cfg.get("norm") and epilogue != "cast":
                    continue  # an RMSNorm feeds QKV, its parts and gate/up only
                f = QuantGemv(QuantGemvConfig(**tiling) if tiling else None).kernel(
                    dequant_matmul(qtype, k, n, "bfloat16", epilogue, byte_perm=True, norm=bool(cfg.get("norm"))))
                assert f is not None, (name, qtype, k, n)
                funcs[f"{name}_{qtype}_k{k}_n{n}"] = f
    export_kernels(funcs, out, {"variants": variants, "gemv_only": gemv_only, "weight_dtype": "float32"}, nvcc,
                   DEFAULT_TRIGGER if pdl == "default" else pdl)


# ------------------------------------------------------------------------------------ run
def random_components(qtype: str, n: int, k: int, gen):
    """Random code words and realistic scales (fp16 d ~ 1e-3, 6-bit sc/m, int8 Q6_K scales)."""
    import torch

    dev = "cuda"
    comps = {}
    from formats.quant_layout import QUANT_TYPES  # (model_defs needs TVM's compiler; the GPU box has none)

    t = QUANT_TYPES[qtype]
    for name, shape in t.shapes(n, k).items():
        dt = t.components[name].dtype
        if dt == "uint32":
            comps[name] = torch.randint(-2**31, 2**31, shape, dtype=torch.int32, device=dev, generator=gen)
        elif dt == "float16":
            comps[name] = (torch.rand(shape, device=dev, generator=gen) * 2e-3 + 5e-4).half()
        elif dt == "uint8":
            comps[name] = torch.randint(0, 64, shape, dtype=torch.uint8, device=dev, generator=gen)
        else:  # int8 scales of Q6_K (−128..127 in GGUF; most within ±64)
            comps[name] = torch.randint(-64, 64, shape, dtype=torch.int8, device=dev, generator=gen)
    return comps


def torch_dequantize(qtype: str, c: dict, n: int, k: int):
    """fp32 W[n, k] from the components, per docs/QUANT-LAYOUT.md (the reference)."""
    import torch

    def bits(name, b):
        per = 32 // b
        words = c[name].repeat_interleave(per, dim=1)  # int32 view of the uint32 words
        shift = (torch.arange(k, device=words.device) % per) * b
        return (words >> shift) & (2 ** b - 1)

    def per_k(name, group):
        return c[name].float().repeat_interleave(group, dim=1)

    if qtype == "q8_0":
        q = bits("q", 8)
        return per_k("d", 32) * torch.where(q >= 128, q - 256, q).float()
    if qtype == "q4_k":
        return (per_k("d", 256) * per_k("sc", 32)) * bits("q", 4).float() - per_k("dmin", 256) * per_k("m", 32)
    if qtype == "q6_k":
        q = (bits("q", 4) | (bits("qh", 2) << 4)) - 32
        return (per_k("d", 256) * per_k("sc", 16)) * q.float()
    raise ValueError(qtype)


def _tvm_args(comps: dict) -> list:
    """The components as TVM tensors: the code words (int32 in torch, for the reference's shifts) as uint32."""
    import torch
    import tvm

    return [tvm.runtime.from_dlpack(t.view(torch.uint32) if t.dtype == torch.int32 else t) for t in comps.values()]


def _kernel_ms(fn, sets, iters: int) -> float:
    """GPU time per call from CUPTI (torch's profiler): a GEMV takes a few µs, less than the Python
    launch of the call, so wall-clock timing would measure the host. Cycles through the sets."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for i in range(3):
        fn(*sets[i % len(sets)])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(iters):
            fn(*sets[i % len(sets)])
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages() if e.device_time_total > 0) / iters / 1e3


def _as_dtype(w, dtype: str):
    """fp32 `w` rounded to `dtype` as the fused GEMV's dequantized weight is, back in fp32."""
    import torch

    return w.to(getattr(torch, dtype)).float()


def _gemv_check(f, epilogue: str, x, args: list, w_model, n: int, gamma=None):
    """One call of GEMV `f` on a NaN-poisoned output against torch: (y, args_of, rel.err, ok), where
    `args_of(x, args, y)` is the call's TVM argument list (torch tensors converted). With `gamma` (a
    norm-carrying variant, "cast" epilogue) the reference is rms_norm(x, γ) in fp32 times Wᵀ, γ passed after x."""
    import torch
    import tvm

    dl, dev, m = tvm.runtime.from_dlpack, x.device, x.shape[0]
    if gamma is not None:
        xf = x.float()
        ref = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + NORM_EPS) * gamma.float()) @ w_model.T
        y = torch.full((m, n), float("nan"), device=dev, dtype=torch.bfloat16)
        args_of = lambda xx, a, yy, g=gamma: [dl(xx), dl(g), *a, dl(yy)]  # noqa: E731
        f(*args_of(x, args, y))
        err = ((y.float() - ref).norm() / ref.norm()).item()
        return y, args_of, err, bool(math.isfinite(err) and err <= 1e-2)
    ref = x.float() @ w_model.T
    if epilogue == "logits":
        y = torch.full((m, n), float("nan"), device=dev)
        args_of = lambda xx, a, yy: [dl(xx), *a, dl(yy)]  # noqa: E731
    elif epilogue == "residual":
        res = torch.randn(m, n, device=dev).to(torch.bfloat16)
        ref = res.float() + ref.to(torch.bfloat16).float()
        y = torch.full((m, n), float("nan"), device=dev, dtype=torch.bfloat16)
        args_of = lambda xx, a, yy, r=res: [dl(xx[None]), *a, dl(r[None]), dl(yy[None])]  # noqa: E731
    else:
        y = torch.full((m, n), float("nan"), device=dev, dtype=torch.bfloat16)
        args_of = lambda xx, a, yy: [dl(xx), *a, dl(yy)]  # noqa: E731
    f(*args_of(x, args, y))
    err = ((y.float() - ref).norm() / ref.norm()).item()
    return y, args_of, err, bool(math.isfinite(err) and err <= (1e-4 if epilogue == "logits" else 1e-2))


def _load(out: str):
    """bench/gemm.py's loader; a --no-nvcc build's CUDA source goes through nvcc here, on all cores."""
    from bench.gemm import _load as load_library, nvcc_fatbin

    def compile_cuda(code):
        with open(os.path.join(out, "kernels.cu"), "w") as f:
            f.write(code)
        nvcc_fatbin(out, os.cpu_count() or 1)

    return load_library(out, compile_cuda)


def run(out: str, results: str | None, command: str, models: str = "", ms: tuple = tuple(GEMV_MS),
        variants: tuple = ()) -> None:
    import torch
    import tvm

    from bench.gemm import _time_ms, write_results

    lib, meta = _load(out)
    norms = {v for v, cfg in meta["variants"].items() if cfg.get("norm")}  # variants that carry an RMSNorm
    meta["variants"] = [v for v in meta["variants"] if not variants or v in variants]  # those asked for
    dl = tvm.runtime.from_dlpack
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(0)
    l2, card = props.L2_cache_size, torch.cuda.get_device_name(0)
    big = torch.empty(2 ** 30, dtype=torch.uint8, device=dev)
    big2 = torch.empty_like(big)
    copy_gbs = 2 * big.numel() / _time_ms(lambda a, b: b.copy_(a), [(big, big2)], 20) / 1e6
    del big, big2
    print(f"{card}: copy {copy_gbs:.0f} GB/s (read + write)", flush=True)
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    rows, log = [], []
    full = not meta.get("gemv_only")  # else no dequantize / GEMM kernels in this build
    pdl = bool(meta.get("pdl"))  # kernels built with programmatic dependent launch: timed back to back only
    weight_dtype = meta.get("weight_dtype", "bfloat16")  # the fused GEMV's dequantized weight
    failed = 0
    for model, k, n, epilogue in _cases(models):  # every GEMV checked before any is timed
        for qtype in QTYPES:
            if not any(name.endswith(f"_{qtype}_k{k}_n{n}") for name in meta["kernels"]):
                continue
            comps = random_components(qtype, n, k, gen)
            w_model = _as_dtype(torch_dequantize(qtype, comps, n, k), weight_dtype)
            args = _tvm_args(comps)
            gamma = (1 + 0.2 * torch.randn(k, device=dev, generator=gen)).to(torch.bfloat16)
            for variant in meta["variants"]:
                if f"{variant}_{qtype}_k{k}_n{n}" not in meta["kernels"]:
                    continue  # a norm variant at a shape no norm feeds
                for m in CHECK_MS:
                    x = torch.randn(m, k, device=dev).to(torch.bfloat16)
                    *_, err, ok = _gemv_check(lib[f"{variant}_{qtype}_k{k}_n{n}"], epilogue, x, args, w_model, n,
                                              gamma if variant in norms else None)
                    failed += not ok
                    log.append(f"check {variant} {qtype} {k}->{n} M={m} relerr={err:.1e} ok={ok}")
                    print(log[-1], flush=True)
            del comps, w_model, args
    print(f"checks: {failed} failed", flush=True)
    for model, k, n, epilogue in _cases(models):
        for qtype in QTYPES:
            if not any(name.endswith(f"_{qtype}_k{k}_n{n}") for name in meta["kernels"]):
                continue  # a build of some shapes only
            comps = random_components(qtype, n, k, gen)
            packed = sum(t.numel() * t.element_size() for t in comps.values())
            w = torch_dequantize(qtype, comps, n, k)
            w_model = _as_dtype(w, weight_dtype)
            args = _tvm_args(comps)
            per_set = packed + (2 * n * k if full else 0)  # bytes a set brings through L2 (+ the bf16 weight)
            nsets = max(2, min(16, math.ceil(3 * l2 / per_set)))
            sets = [comps] + [random_components(qtype, n, k, gen) for _ in range(nsets - 1)]
            set_args = [_tvm_args(s) for s in sets]
            gamma = (1 + 0.2 * torch.randn(k, device=dev, generator=gen)).to(torch.bfloat16)
            buf = lambda: torch.empty(packed, dtype=torch.uint8, device=dev)  # noqa: E731
            copies = [(buf(), buf()) for _ in range(nsets)]  # the card's own copy of these bytes: fixed costs included
            copy_same = 2 * packed / _time_ms(lambda a, b: b.copy_(a), copies, 200, repeats=3, spin=True) / 1e6 / copy_gbs
            del copies
            print(f"copy of {packed / 1e6:.1f} MB back to back: {100 * copy_same:.0f}% of the 1 GiB copy", flush=True)
            for variant in meta["variants"]:
                if f"{variant}_{qtype}_k{k}_n{n}" not in meta["kernels"]:
                    continue
                f = lib[f"{variant}_{qtype}_k{k}_n{n}"]
                for m in ms:
                    x = torch.randn(m, k, device=dev).to(torch.bfloat16)
                    y, args_of, err, ok = _gemv_check(f, epilogue, x, args, w_model, n,
                                                      gamma if variant in norms else None)
                    xs = [torch.randn(m, k, device=dev).to(torch.bfloat16) for _ in range(nsets)]
                    ys = [torch.empty_like(y) for _ in range(nsets)]
                    calls = [args_of(*a) for a in zip(xs, set_args, ys)]  # converted once, outside the timing
                    t_q = _time_ms(f, calls, 200, repeats=3, spin=True)  # back to back, as in a step
                    t_k = t_q if pdl else _kernel_ms(f, calls, 100)  # CUPTI would count PDL's overlap twice
                    rows.append(dict(kind="gemv", variant=variant, qtype=qtype, model=model, k=k, n=n, m=m,
                                     err=err, ok=ok, ms=t_k, gbs=packed / t_k / 1e6,
                                     pct=packed / t_k / 1e6 / copy_gbs, ms_b2b=t_q, pct_b2b=packed / t_q / 1e6 / copy_gbs,
                                     pdl=pdl, copy_same=copy_same))
                    log.append(json.dumps(rows[-1]))
                    print(f"{variant} {qtype} {k}->{n} M={m} {t_k * 1e3:.1f} us {100 * rows[-1]['pct']:.0f}% copy BW, "
                          f"back to back {t_q * 1e3:.1f} us {100 * rows[-1]['pct_b2b']:.0f}% relerr={err:.1e}", flush=True)
            if full:  # dequantize kernel (bit-exact bf16 of the fp32 reference), then the GEMM
                deq, gemm = lib[f"deq_{qtype}_k{k}_n{n}"], lib[f"gemm_k{k}_n{n}"]
                wb = torch.full((n, k), float("nan"), device=dev, dtype=torch.bfloat16)
                deq(*args, dl(wb))
                deq_ok = bool(torch.equal(wb, w.to(torch.bfloat16)))
                log.append(f"dequantize {qtype} {k}->{n} bit-exact={deq_ok}")
                print(log[-1], flush=True)
                outs = [torch.empty(n, k, device=dev, dtype=torch.bfloat16) for _ in range(nsets)]
                t_deq = _kernel_ms(lambda a, o: deq(*a, dl(o)), list(zip(set_args, outs)), 20)
                deq_gbs = (packed + 2 * n * k) / t_deq / 1e6
                for m in GEMM_MS:
                    x = torch.randn(m, k, device=dev).to(torch.bfloat16)
                    y = torch.full((m, n), float("nan"), device=dev, dtype=torch.bfloat16)
                    deq(*args, dl(wb))
                    gemm(dl(x), dl(wb), dl(y))
                    ref = x.float() @ w.T
                    err = ((y.float() - ref).norm() / ref.norm()).item()
                    ok = bool(math.isfinite(err) and err <= 1e-2)
                    xs = [torch.randn(m, k, device=dev).to(torch.bfloat16) for _ in range(nsets)]
                    ys = [torch.empty(m, n, device=dev, dtype=torch.bfloat16) for _ in range(nsets)]
                    t_g = _kernel_ms(lambda xx, o, yy: gemm(dl(xx), dl(o), dl(yy)), list(zip(xs, outs, ys)), 20)
                    t_c = _kernel_ms(lambda xx, o, yy: torch.matmul(xx, o.T, out=yy), list(zip(xs, outs, ys)), 20)
                    rows.append(dict(kind="gemm", qtype=qtype, model=model, k=k, n=n, m=m, err=err, ok=ok,
                                     deq_ms=t_deq, gemm_ms=t_g, cublas_ms=t_c, ratio=t_c / (t_deq + t_g),
                                     deq_pct=deq_gbs / copy_gbs, deq_ok=deq_ok))
                    log.append(json.dumps(rows[-1]))
                    print(f"gemm {qtype} {k}->{n} M={m} deq {t_deq * 1e3:.0f} us ({100 * deq_gbs / copy_gbs:.0f}% "
                          f"copy) + gemm {t_g * 1e3:.0f} us vs cuBLAS {t_c * 1e3:.0f} us: "
                          f"{100 * rows[-1]['ratio']:.0f}% relerr={err:.1e}", flush=True)
                del outs, wb
            del sets, set_args, comps, w, w_model
            torch.cuda.empty_cache()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    table = _table(rows, card, copy_gbs, stamp, command)
    print(table)
    write_results(table, log, results, f"quant_gemm_rows_{os.path.basename(os.path.normpath(out))}.jsonl")


LAYERS = {"qwen3-0.6b": 28, "llama3.1-8b": 32}  # decoder layers: each layer's Linears run that often per step


def _decode_step(rows, variant: str, qtype: str, model: str, m: int):
    """(ms, GB/s) of the GEMVs of one decode step (every layer's Linears, then the LM head) at `m` rows
    with this variant and type throughout, or None if a shape is missing."""
    sel = {(r["k"], r["n"]): r for r in rows if r["kind"] == "gemv" and r["variant"] == variant
           and r["qtype"] == qtype and r["model"] == model and r["m"] == m}
    from bench.gemm import SHAPES

    if any(shape not in sel for shape in SHAPES[model]):
        return None
    times = [(LAYERS[model] if i < len(SHAPES[model]) - 1 else 1, sel[shape]) for i, shape in enumerate(SHAPES[model])]
    ms = sum(count * r["ms"] for count, r in times)
    return ms, sum(count * r["gbs"] * r["ms"] for count, r in times) / ms


def _mix_step(rows, variant: str, m: int):
    """(ms, GB/s) of the GEMVs of one Q4_K_M-like Llama-3.1-8B decode step (MIX) at `m` rows, or None."""
    sel = {(r["qtype"], r["k"], r["n"]): r for r in rows if r["kind"] == "gemv" and r["variant"] == variant
           and r["m"] == m}
    if any((qtype, *shape) not in sel for _, qtype, shape in MIX):
        return None
    times = [(count, sel[(qtype, *shape)]) for count, qtype, shape in MIX]
    ms = sum(count * r["ms"] for count, r in times)
    return ms, sum(count * r["gbs"] * r["ms"] for count, r in times) / ms


def _table(rows, card, copy_gbs, stamp, command) -> str:
    lines = [f"### Quantized GEMV / GEMM {stamp}, {card}, copy {copy_gbs:.0f} GB/s", "", f"`{command}`", "",
             "GEMV (dequant fused), % of copy bandwidth counting the packed bytes read:", "",
             "| variant | type | model | K→N | M | µs | GB/s | % copy | back to back µs | % | a copy of the same bytes, "
             "back to back, % | rel.err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "gemv"):
        lines.append(f"| {r['variant']} | {r['qtype']} | {r['model']} | {r['k']}→{r['n']} | {r['m']} | "
                     f"{r['ms'] * 1e3:.1f} | {r['gbs']:.0f} | {100 * r['pct']:.0f} | {r['ms_b2b'] * 1e3:.1f} | "
                     f"{100 * r['pct_b2b']:.0f} | {100 * r['copy_same']:.0f} | {r['err']:.1e}{'' if r['ok'] else ' FAIL'} |")
    lines += ["", "Prefill: dequantize (bf16) + wgmma GEMM vs cuBLAS bf16 on the same weights:", "",
              "| type | model | K→N | M | dequant µs (% copy) | GEMM µs | cuBLAS µs | % cuBLAS | rel.err |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "gemm"):
        lines.append(f"| {r['qtype']} | {r['model']} | {r['k']}→{r['n']} | {r['m']} | {r['deq_ms'] * 1e3:.0f} "
                     f"({100 * r['deq_pct']:.0f}%{'' if r['deq_ok'] else ' NOT EXACT'}) | {r['gemm_ms'] * 1e3:.0f} | "
                     f"{r['cublas_ms'] * 1e3:.0f} | {100 * r['ratio']:.0f} | {r['err']:.1e}{'' if r['ok'] else ' FAIL'} |")
    lines += ["", "Llama-3.1-8B shapes: GEMV at M = 1 (min % copy), GEMM at M ≥ 512 (geomean % cuBLAS):", ""]
    for qtype in QTYPES:
        for v in dict.fromkeys(r["variant"] for r in rows if r["kind"] == "gemv"):
            sel = [r["pct"] for r in rows if r["kind"] == "gemv" and r["variant"] == v and r["qtype"] == qtype
                   and r["model"] == "llama3.1-8b" and r["m"] == 1]
            if sel:
                step = _decode_step(rows, v, qtype, "llama3.1-8b", 1)
                lines.append(f"- {qtype} GEMV {v}: min {100 * min(sel):.0f}%, mean {100 * sum(sel) / len(sel):.0f}%"
                             + (f"; decode step ({LAYERS['llama3.1-8b']} layers + LM head) {step[0]:.2f} ms at "
                                f"{100 * step[1] / copy_gbs:.0f}% copy" if step else ""))
        sel = [r["ratio"] for r in rows if r["kind"] == "gemm" and r["qtype"] == qtype
               and r["model"].startswith("llama") and r["m"] >= 512]
        if sel:
            lines.append(f"- {qtype} GEMM: {100 * math.exp(sum(map(math.log, sel)) / len(sel)):.0f}%")
    gemv = [r for r in rows if r["kind"] == "gemv"]
    if len({r["variant"] for r in gemv}) > 2:
        lines += ["", "Best variant per shape (back-to-back % copy; the first variant's beside it):", "",
                  "| type | K→N | M | best | % | runner-up | % | first | % |", "|---|---|---|---|---|---|---|---|---|"]
        first = gemv[0]["variant"]
        for key in dict.fromkeys((r["qtype"], r["k"], r["n"], r["m"]) for r in gemv):
            sel = sorted((r for r in gemv if (r["qtype"], r["k"], r["n"], r["m"]) == key and r["ok"]),
                         key=lambda r: -r["pct_b2b"])
            own = [f"{100 * r['pct_b2b']:.0f}" for r in sel if r["variant"] == first] or ["–"]
            if sel:
                two = sel[1] if len(sel) > 1 else sel[0]
                lines.append(f"| {key[0]} | {key[1]}→{key[2]} | {key[3]} | {sel[0]['variant']} | "
                             f"{100 * sel[0]['pct_b2b']:.0f} | {two['variant']} | {100 * two['pct_b2b']:.0f} | {first} | "
                             f"{own[0]} |")
    for v in dict.fromkeys(r["variant"] for r in rows if r["kind"] == "gemv"):
        for m in sorted({r["m"] for r in rows if r["kind"] == "gemv"}):
            step = _mix_step(rows, v, m)
            if step:
                lines.append(f"- Q4_K_M-like decode step (129 Q4_K + 33 Q6_K tensors) {v}, M = {m}: {step[0]:.3f} ms "
                             f"at {100 * step[1] / copy_gbs:.0f}% copy")
    return "\n".join(lines) + "\n"


VARIANTS = {  # name -> QuantGemvConfig fields (none: the per-shape rule, QuantGemv())
    "gemv": {},
    "gemv_one": {"m_tiles": (1, 4, 8)},  # the one tiling every shape had before the rule (main up to 2026-12-06)
    "gemv_u2": {"unroll": 2},
    "gemv_u2_m1": {"unroll": 2, "m_tiles": (1,)},  # M = 1's kernel only (every M runs it): a small build
    "gemv_t8r1": {"row_threads": 8, "rows_per_thread": 1},
    "gemv_r4": {"rows_per_thread": 4},  # 4 rows a thread share x and Σx
    "gemv_r4u2_m1": {"rows_per_thread": 4, "unroll": 2, "m_tiles": (1,)},
    "gemv_l64_m1": {"lanes": 64, "m_tiles": (1,)},  # split-K over two warps: twice the loads in flight
    "gemv_norm": {"norm": True},  # the per-shape rule carrying the RMSNorm before it (QKV, gate/up): --fuse_norms
}
# The tiling sweep: one M tile's kernel alone (every M runs it), lanes × row threads × rows a thread × unroll,
# named l<lanes>t<row_threads>r<rows_per_thread>u<unroll>_m<tile>
SWEEP_TILINGS = [(32, 4, 2, 1), (32, 4, 2, 2), (32, 4, 2, 4), (32, 2, 2, 1), (32, 2, 2, 2), (32, 2, 2, 4),
                 (32, 4, 1, 1), (32, 4, 1, 2), (32, 4, 1, 4), (32, 8, 1, 2), (32, 4, 4, 1), (32, 2, 4, 1),
                 (32, 1, 4, 1), (32, 2, 4, 2), (32, 2, 8, 1), (64, 2, 2, 1), (64, 1, 2, 2), (64, 2, 1, 1),
                 (64, 2, 4, 1), (128, 1, 2, 1), (128, 1, 4, 1), (128, 1, 1, 2)]
for _tile in (1, 4, 8):
    VARIANTS.update({f"l{l}t{t}r{r}u{u}_m{_tile}": {"lanes": l, "row_threads": t, "rows_per_thread": r, "unroll": u,
                                                   "m_tiles": (_tile,)} for l, t, r, u in SWEEP_TILINGS})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", required=True)
    b.add_argument("--variants", default=",".join(v for v in VARIANTS if v.startswith("gemv")),
                   help="comma-separated names of VARIANTS (the sweep's too: l32t4r2u1_m1, ...)")
    b.add_argument("--gemv-only", action="store_true", help="only the GEMV variants (no dequantize / GEMM)")
    b.add_argument("--no-nvcc", action="store_true", help="leave nvcc to `run` (on the GPU box, all its cores)")
    b.add_argument("--models", default="", help="only the shapes of models whose name starts with this")
    b.add_argument("--pdl", nargs="?", const="default", help="build the kernels with programmatic dependent "
                   "launch, `launch_dependents` where given (schedules/pdl.py's TRIGGERS)")
    r = sub.add_parser("run")
    r.add_argument("dir")
    r.add_argument("--results")
    r.add_argument("--models", default="", help="only the shapes of models whose name starts with this")
    r.add_argument("--ms", default=",".join(map(str, GEMV_MS)), help="the GEMV row counts timed")
    r.add_argument("--variants", default="", help="only these of the build's GEMV variants (comma-separated)")
    a = p.parse_args()
    if a.cmd == "build":
        build(a.out, {v: VARIANTS[v] for v in a.variants.split(",")}, a.gemv_only, not a.no_nvcc, a.models, a.pdl)
    else:
        run(a.dir, a.results, " ".join(sys.argv), a.models, tuple(int(m) for m in a.ms.split(",")),
            tuple(v for v in a.variants.split(",") if v))


if __name__ == "__main__":
    main()
