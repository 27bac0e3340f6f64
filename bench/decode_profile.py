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
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:8]:
            print(f"    {e.self_device_time_total / a.steps / 1e3:7.3f} ms  x{e.count / a.steps:5.1f}  {e.key[:90]}")
        for s in seqs:
            runner.remove_sequence(s)


if __name__ == "__main__":
    main()
