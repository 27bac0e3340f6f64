"""The engine's own host work per decode step: scheduling (Scheduler.repeat), request bookkeeping,
detokenization, stop checks and streaming, with the runner's decode calls stubbed out at the timing level
(prefills run for real). What the engine thread adds to each step besides launching it
(bench/decode_profile.py's "host per step"); in the overlapped loop both must fit under the GPU's step time.

    python bench/engine_host.py ARTIFACT --tokenizer DIR [--batches 1,16,64] [--steps 256]

Prints, per batch size, host milliseconds per step and the top functions of a cProfile of the engine thread.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.random_weights import fill  # noqa: E402
from runtime import Engine, EngineConfig, SamplingParams  # noqa: E402
from runtime.model_runner import DeviceTokens  # noqa: E402


def stub_decode(engine: Engine, seed: int = 0) -> None:
    """Decode steps cost the engine nothing on the device: decode_next launches nothing and every step's
    tokens are random ids, ready at once (the engine's overlapped loop, EngineConfig.overlap)."""
    rng = np.random.default_rng(seed)
    vocab = min(engine.runner.vocab_size, 150_000)
    engine.runner.decode_next = lambda seq_ids, tokens: np.empty((len(seq_ids), 0))  # "logits": rows only
    engine.runner.greedy = lambda logits: DeviceTokens(
        np.zeros(logits.shape[0], np.int32), lambda: rng.integers(3, vocab, logits.shape[0]))


def host_per_step(engine: Engine, batch: int, steps: int, prompt_len: int = 16) -> float:
    """Milliseconds per decode step of `batch` greedy requests of `steps` tokens (last first token → last finish)."""
    rng = np.random.default_rng(batch)
    prompts = [rng.integers(3, min(engine.runner.vocab_size, 150_000), prompt_len).tolist() for _ in range(batch)]
    outs = engine.generate_sync(SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True), prompts)
    return (max(o.finish_time for o in outs) - max(o.first_token_time for o in outs)) / (steps - 1) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--steps", type=int, default=256)
    a = ap.parse_args()
    if not (a.artifact / "weights").is_dir():
        fill(a.artifact, a.tokenizer)
    batches = [int(b) for b in a.batches.split(",")]
    engine = Engine(EngineConfig(model_path=str(a.artifact), max_num_seqs=max(batches), overlap=True,
                                 kv_tokens=max(batches) * (a.steps + 64)))
    stub_decode(engine)
    host_per_step(engine, 2, 8)  # warm-up
    for b in batches:
        ms = host_per_step(engine, b, a.steps)
        profiler = cProfile.Profile()
        engine._inbox.put(("stats", lambda _: profiler.enable()))  # on the engine thread, between steps
        host_per_step(engine, b, a.steps)
        engine._inbox.put(("stats", lambda _: profiler.disable()))
        engine.stats()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(8)
        top = [line for line in text.getvalue().splitlines() if "{" in line or "py:" in line][:8]
        print(f"b={b}: engine host {ms:.3f} ms/step ({ms / b * 1e3:.1f} us a sequence); top (tottime, whole run):")
        for line in top:
            print("    " + line.strip())
    engine.close()


if __name__ == "__main__":
    main()
