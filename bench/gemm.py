"""Tensor-core GEMM benchmark: Kiln's TVM kernels vs torch's cuBLAS on the model's real shapes.

Two halves, because the GPU box has only a runtime-only TVM:
  python bench/gemm.py build --out DIR     (here: TVM + nvcc, no GPU needed)
      schedules every (variant, shape) kernel `y = (x[M,K] · W[N,K]^T in fp32).astype(dtype)`
      with a dynamic M, exports one library and compiles its CUDA source to sm_90a with nvcc.
  python bench/gemm.py run DIR [--ms 16,128,...] [--results bench/RESULTS.md]   (GPU box)
      loads it, checks every kernel against an fp32 torch reference (plus ragged Ms that are
      no multiple of any tile) and times it against torch.matmul (cuBLAS) in the same process,
      rotating input sets so that neither side runs out of L2; prints a table (also as % of the
      card's copy bandwidth, measured first: what decode-sized M should reach), and with
      --results appends it to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import hashlib
import json
import math
import os
import subprocess
import sys

SHAPES = {  # (K, N) per model: every Linear of one decoder layer, plus the LM head
    "qwen3-0.6b": [(1024, 4096), (2048, 1024), (1024, 6144), (3072, 1024), (1024, 151936)],
    "llama3.1-8b": [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 128256)],
}
MS = [16, 128, 512, 2048, 8192]
RAGGED_MS = [7, 9, 33, 333]  # correctness only: predicated tail tiles, row buckets' edges, the M ≤ 32 switch
DECODE_MS = [1, 2, 3, 4, 5, 8, 16, 32, 64, 128]  # the row-dispatch variants: each GEMV bucket's edges

# name -> (rule source, dtype, which shapes, epilogue). Kept as data so that `run` needs no TVM
# compiler to know what it is timing. Rules: MatmulWgmma (Hopper: TMA + wgmma; its defaults are
# what the model gets, run-time tile switch included), MatmulTensorCore (mma.sync) and dlight's
# LowBatchGEMV; "wgmma_main" is main's chain before the middle kernels (MIDDLE), "mid_*" their
# alternatives; "RowChain" is the whole decode dispatch the model gets (schedules/low_batch.py: GEMV
# buckets for M <= 8, then MatmulWgmma) with Kiln's StreamingGEMV or, for comparison, with dlight's
# LowBatchGEMV and the buckets main used before it. Epilogue "cast": y = acc.astype(dtype) on 2-D x[M, K]; "residual":
# y = r + acc.astype(dtype) on 3-D x[1, M, K] (the model's O / down projections); "logits": y = acc
# in fp32 (the LM head).
VARIANTS = {
    "wgmma": ("MatmulWgmma()", "bfloat16", "llama", "cast"),
    "wgmma_qwen3": ("MatmulWgmma()", "bfloat16", "qwen3", "cast"),
    "wgmma_residual": ("MatmulWgmma()", "bfloat16", "two", "residual"),
    "wgmma_logits": ("MatmulWgmma()", "bfloat16", "lm_head", "logits"),
    "wgmma_fp16": ("MatmulWgmma()", "float16", "two", "cast"),
    "wgmma_main": ("MatmulWgmma(middle=())", "bfloat16", "all", "cast"),
    "mid_nosplit": ("MatmulWgmma(middle=tuple(replace(c, ctas=0) for c in MIDDLE))", "bfloat16", "all", "cast"),
    "mid_ctas96": ("MatmulWgmma(middle=tuple(replace(c, ctas=96) for c in MIDDLE))", "bfloat16", "llama", "cast"),
    "wg256s4": ("MatmulWgmma(small=None)", "bfloat16", "llama", "cast"),
    "wg128s6": ("MatmulWgmma(WgmmaConfig(bn=128, stages=6), small=None)", "bfloat16", "llama", "cast"),
    "wg192s5": ("MatmulWgmma(WgmmaConfig(bn=192, stages=5), small=None)", "bfloat16", "llama", "cast"),
    "wg256s4_r16": ("MatmulWgmma(WgmmaConfig(raster=16), small=None)", "bfloat16", "llama", "cast"),
    "mma_sync": ("MatmulTensorCore()", "bfloat16", "llama", "cast"),
    "lowbatch": ("LowBatchGEMV()", "bfloat16", "two", "cast"),
    "gemv": ("RowChain()", "bfloat16", "all", "cast"),
    "gemv_dlight": ("RowChain(LowBatchGEMV, ((2, 2), (8, 4)))", "bfloat16", "all", "cast"),
    "gemv_residual": ("RowChain()", "bfloat16", "two", "residual"),
    "gemv16": ("RowChain(StreamingGEMV, ((2, 2), (4, 4), (8, 8), (32, 16)))", "bfloat16", "all", "cast"),
    "gemv_c4": ("RowChain(partial(StreamingGEMV, columns=4))", "bfloat16", "llama", "cast"),
    "gemv_w8c4": ("RowChain(partial(StreamingGEMV, warps=8, columns=4))", "bfloat16", "llama", "cast"),
    # Decode GEMV alone (M > 8 by dlight's plain Matmul, checked but not timed: --decode-ms 1,2,4,8):
    # the default, then tilings for the projections below copy speed (build --pdl).
    "decode": ("RowChain(large=[Matmul()])", "bfloat16", "all", "cast"),
    "tile_c1": ("RowChain(partial(StreamingGEMV, columns=1), large=[Matmul()])", "bfloat16", "mid", "cast"),
    "tile_c1u8": ("RowChain(partial(StreamingGEMV, columns=1, unroll=8), large=[Matmul()])", "bfloat16", "mid", "cast"),
    "tile_c1w8": ("RowChain(partial(StreamingGEMV, columns=1, warps=8), large=[Matmul()])", "bfloat16", "mid", "cast"),
    "tile_u8": ("RowChain(partial(StreamingGEMV, unroll=8), large=[Matmul()])", "bfloat16", "mid", "cast"),
    "tile_w8": ("RowChain(partial(StreamingGEMV, warps=8), large=[Matmul()])", "bfloat16", "mid", "cast"),
    "tile_c2u2": ("RowChain(partial(StreamingGEMV, columns=2, unroll=2), large=[Matmul()])", "bfloat16", "mid", "cast"),
}
MID_SHAPES = [(4096, 6144), (4096, 4096), (14336, 4096), (1024, 4096), (1024, 6144)]  # below copy speed at M = 1


class RowChain:
    """A rule-like view of `schedules.low_batch.dispatch_on_rows`, so `build` can treat it as one; `large`:
    the rules above the GEMV buckets (default: the model's)."""

    def __init__(self, gemv=None, limits_and_buckets=None, large=None):
        from schedules.low_batch import LIMITS_AND_BUCKETS, StreamingGEMV

        self.gemv = gemv or StreamingGEMV
        self.limits = limits_and_buckets or LIMITS_AND_BUCKETS
        self.large = large

    def apply(self, func, target, _tunable):
        import tvm
        from schedules.low_batch import dispatch_on_rows
        from schedules.pipeline import gpu_rules

        with target:
            chained = dispatch_on_rows(func, self.large or gpu_rules(target), self.gemv, self.limits)
        return None if chained is None else type("Scheduled", (), {"mod": tvm.IRModule({"main": chained})})


def kernel_name(variant: str, k: int, n: int) -> str:
    return f"{variant}_k{k}_n{n}"


def _shapes_for(which: str):
    """"all", a model prefix ("llama"), "two" (Llama 4096→4096 and 14336→4096), "lm_head" (Llama's) or "mid"
    (MID_SHAPES)."""
    if which == "mid":
        yield from MID_SHAPES
        return
    if which in ("two", "lm_head"):
        yield from [(4096, 4096), (14336, 4096)] if which == "two" else [(4096, 128256)]
        return
    for model, shapes in SHAPES.items():
        if which == "all" or model.startswith(which):
            yield from shapes


# ------------------------------------------------------------------------------------ build
def _prim_func(k: int, n: int, dtype: str, epilogue: str):
    from tvm import te, tirx

    m = tirx.Var("m", "int64")  # int64 shapes, as Relax emits them
    one = tirx.IntImm("int64", 1)
    k, n = tirx.IntImm("int64", k), tirx.IntImm("int64", n)
    w = te.placeholder((n, k), dtype, name="w")
    r = te.reduce_axis((tirx.IntImm("int64", 0), k), "k")
    if epilogue in ("cast", "logits"):
        x = te.placeholder((m, k), dtype, name="x")
        acc = te.compute((m, n), lambda i, j: te.sum(
            x[i, r].astype("float32") * w[j, r].astype("float32"), axis=r), name="NT_matmul")
        if epilogue == "logits":
            return te.create_prim_func([x, w, acc])
        y = te.compute((m, n), lambda i, j: acc[i, j].astype(dtype), name="compute")
        return te.create_prim_func([x, w, y])
    x = te.placeholder((one, m, k), dtype, name="x")
    res = te.placeholder((one, m, n), dtype, name="res")
    acc = te.compute((one, m, n), lambda b, i, j: te.sum(
        x[b, i, r].astype("float32") * w[j, r].astype("float32"), axis=r), name="NT_matmul")
    c = te.compute((one, m, n), lambda b, i, j: acc[b, i, j].astype(dtype), name="compute")
    y = te.compute((one, m, n), lambda b, i, j: res[b, i, j] + c[b, i, j], name="T_add")
    return te.create_prim_func([x, w, res, y])


def build(out: str, variants: list[str], pdl: bool = False) -> None:
    from dataclasses import replace

    import tvm
    from tvm.s_tir import dlight as dl

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from schedules.low_batch import StreamingGEMV
    from schedules.matmul_tensorcore import MatmulTensorCore
    from schedules.matmul_wgmma import MIDDLE, MatmulWgmma, WgmmaConfig

    target = tvm.target.Target("nvidia/nvidia-h100")
    funcs = {}
    chosen = {v: VARIANTS[v] for v in variants}
    for variant, (cfg, dtype, which, epilogue) in chosen.items():
        rule = eval(cfg, {"MatmulWgmma": MatmulWgmma, "WgmmaConfig": WgmmaConfig,  # noqa: S307 (our table)
                          "MIDDLE": MIDDLE, "replace": replace,
                          "MatmulTensorCore": MatmulTensorCore, "LowBatchGEMV": dl.gpu.LowBatchGEMV,
                          "RowChain": RowChain, "StreamingGEMV": StreamingGEMV, "partial": functools.partial,
                          "Matmul": dl.gpu.Matmul})
        for k, n in _shapes_for(which):
            sch = rule.apply(_prim_func(k, n, dtype, epilogue), target, False)
            assert sch is not None, f"{variant} rejected K={k} N={n}"
            name = kernel_name(variant, k, n)
            funcs[name] = sch.mod["main"]
    export_kernels(funcs, out, {"variants": chosen}, pdl=pdl)


def nvcc_fatbin(out: str, threads: int = 1) -> None:
    """`out`/kernels.cu → `out`/gemm.fatbin for sm_90a (the ptxas report in ptxas.log)."""
    subprocess.run(["nvcc", "--fatbin", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas=-v",
                    f"--split-compile={threads}", "-o", os.path.join(out, "gemm.fatbin"),
                    os.path.join(out, "kernels.cu")],
                   check=True, stderr=open(os.path.join(out, "ptxas.log"), "w"))


def export_kernels(funcs: dict, out: str, meta: dict, nvcc: bool = True, pdl: bool | str = False) -> None:
    """Scheduled PrimFuncs (name → func) → `out`/gemm.so (carrying the CUDA source), its gemm.fatbin
    unless `nvcc` is False (then `run` compiles it on the GPU box) and meta.json. `pdl`: the kernels
    as the model builds them for sm_90+ (schedules/pdl.py; a string: `launch_dependents` at that trigger),
    so back-to-back launches overlap a kernel's launch and ramp with the previous one's tail as they do in
    a decode step."""
    import tvm

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from schedules.matmul_tensorcore import TIR_PIPELINE
    from schedules.pdl import pdl_tir_pipeline

    target = tvm.target.Target("nvidia/nvidia-h100")
    funcs = {name: f.with_attr("global_symbol", name) for name, f in funcs.items()}
    pipeline = TIR_PIPELINE if not pdl else pdl_tir_pipeline(pdl) if isinstance(pdl, str) else pdl_tir_pipeline()
    with target:
        lib = tvm.tirx.build(tvm.IRModule(funcs), target=target, pipeline=pipeline)
    os.makedirs(out, exist_ok=True)
    lib.export_library(os.path.join(out, "gemm.so"))
    subprocess.run(["strip", "--strip-unneeded", os.path.join(out, "gemm.so")], check=True)
    src = lib.imports[0].inspect_source()
    if nvcc:
        with open(os.path.join(out, "kernels.cu"), "w") as f:
            f.write(src)
        nvcc_fatbin(out)
        os.remove(os.path.join(out, "kernels.cu"))
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump({"source_sha256": hashlib.sha256(src.encode()).hexdigest(), "kernels": sorted(funcs), "pdl": pdl,
                   **meta}, f)
    print(f"built {len(funcs)} kernels into {out}")


# ------------------------------------------------------------------------------------ run
def _load(out: str, compile_cuda=None):
    """The library and its meta.json. Its CUDA source → `out`/gemm.fatbin from `build`, or, where that is
    missing, from `compile_cuda(code)` (which writes it)."""
    import tvm
    import tvm_ffi

    ctypes.CDLL(os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_cuda.so"),
                mode=ctypes.RTLD_GLOBAL)
    meta = json.load(open(os.path.join(out, "meta.json")))
    fatbin = os.path.join(out, "gemm.fatbin")

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _compile(code, *_):
        assert hashlib.sha256(code.encode()).hexdigest() == meta["source_sha256"], "stale fatbin"
        if not os.path.exists(fatbin) and compile_cuda is not None:
            compile_cuda(code)
        return open(fatbin, "rb").read()

    return tvm.runtime.load_module(os.path.join(out, "gemm.so")), meta


def write_results(table: str, log: list, results: str | None, jsonl: str) -> None:
    """The full rows to $OUT/`jsonl` (GPU box), the table appended to `results`."""
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], jsonl), "w") as f:
            f.write("\n".join(log) + "\n")
    if results:
        with open(results, "a") as f:
            f.write(table + "\n")


def _time_ms(fn, sets, iters: int, repeats: int = 5, spin: bool = False) -> float:
    """Median over `repeats` of the mean time per call, cycling through the input sets. `spin`: each repeat's
    calls queued behind a ~2.5 ms spin kernel, so the host is ahead and the launch queue full as in a decode
    step (bench/quant_gemm.py's --pdl timing: overlapped launches counted once, unlike CUPTI's kernel sum)."""
    import torch

    for i in range(3):
        fn(*sets[i % len(sets)])
    torch.cuda.synchronize()
    per = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if spin:
            torch.cuda.synchronize()
            torch.cuda._sleep(5_000_000)
        start.record()
        for i in range(iters):
            fn(*sets[i % len(sets)])
        end.record()
        end.synchronize()
        per.append(start.elapsed_time(end) / iters)
    return sorted(per)[repeats // 2]


def _copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write), the floor for streaming."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _time_ms(lambda a, b: b.copy_(a), [(src, dst)], 10)
    return 2 * src.numel() / (ms * 1e-3)


def run(out: str, ms: list[int], results: str | None, command: str, decode_ms: list[int] = DECODE_MS) -> None:
    import numpy as np
    import torch
    import tvm

    lib, meta = _load(out)
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    card = torch.cuda.get_device_name(0)
    dl = tvm.runtime.from_dlpack
    rows, log = [], []
    torch.manual_seed(0)
    copy_bw = _copy_bandwidth()
    print(f"{card}: device-to-device copy {copy_bw / 1e9:.0f} GB/s", flush=True)
    for variant, (_, dtype, which, epilogue) in meta["variants"].items():
        tdt = getattr(torch, dtype)
        residual = epilogue == "residual"
        for k, n in _shapes_for(which):
            f = lib[kernel_name(variant, k, n)]
            w = torch.randn(n, k, device=dev).to(tdt) / math.sqrt(k)
            # The GEMV-style rule is only a contender (and only tolerably fast) for few rows; the
            # row-dispatch chains are timed at decode sizes.
            rule_src = meta["variants"][variant][0]
            vms = (decode_ms if rule_src.startswith("RowChain") else
                   [m for m in ms if m <= 128] if "LowBatchGEMV" in rule_src else ms)
            for m in [*RAGGED_MS, *vms]:
                # Correctness on fresh inputs, poisoned output.
                x = torch.randn(m, k, device=dev).to(tdt)
                ydt = torch.float32 if epilogue == "logits" else tdt
                y = torch.full((m, n), float("nan"), device=dev, dtype=ydt)
                if residual:
                    res = torch.randn(m, n, device=dev).to(tdt)
                    f(dl(x[None]), dl(w), dl(res[None]), dl(y[None]))
                    ref = res.float() + (x.float() @ w.float().T).to(tdt).float()
                else:
                    f(dl(x), dl(w), dl(y))
                    ref = x.float() @ w.float().T
                err = ((y.float() - ref).norm() / ref.norm()).item()
                ok = bool(np.isfinite(err) and err <= 1e-2)
                if m in RAGGED_MS or residual:
                    log.append(f"{variant} K={k} N={n} M={m} relerr={err:.2e} ok={ok}")
                    print(log[-1], flush=True)
                    continue
                set_bytes = (m * k + n * k + m * n) * x.element_size()
                nsets = max(1, min(16, math.ceil(3 * l2 / set_bytes)))
                ws = [w] + [torch.randn(n, k, device=dev).to(tdt) / math.sqrt(k)
                            for _ in range(nsets - 1)]
                xs = [x] + [torch.randn(m, k, device=dev).to(tdt) for _ in range(nsets - 1)]
                ys = [torch.empty(m, n, device=dev, dtype=ydt) for _ in range(nsets)]
                flop = 2 * m * n * k
                moved = (m * k + n * k) * x.element_size() + m * n * y.element_size()  # bytes, once each
                iters = max(5, min(200, int(2e12 / flop)))
                tvm_sets = [(dl(a), dl(b), dl(c)) for a, b, c in zip(xs, ws, ys)]
                t_k = _time_ms(f, tvm_sets, iters)
                # cuBLAS writes `dtype` (torch has no fp32-output bf16 matmul): half our bytes for logits
                outs = [c.to(tdt) for c in ys] if ydt != tdt else ys
                t_c = _time_ms(lambda a, b, c: torch.matmul(a, b.T, out=c),
                               list(zip(xs, ws, outs)), iters)
                rows.append(dict(variant=variant, dtype=dtype, k=k, n=n, m=m, err=err, ok=ok,
                                 kiln_ms=t_k, cublas_ms=t_c, kiln_tflops=flop / t_k / 1e9,
                                 cublas_tflops=flop / t_c / 1e9, ratio=t_c / t_k,
                                 copy_share=moved / (t_k * 1e-3) / copy_bw))
                log.append(json.dumps(rows[-1]))
                print(f"{variant} K={k} N={n} M={m} relerr={err:.1e} {rows[-1]['kiln_tflops']:.0f} vs "
                      f"{rows[-1]['cublas_tflops']:.0f} TFLOP/s", flush=True)
                del ws, xs, ys, tvm_sets
            torch.cuda.empty_cache()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    table = _table(rows, f"{card}, copy {copy_bw / 1e9:.0f} GB/s", stamp, command)
    print(table)
    write_results(table, log, results, "gemm_rows.jsonl")


def _table(rows, card, stamp, command) -> str:
    lines = [f"### GEMM {stamp}, {card}", "", f"`{command}`", "",
             "| variant | dtype | K→N | M | Kiln TFLOP/s | cuBLAS TFLOP/s | % cuBLAS | % copy BW | rel.err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['dtype']} | {r['k']}→{r['n']} | {r['m']} | "
                     f"{r['kiln_tflops']:.1f} | {r['cublas_tflops']:.1f} | {100 * r['ratio']:.0f}"
                     f" | {100 * r['copy_share']:.0f} | {r['err']:.1e}{'' if r['ok'] else ' FAIL'} |")
    lines += ["", "Geometric mean of % cuBLAS, Llama-3.1-8B shapes, M ≥ 512 (min in brackets):", ""]
    for v in dict.fromkeys(r["variant"] for r in rows):
        sel = [r["ratio"] for r in rows if r["variant"] == v and r["m"] >= 512
               and (r["k"], r["n"]) in map(tuple, SHAPES["llama3.1-8b"])]
        if sel:
            g = math.exp(sum(map(math.log, sel)) / len(sel))
            lines.append(f"- {v}: {100 * g:.0f}% (min {100 * min(sel):.0f}%)")
    lines += ["", "Lowest % of copy bandwidth at M = 1–8 (decode), per variant and model:", ""]
    for v in dict.fromkeys(r["variant"] for r in rows):
        for model, shapes in SHAPES.items():
            sel = [r for r in rows if r["variant"] == v and r["m"] <= 8 and (r["k"], r["n"]) in shapes]
            if sel:
                low = min(sel, key=lambda r: r["copy_share"])
                lines.append(f"- {v}, {model}: {100 * low['copy_share']:.0f}% ({low['k']}→{low['n']}, M = {low['m']})")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", required=True)
    b.add_argument("--variants", default=",".join(VARIANTS))
    b.add_argument("--pdl", action="store_true", help="build the kernels with programmatic dependent launch")
    r = sub.add_parser("run")
    r.add_argument("dir")
    r.add_argument("--ms", default=",".join(map(str, MS)))
    r.add_argument("--decode-ms", default=",".join(map(str, DECODE_MS)), help="the Ms timed for row-dispatch variants")
    r.add_argument("--results")
    a = p.parse_args()
    if a.cmd == "build":
        build(a.out, a.variants.split(","), a.pdl)
    else:
        run(a.dir, [int(x) for x in a.ms.split(",")], a.results, " ".join(sys.argv),
            [int(x) for x in a.decode_ms.split(",")])


if __name__ == "__main__":
    main()
