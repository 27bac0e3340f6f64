"""Where a decode step's time goes: wall time against GPU kernel time, and the kernels that take it.

    python bench/decode_profile.py ARTIFACT [--batches 1,16,64] [--context 256]   (GPU box; random weights
    are filled in when the artifact has none)

For each batch size: ModelRunner decode steps (forward + on-device argmax, as the engine runs them) timed
by the wall clock, then the same steps under torch's CUDA profiler (CUPTI sees every kernel in the
process, CUDA-graph replays included): GPU busy time and kernel launches per step (and per layer), top
kernels by time. Wall minus GPU time is what the host (Python, the VM, launches) adds to a step. The
floor is the weights a step reads (all but an untied embedding table) at the card's measured copy rate.
"overlapped" times the engine's overlapped loop (EngineConfig.overlap): step N+1 launched on step N's
tokens still on the device (ModelRunner.greedy / decode_next), step N's tokens read while N+1 runs.
"host per step" times each host call of a step while the GPU is kept busy (host_breakdown): what the host
needs to launch a step, against the GPU time it must stay under.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.random_weights import fill  # noqa: E402
from runtime.model_runner import ModelRunner  # noqa: E402


def weight_bytes(artifact: Path, config: dict) -> int:
    """Bytes of the weights one decode step streams: every parameter but an untied embedding table,
    of which a step gathers only its rows."""
    import numpy as np

    import ml_dtypes  # noqa: F401  (bfloat16 for np.dtype)

    total = 0
    for p in json.loads((artifact / "params.json").read_text()):
        if p["name"].endswith("embed_tokens.weight") and not config.get("tie_word_embeddings"):
            continue
        total += int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize
    return total


def copy_bytes_per_s() -> float:
    """Device-to-device copy rate of 1 GiB (read + write bytes), the floor's yardstick."""
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * src.numel() * 10 / (start.elapsed_time(end) * 1e-3)


def host_breakdown(runner, seqs: list[int], repeats: int = 12, sleep_cycles: int = 60_000_000) -> dict:
    """Host milliseconds of one decode step's calls (median of `repeats`), each timed while a ~30 ms spin
    kernel queued first keeps the GPU busy, so that launches are timed, not waits: the runner's own
    calls of a step made one by one (begin_forward with its shapes, embed, the decode VM call: the layers'
    CUDA-graph replays and KV-cache attention calls, end_forward, logits, argmax), then the runner's own
    decode_next + greedy twice (overlapped steps, the second launched before the first has run: a runner
    that waits on the host for the last forward waits there for the spin kernel). Timing only: the first
    step's page tables may be overwritten before its kernels run."""
    import numpy as np
    import torch

    tvm = runner._tvm
    shape, f, vm, kv, params = tvm.runtime.ShapeTuple, runner._f, runner.vm, runner.kv, runner.params
    ids = tvm.runtime.tensor(np.full(len(seqs), 7, np.int32), runner.device)
    tokens = runner.greedy(runner.forward(seqs, [[7] for _ in seqs], on_device=True))
    times: dict[str, list[float]] = {}
    waited = []  # per repeat: whether the spin kernel had ended when step 2 returned

    def timed(name, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        times.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
        return out

    for _ in range(repeats):
        torch.cuda.synchronize()
        torch.cuda._sleep(sleep_cycles)
        slept = torch.cuda.Event()
        slept.record()
        timed("begin_forward", lambda: f["kv_state_begin_forward"](kv, shape(seqs), shape([1] * len(seqs))))
        embeds = timed("embed", vm["embed"], ids, params)
        hidden = timed("decode", runner._for_rows("decode", len(seqs)), embeds, kv, params)
        timed("end_forward", f["kv_state_end_forward"], kv)
        logits = timed("logits", runner._for_rows("logits", len(seqs)), hidden, params)
        timed("argmax", vm["argmax"], logits)
        for name in ("step 1", "step 2"):  # step 2 is launched while step 1 waits behind the spin kernel
            start = time.perf_counter()
            tokens = runner.greedy(runner.decode_next(seqs, tokens))
            times.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
        waited.append(slept.query())
    torch.cuda.synchronize()
    out = {name: float(np.median(v)) for name, v in times.items()}
    out["step 2 waited for the GPU"] = any(waited)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32)
    a = ap.parse_args()
    if not (a.artifact / "weights").is_dir():
        fill(a.artifact, None)
    batches = [int(b) for b in a.batches.split(",")]
    runner = ModelRunner(a.artifact, max_batch=max(batches), kv_tokens=max(batches) * (a.context + 4 * a.steps + 64))
    import torch
    from torch.profiler import ProfilerActivity, profile

    config = runner.artifact.config
    floor = weight_bytes(a.artifact, config) / copy_bytes_per_s() * 1e3
    layers = config["num_hidden_layers"]
    print(f"{a.artifact.name} on {runner.device.device_name}: floor {floor:.3f} ms/step (weights at the copy rate)")
    for b in batches:
        seqs = list(range(1000, 1000 + b))
        for s in seqs:
            runner.add_sequence(s)
        runner.forward(seqs, [[5] * a.context for _ in seqs])

        def step():
            logits = runner.forward(seqs, [[7] for _ in seqs], on_device=True)
            return runner.vm["argmax"](logits).numpy()

        for _ in range(4):
            step()
        start = time.perf_counter()
        for _ in range(a.steps):
            step()
        wall = (time.perf_counter() - start) / a.steps * 1e3
        tokens = runner.greedy(runner.forward(seqs, [[7] for _ in seqs], on_device=True))
        start = time.perf_counter()
        for _ in range(a.steps):
            launched = runner.greedy(runner.decode_next(seqs, tokens))
            tokens.host()
            tokens = launched
        tokens.host()
        overlapped = (time.perf_counter() - start) / a.steps * 1e3
        host = host_breakdown(runner, seqs)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(a.steps):
                step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
        gpu = sum(e.self_device_time_total for e in kernels) / a.steps / 1e3
        launches = sum(e.count for e in kernels) / a.steps
        print(f"b={b}: wall {wall:.3f} ms/step, GPU kernels {gpu:.3f} ms/step ({launches:.0f} launches, "
              f"{launches / layers:.1f} a layer), floor / GPU {floor / gpu:.0%}, "
              f"host share {max(0.0, 1 - gpu / wall):.0%}; overlapped: wall {overlapped:.3f} ms/step, host share {max(0.0, 1 - gpu / overlapped):.0%}")
        print(f"    host per step, GPU kept busy (ms): " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float)
                                                                   else f"{k}: {v}" for k, v in host.items())
              + f"; decode VM call per layer {host['decode'] / layers * 1e3:.1f} us; page-table copies wait "
              + ("on the GPU" if getattr(runner, "_copy_stream", None) else "on the host"))
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:8]:
            print(f"    {e.self_device_time_total / a.steps / 1e3:7.3f} ms  x{e.count / a.steps:5.1f}  {e.key[:90]}")
        for s in seqs:
            runner.remove_sequence(s)


if __name__ == "__main__":
    main()
