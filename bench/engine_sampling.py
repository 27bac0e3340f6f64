"""Engine throughput: N prompts at once through Engine.generate_sync, sampling on the device.

    python bench/engine_throughput.py ARTIFACT [--n 64] [--max 128] [--temperature 0] [--top-p 1]

Prints tokens/s and where the time went: ModelRunner.forward, on-device sampling, and the rest
(scheduler, detokenization, streaming: the engine's Python per step).
"""

from __future__ import annotations

import argparse
import time

from runtime import Engine, EngineConfig, SamplingParams

OPENINGS = ["Once upon a time", "The little dog", "In a small town", "Tom and Lily", "One sunny day"]


def timed(obj, name: str, totals: dict) -> None:
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start

    setattr(obj, name, wrapper)


def run(artifact: str, n: int, max_tokens: int, params: SamplingParams, kvmem: float):
    prompts = [f"{OPENINGS[i % len(OPENINGS)]} {i}," for i in range(n)]
    with Engine(EngineConfig(model_path=artifact, max_num_seqs=n, kvmem=kvmem)) as engine:
        engine.generate_sync(params, prompts[:2])  # warm-up
        totals: dict[str, float] = {}
        timed(engine.runner, "forward", totals)
        timed(engine.runner, "sample", totals)
        timed(engine, "step", totals)
        start = time.perf_counter()
        outs = engine.generate_sync(params, prompts)
        seconds = time.perf_counter() - start
    tokens = sum(o.num_output_tokens for o in outs)
    rest = totals["step"] - totals["forward"] - totals.get("sample", 0.0)
    print(f"{n} seqs × {max_tokens} tokens: {tokens} tokens "
          f"in {seconds:.2f} s = {tokens / seconds:.0f} tokens/s; forward {totals['forward']:.2f} s, "
          f"device sampling {totals.get('sample', 0.0):.2f} s, rest of the steps {rest:.2f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--kvmem", type=float, default=4096)
    a = ap.parse_args()
    params = SamplingParams(temperature=a.temperature, top_p=a.top_p, max_tokens=a.max, ignore_eos=True, seed=0)
    run(a.artifact, a.n, a.max, params, a.kvmem)


if __name__ == "__main__":
    main()
