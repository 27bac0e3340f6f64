"""Paged-attention kernels: correctness vs float32 and timing, Kiln kernels vs TVM's and torch.

Two steps, because the GPU machine has no TVM compiler:
  python bench/attention.py build --out .gpu/attn          # here: kernels -> kernels.so (CUDA source)
  python attention.py run --lib .gpu/attn/kernels.so --out $OUT   # GPU: nvcc at load, check, time
  (run --what decode --kernels A,B: only those decode kernels; a library built from another commit
  runs under this script too, e.g. main's kernel against a branch's in one call)

Decode at the short contexts of a decode step (b = 1, 4, 16 x 128-1,024 tokens, and b = 16, 64 x 8k as the guard):
  python bench/attention.py build --out DIR --only kiln_decode_paged_kv --variants p2,ar,...  [--pdl]
  python attention.py run --lib DIR/kernels.so --what short      # every built decode kernel, checked, then timed
(--variants: names of schedules/attention's DECODE_VARIANTS, built as kiln_decode_paged_kv_<name>; where nvcc is
here the library carries its sm_90a binary, so nothing compiles at load. --pdl: the kernels as the model builds them
for sm_90+, so back-to-back calls overlap a launch with the previous call's tail.)

One Llama-3.1-8B attention layer: 32 query heads, 8 KV heads, head_dim 128, bf16, page size 16.
Decode is timed against the measured device-to-device copy bandwidth (bytes of K and V read),
prefill against torch SDPA (bf16, causal) in the same run. L2 is flushed before every timed call.
"""

import argparse
import itertools
import json
import os
import sys
import time

H_QO, H_KV, D, PAGE = 32, 8, 128, 16
DTYPE = "bfloat16"
DECODE_SHAPES = [(b, c) for b in (1, 16, 64) for c in (1024, 8192, 32768)]
SHORT_SHAPES = [(b, c) for b in (1, 4, 16) for c in (128, 256, 512, 1024)] + [(16, 8192), (64, 8192)]
PREFILL_LENS = (1024, 4096, 16384)
PAGED_TIMING = (1024, 15360)  # (new tokens, cached tokens) of the timed paged prefill
DECODE_KERNELS = ("kiln_decode_paged_kv", "kiln_decode_paged_kv_v3", "kiln_decode_paged_kv_s5", "kiln_decode_paged_kv_m8",
                  "kiln_decode_paged_kv_m32", "tvm_decode")
METAL_DECODE = "kiln_metal_decode_paged_kv"  # Metal-form kernels, compiled for CUDA: checked, timed for reference


def build(out_dir, only=None, variants=None, pdl=False):
    """Compile every kernel (or those whose names start with one of ``only``) into one library: CUDA source
    the GPU machine compiles at load, or, where nvcc is here, with its sm_90a binary. ``variants``:
    comma-separated DECODE_VARIANTS names to build beside the decode kernel (default: the four of
    DEFAULT_BENCH_VARIANTS). ``pdl``: with programmatic dependent launch, as the model's kernels on sm_90+."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import tvm
    from tvm.relax.frontend.nn.llm import kv_cache as tvm_kv

    from compile.cuda_aot import enable_cuda_binaries, nvcc_available
    from schedules.attention import DECODE_VARIANTS, DEFAULT_BENCH_VARIANTS, kernels_for_bench
    from schedules.pdl import pdl_tir_pipeline

    chosen = tuple(variants.split(",")) if variants else DEFAULT_BENCH_VARIANTS
    unknown = [v for v in chosen if v not in DECODE_VARIANTS]
    if unknown:
        sys.exit(f"unknown decode variants {unknown}: use names of schedules/attention's DECODE_VARIANTS "
                 f"({', '.join(DECODE_VARIANTS)})")
    target = tvm.target.Target("nvidia/nvidia-h100", host="llvm")
    funcs = dict(kernels_for_bench(H_KV, H_QO, D, DTYPE, chosen, pdl))
    funcs["tvm_decode"] = tvm_kv._attention_decode(H_KV, H_QO, D, DTYPE, False, {}, target)
    funcs["tvm_prefill"] = tvm_kv._attention_prefill(H_KV, H_QO, D, DTYPE, False, {}, target)
    funcs["tvm_prefill_ragged"] = tvm_kv._attention_prefill_ragged(H_KV, H_QO, D, D, DTYPE, {}, target)
    if only:
        funcs = {n: f for n, f in funcs.items() if n.startswith(tuple(only.split(",")))}
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    binaries = nvcc_available() and enable_cuda_binaries("sm_90a")
    with target:
        lib = tvm.tirx.build(mod, target=target, **({"pipeline": pdl_tir_pipeline()} if pdl else {}))
    os.makedirs(out_dir, exist_ok=True)
    lib.export_library(os.path.join(out_dir, "kernels.so"))
    with open(os.path.join(out_dir, "kernels.json"), "w") as f:
        json.dump(sorted(funcs), f)
    with open(os.path.join(out_dir, "kernels.cu"), "w") as f:  # what the GPU runs, to read
        f.write(lib.imports[0].inspect_source())
    print("built", sorted(funcs), "->", out_dir, "(sm_90a binary)" if binaries else "(CUDA source)", "with PDL" if pdl else "")


# ----------------------------------------------------------------------------------------------
# GPU side (runtime-only TVM + torch)


def _load(lib_path):
    import ctypes
    import subprocess
    import tempfile

    import tvm
    import tvm_ffi

    ctypes.CDLL(os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_cuda.so"), mode=ctypes.RTLD_GLOBAL)

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _nvcc(code, *_):
        with tempfile.TemporaryDirectory() as tmp:
            src, out = os.path.join(tmp, "k.cu"), os.path.join(tmp, "k.fatbin")
            with open(src, "w") as f:
                f.write(code)
            subprocess.run(["nvcc", "--fatbin", "-O3", "-w", "-gencode=arch=compute_90a,code=sm_90a", "-o", out, src], check=True)
            with open(out, "rb") as f:
                return bytearray(f.read())

    t = time.time()
    mod = tvm.runtime.load_module(lib_path)
    print(f"loaded {lib_path} (nvcc) in {time.time() - t:.1f}s", flush=True)
    return mod


class Bench:
    def __init__(self, mod, out_dir, built, shape=(H_QO, H_KV, D)):
        """`shape`: (query heads, KV heads, head_dim) the kernels in `mod` were built for."""
        import torch

        self.torch, self.mod, self.out_dir, self.built = torch, mod, out_dir, built
        self.h_qo, self.h_kv, self.d = shape
        self.dev = torch.device("cuda")
        self.flush_buf = torch.empty(512 << 20, dtype=torch.int8, device=self.dev)
        self.rows, self.checks = [], []
        self.decode_kernels = DECODE_KERNELS
        self.gen = torch.Generator(device=self.dev).manual_seed(0)

    def tv(self, t):
        import tvm

        return tvm.runtime.from_dlpack(t)

    def time_ms(self, fn, iters):
        """Median of `iters` event-timed calls, L2 flushed before each."""
        torch = self.torch
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            self.flush_buf.zero_()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1))
        times.sort()
        return times[len(times) // 2]

    def copy_bandwidth(self):
        torch = self.torch
        n = 1 << 30
        src = torch.empty(n, dtype=torch.int8, device=self.dev).random_()
        dst = torch.empty_like(src)
        ms = self.time_ms(lambda: dst.copy_(src), 20)
        del src, dst
        return 2 * n / ms / 1e6  # GB/s, read + write

    def rand(self, *shape):
        return (self.torch.randn(*shape, generator=self.gen, device=self.dev, dtype=self.torch.float32)).to(self.torch.bfloat16)

    # ---- paged KV cache contents ----

    def indptr(self, counts):
        """[0, c0, c0 + c1, ...]: int32 on the device."""
        return self.torch.tensor([0] + list(itertools.accumulate(counts)), dtype=self.torch.int32, device=self.dev)

    def poisoned_outputs(self, rows):
        """(output, lse) for `rows` query rows, NaN-filled: an entry a kernel forgets to write fails the check."""
        torch = self.torch
        return (torch.full((rows, self.h_qo, self.d), float("nan"), dtype=torch.bfloat16, device=self.dev),
                torch.full((rows, self.h_qo), float("nan"), dtype=torch.float32, device=self.dev))
    def make_pages(self, lens, extra_pages=3):
        """Random K/V pages for sequences of `lens` tokens, in a shuffled page order."""
        torch = self.torch
        npg = [(n + PAGE - 1) // PAGE for n in lens]
        total = sum(npg) + extra_pages
        pages = self.rand(total, 2, self.h_kv, PAGE, self.d)
        # unused slots hold NaN: a kernel that reads past a sequence's end shows it
        perm = torch.randperm(total, generator=self.gen, device=self.dev)[: sum(npg)].to(torch.int32)
        indptr = self.indptr(npg)
        last = torch.tensor([n - (p - 1) * PAGE if p else 0 for n, p in zip(lens, npg)], dtype=torch.int32, device=self.dev)
        for i, n in enumerate(lens):
            if n % PAGE:
                pages[perm[indptr[i + 1] - 1].long(), :, :, n % PAGE:, :] = float("nan")
        return pages, indptr, perm, last

    def gather_kv(self, pages, indptr, values, i, n):
        pg = values[indptr[i]: indptr[i + 1]].long()
        kv = pages[pg].float()  # (p, 2, H_kv, PAGE, D)
        kv = kv.permute(1, 2, 0, 3, 4).reshape(2, self.h_kv, -1, self.d)[:, :, :n]
        return kv[0], kv[1]

    def ref_attention(self, q, k, v, causal_offset=None):
        """float32 softmax attention with GQA; q (n, H_qo, D), k/v (H_kv, m, D) -> o, lse (base 2)."""
        torch = self.torch
        g = self.h_qo // self.h_kv
        n, m = q.shape[0], k.shape[1]
        mask = None
        if causal_offset is not None:
            mask = torch.arange(m, device=self.dev)[None, :] > (torch.arange(n, device=self.dev)[:, None] + causal_offset)
        os_, lses = [], []
        for h in range(self.h_kv):  # one GQA group at a time: 16k tokens x 32 heads of fp32 scores would not fit an H100
            s = torch.einsum("nhd,md->hnm", q[:, h * g:(h + 1) * g].float(), k[h]) * self.d ** -0.5
            if mask is not None:
                s = s.masked_fill(mask[None], float("-inf"))
            lses.append(torch.logsumexp(s, -1) / 0.6931471805599453)
            os_.append(torch.einsum("hnm,md->nhd", torch.softmax(s, -1), v[h]))
            del s
        return torch.cat(os_, 1), torch.cat(lses, 0).transpose(0, 1)

    def check(self, name, out, ref, lse=None, lse_ref=None, tol=1e-2):
        torch = self.torch
        ok_fin = bool(torch.isfinite(out).all())
        rel = float((out.float() - ref).norm() / ref.norm())
        lse_err = float((lse - lse_ref).abs().max()) if lse is not None else 0.0
        ok = ok_fin and rel <= tol and lse_err <= 1e-2
        self.checks.append(dict(name=name, rel=rel, lse_abs=lse_err, finite=ok_fin, ok=ok))
        print(f"check {name:48s} rel {rel:.2e} lse {lse_err:.1e} {'OK' if ok else 'FAIL'}", flush=True)
        return ok

    # ---- decode ----
    def decode_call(self, fname, q, pages, indptr, values, last, out, lse):
        torch = self.torch
        b = q.shape[0]
        zeros = torch.zeros(b, dtype=torch.int32, device=self.dev)
        f = self.mod[fname]
        args = [self.tv(x) for x in (q, pages, indptr, values, last, zeros, zeros, out, lse)]
        return lambda: f(*args, 0, 1.0, 1e4, self.d ** -0.5)

    def decode_data(self, lens):
        """Pages for `lens`, a query, the float32 reference (o, lse) and poisoned outputs."""
        torch = self.torch
        pages, indptr, values, last = self.make_pages(lens)
        b = len(lens)
        q = self.rand(b, self.h_qo, self.d)
        out, lse = self.poisoned_outputs(b)
        # an empty sequence (a cascade level may have none) gives o = 0 and lse = -5e4, as TVM's kernels do
        empty = (torch.zeros(1, self.h_qo, self.d, device=self.dev), torch.full((1, self.h_qo), -5e4, device=self.dev))
        refs = [self.ref_attention(q[i: i + 1], *self.gather_kv(pages, indptr, values, i, n)) if n else empty
                for i, n in enumerate(lens)]
        ref = torch.cat([r[0] for r in refs]), torch.cat([r[1] for r in refs])
        return dict(lens=lens, pages=(pages, indptr, values, last), q=q, out=out, lse=lse, ref=ref)

    def decode_check(self, fname, data, suffix=""):
        """Call `fname` once on poisoned outputs and check it against the reference."""
        lens = data["lens"]
        data["out"].fill_(float("nan"))
        data["lse"].fill_(float("nan"))
        self.decode_call(fname, data["q"], *data["pages"], data["out"], data["lse"])()
        self.torch.cuda.synchronize()
        name = f"{fname} lens={lens if len(lens) <= 4 else f'{len(lens)}x{lens[0]}'}{suffix}"
        return self.check(name, data["out"], data["ref"][0], data["lse"], data["ref"][1])

    def decode_pools(self, lens):
        """Page sets for `lens` beyond the first, enough that back-to-back calls over all of them miss L2."""
        nbytes = sum(lens) * self.h_kv * self.d * 2 * 2
        return [self.make_pages(lens) for _ in range(max(0, -(-(256 << 20) // nbytes) - 1))]

    def decode_times(self, fname, data, pools, iters=20):
        """(ms a call with L2 flushed, ms a call back to back over `pools`, host ms to launch one call)."""
        torch = self.torch
        call = self.decode_call(fname, data["q"], *data["pages"], data["out"], data["lse"])
        ms = self.time_ms(call, iters)
        # back to back, as layers run in a decode step: calls over enough distinct KV pools to miss L2
        calls = [call] + [self.decode_call(fname, data["q"], *p, data["out"], data["lse"]) for p in pools]
        calls = calls * max(1, 20 // len(calls))
        torch.cuda.synchronize()
        t = time.perf_counter()
        for c in calls:
            c()
        host_ms = (time.perf_counter() - t) * 1e3 / len(calls)
        times = []
        for _ in range(3):
            # the GPU sleeps while the host queues every call, so the calls run back to back even where
            # a launch takes the host longer than a call takes the GPU
            self.flush_buf.zero_()
            torch.cuda._sleep(int(2e6 * (2 * host_ms * len(calls) + 0.5)))  # cycles at ~2 GHz
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for c in calls:
                c()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / len(calls))
        return ms, sorted(times)[1], host_ms

    def decode_case(self, fname, lens, check_only=False, iters=20):
        data = self.decode_data(lens)
        ok = self.decode_check(fname, data)
        if check_only:
            return ok, None
        pools = self.decode_pools(lens)
        ms, ms_stream, _ = self.decode_times(fname, data, pools, iters)
        # still right after hundreds of calls with other pools
        ok = self.decode_check(fname, data, " after timing") and ok
        del data, pools
        return ok, (ms, ms_stream)

    # the last three, at 8 KV heads: 3 sequences of 11 splits; 1, 2, 3 and 6 splits in one batch; 64 of one split
    DECODE_CHECKS = ([1, 17, 300, 4111], [5000], [16, 15, 33], [0, 40, 0], [8192] * 2, [3000] * 16, [9000] * 3,
                     [700, 64, 65, 129, 700], [100] * 64)

    def run_decode(self, bw):
        for lens in self.DECODE_CHECKS:
            for fname in [n for n in self.decode_kernels if n != "tvm_decode" and self.has(n)]:
                self.decode_case(fname, lens, check_only=True)
        for b, c in DECODE_SHAPES:
            nbytes = b * c * self.h_kv * self.d * 2 * 2
            for fname in [n for n in self.decode_kernels if self.has(n)]:
                if fname == "tvm_decode" and (b, c) not in ((1, 8192), (16, 8192)):
                    continue  # the baseline: two points are enough to compare
                ok, (ms, ms_s) = self.decode_case(fname, [c] * b, iters=10 if b * c >= 64 * 8192 else 20)
                gbs, gbs_s = nbytes / ms / 1e6, nbytes / ms_s / 1e6
                self.rows.append(dict(kind="decode", kernel=fname, batch=b, ctx=c, ms=ms, gbs=gbs, pct_bw=100 * gbs / bw,
                                      ms_stream=ms_s, pct_bw_stream=100 * gbs_s / bw, ok=ok))
                print(f"decode {fname:22s} b={b:3d} ctx={c:6d} {ms * 1e3:9.1f} us {100 * gbs / bw:5.1f}% | back-to-back "
                      f"{ms_s * 1e3:9.1f} us {100 * gbs_s / bw:5.1f}% ok={ok}", flush=True)
            self.torch.cuda.empty_cache()

    SHORT_CHECKS = ([1, 17, 300, 4111], [16, 15, 33], [0, 40, 0], [700, 64, 65, 129, 700], [128], [129] * 4,
                    [1000] * 16, [100] * 64, [3000] * 16, [9000] * 3)

    def run_short(self, bw):
        """Every decode kernel in the library (the default and its built variants) at a decode step's short
        contexts: checked on mixed batches, then on each timed shape, then timed on the same inputs."""
        names = [n for n in self.kernel_names() if n.startswith("kiln_decode_paged_kv")]
        for lens in self.SHORT_CHECKS:
            data = self.decode_data(lens)
            for fname in names:
                self.decode_check(fname, data)
            del data
        for b, c in SHORT_SHAPES:
            data, pools = self.decode_data([c] * b), self.decode_pools([c] * b)
            nbytes = b * c * self.h_kv * self.d * 2 * 2
            for fname in names:
                ok = self.decode_check(fname, data)
                ms, ms_s, host = self.decode_times(fname, data, pools, iters=10 if b * c >= 64 * 8192 else 20)
                self.rows.append(dict(kind="decode", kernel=fname, batch=b, ctx=c, ms=ms, gbs=nbytes / ms / 1e6,
                                      pct_bw=100 * nbytes / ms / 1e6 / bw, ms_stream=ms_s,
                                      pct_bw_stream=100 * nbytes / ms_s / 1e6 / bw, host_ms=host, ok=ok))
                print(f"short {fname:30s} b={b:3d} ctx={c:5d} {ms * 1e3:7.1f} us | back-to-back {ms_s * 1e3:7.1f} us "
                      f"(host {host * 1e3:4.1f} us a launch) ok={ok}", flush=True)
            del data, pools
            self.torch.cuda.empty_cache()
        self.short_table(names)

    def short_table(self, names):
        """Back-to-back µs a call: a row a shape, a column a kernel (the fastest in bold)."""
        short = {n[len("kiln_decode_paged_kv"):].lstrip("_") or "default": n for n in names}
        print("\n| b x ctx | " + " | ".join(short) + " |\n|---|" + "---|" * len(short))
        for b, c in SHORT_SHAPES:
            got = {r["kernel"]: r["ms_stream"] * 1e3 for r in self.rows if (r["batch"], r["ctx"]) == (b, c)}
            best = min(got.values())
            cells = [f"**{got[n]:.1f}**" if got[n] == best else f"{got[n]:.1f}" for n in short.values()]
            print(f"| {b} x {c} | " + " | ".join(cells) + " |")

    # ---- Metal forms (plain TIR), compiled for CUDA ----
    def run_metal(self, bw):
        """The kernels Metal gets, checked against float32 on this GPU; timings only for reference."""
        for lens in self.DECODE_CHECKS:
            self.decode_case(METAL_DECODE, lens, check_only=True)
        for fname in ("kiln_metal_prefill_ragged",):
            for lens in ([1, 37, 300, 16], [1000, 130, 64, 65]):
                self.ragged_case(fname, lens, check_only=True)
        self.paged_case("kiln_metal_prefill_paged", [(5, 100), (64, 1000), (1, 17), (200, 33), (3, 0)])
        for b, c in ((1, 8192), (16, 8192)):
            ok, (ms, ms_s) = self.decode_case(METAL_DECODE, [c] * b)
            nbytes = b * c * self.h_kv * self.d * 2 * 2
            self.rows.append(dict(kind="decode", kernel=METAL_DECODE, batch=b, ctx=c, ms=ms, gbs=nbytes / ms / 1e6,
                                  pct_bw=100 * nbytes / ms / 1e6 / bw, ms_stream=ms_s, pct_bw_stream=100 * nbytes / ms_s / 1e6 / bw, ok=ok))
            print(f"decode {METAL_DECODE} b={b} ctx={c} {ms * 1e3:.1f} us {100 * nbytes / ms / 1e6 / bw:.1f}% ok={ok}", flush=True)
        for n in (1024, 4096):
            ok, ms = self.ragged_case("kiln_metal_prefill_ragged", [n], iters=5)
            tf = 4 * n * n * self.d * self.h_qo / 2 / ms / 1e9
            self.rows.append(dict(kind="prefill", kernel="kiln_metal_prefill_ragged", n=n, ms=ms, tflops=tf, pct_sdpa=float("nan"), ok=ok))
            print(f"prefill kiln_metal_prefill_ragged n={n} {ms * 1e3:.1f} us {tf:.1f} TFLOP/s ok={ok}", flush=True)

    # ---- prefill ----
    def run_prefill(self):
        torch = self.torch
        import torch.nn.functional as F

        names = [n for n in self.kernel_names() if n.startswith("kiln_prefill_ragged")] + \
            [n for n in ("tvm_prefill_ragged",) if self.has(n)]
        # correctness: ragged mixed lengths, GQA, causal
        for fname in names:
            for lens in ([1, 37, 300, 16], [1000, 130, 64, 65]):
                self.ragged_case(fname, lens, check_only=True)
        # chunked prefill: new tokens attend to the tokens already in pages (non-causal); the runtime
        # merges this state with the ragged one
        paged = [n for n in ("kiln_prefill_paged", "kiln_prefill_paged_fa2", "tvm_prefill") if self.has(n)]
        for fname in paged:
            self.paged_case(fname, [(5, 100), (64, 1000), (1, 17), (200, 33), (3, 0)])
        # chunked prefill's second half: a 1k chunk against 15k cached tokens (non-causal)
        new, cached = PAGED_TIMING
        flops = 4 * new * cached * self.d * self.h_qo
        for fname in (n for n in paged if n.startswith("kiln")):
            ok, ms = self.paged_case(fname, [(new, cached)], iters=10)
            self.rows.append(dict(kind="prefill", kernel=fname, n=f"{new}+{cached}", ms=ms, tflops=flops / ms / 1e9, pct_sdpa=0.0, ok=ok))
            print(f"prefill {fname:20s} n={new}+{cached} {ms * 1e3:9.1f} us {flops / ms / 1e9:6.1f} TFLOP/s ok={ok}", flush=True)
        for n in PREFILL_LENS:
            flops = 4 * n * n * self.d * self.h_qo / 2  # causal: half of QK^T and PV
            q, k, v = self.rand(1, self.h_qo, n, self.d), self.rand(1, self.h_kv, n, self.d), self.rand(1, self.h_kv, n, self.d)
            kk, vv = k.repeat_interleave(self.h_qo // self.h_kv, 1), v.repeat_interleave(self.h_qo // self.h_kv, 1)
            ms = self.time_ms(lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True), 20)
            sdpa = flops / ms / 1e9
            self.rows.append(dict(kind="prefill", kernel="torch_sdpa", n=n, ms=ms, tflops=sdpa, pct_sdpa=100.0, ok=True))
            print(f"prefill torch_sdpa           n={n:6d} {ms * 1e3:9.1f} us {sdpa:6.1f} TFLOP/s", flush=True)
            for fname in names:
                if fname.startswith("tvm") and n > 4096:
                    continue
                ok, ms = self.ragged_case(fname, [n], iters=10)
                tf = flops / ms / 1e9
                self.rows.append(dict(kind="prefill", kernel=fname, n=n, ms=ms, tflops=tf, pct_sdpa=100 * tf / sdpa, ok=ok))
                print(f"prefill {fname:20s} n={n:6d} {ms * 1e3:9.1f} us {tf:6.1f} TFLOP/s {100 * tf / sdpa:5.1f}% of SDPA ok={ok}", flush=True)

    def kernel_names(self):
        """Kiln kernels in the library, from the list it was built from (kernels.json beside it)."""
        return [n for n in self.built if self.has(n)]

    def has(self, name):
        try:
            self.mod[name]
            return True
        except Exception:  # pylint: disable=broad-except
            return False

    def ragged_case(self, fname, lens, check_only=False, iters=20):
        """Causal self-attention over the new tokens of each sequence (k/v not yet in pages)."""
        torch = self.torch
        n = sum(lens)
        q, k, v = self.rand(n, self.h_qo, self.d), self.rand(n, self.h_kv, self.d), self.rand(n, self.h_kv, self.d)
        indptr = self.indptr(lens)
        zeros = torch.zeros(len(lens), dtype=torch.int32, device=self.dev)
        qpos = torch.zeros(n, dtype=torch.int32, device=self.dev)
        out, lse = self.poisoned_outputs(n)
        f = self.mod[fname]
        args = [self.tv(x) for x in (q, indptr, k, v, indptr, qpos, zeros, out, lse)]
        call = lambda: f(*args, 1, 0, 1.0, 1e4, self.d ** -0.5)  # noqa: E731  causal=1, rotary_mode=0
        call()
        torch.cuda.synchronize()
        outs, lses = [], []
        for i, m in enumerate(lens):
            s, e = int(indptr[i]), int(indptr[i + 1])
            o, l2 = self.ref_attention(q[s:e], k[s:e].float().transpose(0, 1), v[s:e].float().transpose(0, 1), causal_offset=0)
            outs.append(o)
            lses.append(l2)
        ok = self.check(f"{fname} lens={lens}", out, torch.cat(outs), lse, torch.cat(lses))
        if check_only:
            return ok, None
        return ok, self.time_ms(call, iters)

    def paged_case(self, fname, cases, iters=0):
        """(new tokens, tokens already in pages) per sequence: q attends to all cached tokens.
        With ``iters``, also times the call: (ok, ms)."""
        torch = self.torch
        qlens = [a for a, _ in cases]
        pages, indptr, values, last = self.make_pages([c for _, c in cases])
        n = sum(qlens)
        q = self.rand(n, self.h_qo, self.d)
        qo_indptr = self.indptr(qlens)
        zeros = torch.zeros(len(cases), dtype=torch.int32, device=self.dev)
        qpos = torch.zeros(n, dtype=torch.int32, device=self.dev)
        out, lse = self.poisoned_outputs(n)
        f = self.mod[fname]
        args = [self.tv(x) for x in (q, qo_indptr, pages, indptr, values, last, zeros, qpos, out, lse)]
        call = lambda: f(*args, 0, 0, 1.0, 1e4, self.d ** -0.5)  # noqa: E731  causal=0
        call()
        torch.cuda.synchronize()
        outs, lses = [], []
        for i, (a, c) in enumerate(cases):
            if c == 0:  # nothing cached: o = 0, lse = -5e4 (TVM's convention; the merge ignores it)
                outs.append(torch.zeros(a, self.h_qo, self.d, device=self.dev))
                lses.append(torch.full((a, self.h_qo), -5e4, device=self.dev))
                continue
            o, l2 = self.ref_attention(q[int(qo_indptr[i]): int(qo_indptr[i + 1])], *self.gather_kv(pages, indptr, values, i, c))
            outs.append(o)
            lses.append(l2)
        ok = self.check(f"{fname} (new, cached)={cases}", out, torch.cat(outs), lse, torch.cat(lses))
        return (ok, self.time_ms(call, iters)) if iters else ok


def run(lib, out_dir, what, kernels=None):
    """`kernels`: comma-separated decode kernels to check and time (default: every one in DECODE_KERNELS)."""
    import torch

    with open(os.path.join(os.path.dirname(lib), "kernels.json")) as f:
        built = json.load(f)
    bench = Bench(_load(lib), out_dir, built)
    if kernels:
        bench.decode_kernels = tuple(kernels.split(","))
    name = torch.cuda.get_device_name()
    bw = bench.copy_bandwidth()
    print(f"device {name}; copy bandwidth {bw:.0f} GB/s", flush=True)
    if "metal" in what:
        bench.run_metal(bw)
    if "decode" in what:
        bench.run_decode(bw)
    if "short" in what:
        bench.run_short(bw)
    if "prefill" in what:
        bench.run_prefill()
    res = dict(device=name, copy_gbs=bw, rows=bench.rows, checks=bench.checks, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "attention_results.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"\n{name}, copy {bw:.0f} GB/s; checks {sum(c['ok'] for c in bench.checks)}/{len(bench.checks)} ok")
    for r in bench.rows:
        if r["kind"] == "decode":
            print(f"| decode | {r['kernel']} | b={r['batch']} ctx={r['ctx']} | {r['ms'] * 1e3:.1f} us | {r['pct_bw']:.1f}% | "
                  f"{r['ms_stream'] * 1e3:.1f} us | {r['pct_bw_stream']:.1f}% | {'ok' if r['ok'] else 'FAIL'} |")
        else:
            print(f"| prefill | {r['kernel']} | n={r['n']} | {r['ms'] * 1e3:.1f} us | {r['tflops']:.1f} TFLOP/s | {r['pct_sdpa']:.1f}% | {'ok' if r['ok'] else 'FAIL'} |")


# ----------------------------------------------------------------------------------------------
# End to end: a random-weight model (head_dim 128, GQA 4) compiled three times, with TVM's cache
# kernels, Kiln's and Kiln's Metal forms (compiled for CUDA), run on the GPU against transformers'
# float32 logits computed at build time.

E2E_CONFIG = dict(hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=128, vocab_size=256, max_position_embeddings=4096,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, rope_theta=1e6, tie_word_embeddings=True,
                  attention_bias=False)


def e2e_build(out_dir):
    repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    sys.path[:0] = [repo, os.path.join(repo, "tests")]
    from pathlib import Path

    import conftest
    import compile.driver as driver

    out = Path(out_dir)
    conftest.TINY_CONFIGS["qwen3-d128"] = ("Qwen3Config", "Qwen3ForCausalLM", E2E_CONFIG)
    hf = conftest.make_tiny_hf("qwen3-d128", out / "hf")
    args = dict(model=str(hf), target="cuda", dtype="bfloat16", weights=None, cuda_arch=None, context=4096,
                page_size=16, prefill_chunk=1024)
    chosen = driver.paged_kv_kernels  # what the compiler hands the model; None (TVM's cache) for the baseline
    driver.paged_kv_kernels = lambda *target_and_shape: None
    driver.compile_artifact(out=str(out / "tvm"), **args)
    driver.paged_kv_kernels = chosen
    driver.compile_artifact(out=str(out / "kiln"), **args)
    # Kiln's Metal forms (plain TIR) in the CUDA build: the kernels Metal gets, in the real runtime
    from schedules.attention import decode_kernel, metal_prefill_kernel

    driver.paged_kv_kernels = lambda target, *shape: {
        "decode": decode_kernel(*shape, form="metal"), "prefill_ragged": metal_prefill_kernel("ragged", *shape),
        "prefill_paged": metal_prefill_kernel("paged", *shape)}
    driver.compile_artifact(out=str(out / "kiln-metal-forms"), **args)
    # the reference: transformers in float32 on this CPU (the GPU machine has no transformers)
    import numpy as np
    import torch
    import transformers

    prompt = np.random.default_rng(0).integers(3, 256, 300).tolist()
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.bfloat16).float().eval()
    with torch.no_grad():
        greedy = ref.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                              pad_token_id=0)[0, len(prompt):].tolist()
        want = ref(torch.tensor([prompt + greedy])).logits[0].numpy()
    np.savez(out / "reference.npz", prompt=np.array(prompt), greedy=np.array(greedy), logits=want)


def e2e_run(root, out_dir):
    import numpy as np
    import torch

    sys.path.insert(0, os.getcwd())
    from runtime.model_runner import ModelRunner

    data = np.load(os.path.join(root, "reference.npz"))
    prompt, greedy, want = data["prompt"].tolist(), data["greedy"].tolist(), data["logits"]

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    res = {}
    for name in [n for n in ("tvm", "kiln", "kiln-metal-forms") if os.path.isdir(os.path.join(root, n))]:
        runner = ModelRunner(os.path.join(root, name), kv_tokens=8192)
        errs = {}
        # one prefill of 300 tokens, then 16 teacher-forced decode steps
        runner.add_sequence(0)
        got = [runner.forward([0], [prompt])[0]] + [runner.forward([0], [[t]])[0] for t in greedy]
        errs["prefill+decode"] = max(rel(g, want[len(prompt) - 1 + i]) for i, g in enumerate(got))
        # chunked prefill: 200 tokens, then 100 attending to the cached 200 (paged prefill + merge)
        runner.add_sequence(1)
        runner.forward([1], [prompt[:200]])
        errs["chunked prefill 200+100"] = rel(runner.forward([1], [prompt[200:]])[0], want[len(prompt) - 1])
        # ragged batch: two new sequences of different lengths in one forward (a causal prefix of the
        # prompt has the prompt's logits), then one batched decode step over three sequences
        runner.add_sequence(2)
        runner.add_sequence(3)
        both = runner.forward([2, 3], [prompt[:77], prompt])
        errs["ragged batch 77|300"] = max(rel(both[0], want[76]), rel(both[1], want[len(prompt) - 1]))
        dec = runner.forward([1, 3, 2], [[greedy[0]], [greedy[0]], [prompt[77]]])
        errs["batched decode 300|300|77"] = max(rel(dec[0], want[len(prompt)]), rel(dec[1], want[len(prompt)]),
                                                rel(dec[2], want[77]))
        res[name] = errs
        print(name, json.dumps(errs), flush=True)
    ok = all(v < 2e-2 for e in res.values() for v in e.values())
    with open(os.path.join(out_dir, "e2e.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), errors=res, ok=ok), f, indent=1)
    print(f"e2e {'PASS' if ok else 'FAIL'} (max relative logits error vs transformers fp32 < 2e-2)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", default=".gpu/attn")
    b.add_argument("--only", default=None, help="comma-separated name prefixes of the kernels to build")
    b.add_argument("--variants", default=None, help="comma-separated DECODE_VARIANTS names (schedules/attention)")
    b.add_argument("--pdl", action="store_true", help="build with programmatic dependent launch, as the model")
    r = sub.add_parser("run")
    r.add_argument("--lib", required=True)
    r.add_argument("--out", default=os.environ.get("OUT", "."))
    r.add_argument("--what", default="decode,prefill,metal", help="any of decode, prefill, metal, short")
    r.add_argument("--kernels", default=None, help="comma-separated decode kernels to check and time (default: all)")
    eb = sub.add_parser("e2e-build")
    eb.add_argument("--out", default=".gpu/attn/e2e")
    er = sub.add_parser("e2e-run")
    er.add_argument("--dir", required=True)
    er.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    if a.cmd == "build":
        build(a.out, a.only, a.variants, a.pdl)
    elif a.cmd == "run":
        run(a.lib, a.out, a.what, a.kernels)
    elif a.cmd == "e2e-build":
        e2e_build(a.out)
    else:
        e2e_run(a.dir, a.out)
