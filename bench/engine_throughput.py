"""Engine throughput on a real model shape with random weights (issue 4's GPU report).

Here:   python -m compile --model qwen3 --target cuda --out .gpu/qwen3-cuda   (library only)
There:  python bench/engine_throughput.py .gpu/qwen3-cuda --tokenizer DIR [--requests 64]
Prefill (issue 6: 16 prompts x 1,024 tokens on the Llama-3.1-8B shape):
        python -m compile --model llama3 --target cuda --prefill_chunk 8192 --out .gpu/llama3-cuda
        python bench/engine_throughput.py .gpu/llama3-cuda --requests 16 --prompt-len 1024 --max-tokens 1 \
            --batched-tokens 8192

Quantized (`--quant q4_k_m`, `q8_0`, ...: random packed components, bench/random_weights.py):
        python -m compile --model llama3 --target cuda --quant q4_k_m --prefill_chunk 8192 --out .gpu/llama3-q4km

Fills the artifact with random weights, then submits N concurrent greedy requests (random prompt ids,
ignore_eos) through the Engine and prints prompt tokens/s (all prompts' tokens over the time until the
last first token), generated tokens/s, time to first token, the wall time of a decode step (after the
last first token), and a single-request decode rate. `--overlap on,off` runs each batch with the
overlapped step loop and without (EngineConfig.overlap); wall ms per decode step against the GPU's
kernel time (bench/decode_profile.py) is the host's share.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.random_weights import fill  # noqa: E402
from runtime import Engine, EngineConfig, SamplingParams  # noqa: E402


def run(engine: Engine, n: int, prompt_len: int, max_tokens: int, vocab: int, seed: int = 0,
        tokens: list | None = None) -> dict:
    """Throughput of `n` concurrent greedy requests; their output ids are appended to `tokens`."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, min(vocab, 150000), prompt_len).tolist() for _ in range(n)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = engine.generate_sync(params, prompts)
    dt = time.perf_counter() - t0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    if tokens is not None:
        tokens.append([o.outputs[0].token_ids for o in outs])
    ttft = sorted(o.first_token_time - o.arrival_time for o in outs)
    prefill_s = max(o.first_token_time for o in outs) - min(o.arrival_time for o in outs)
    decode_s = max(o.finish_time for o in outs) - max(o.first_token_time for o in outs)
    return dict(requests=n, prompt_len=prompt_len, max_tokens=max_tokens, seconds=round(dt, 2),
                decode_step_ms=round(decode_s / max(max_tokens - 1, 1) * 1e3, 3),
                prompt_tok_s=round(n * prompt_len / prefill_s, 1),
                generated_tok_s=round(generated / dt, 1), total_tok_s=round((generated + n * prompt_len) / dt, 1),
                ttft_median_s=round(ttft[len(ttft) // 2], 3), ttft_max_s=round(ttft[-1], 3))


def step_times(runner, batches=(1, 16, 64), context=256, steps=32) -> dict:
    """Milliseconds per ModelRunner decode step (kernels + Python + logits to host), no engine."""
    out = {}
    for b in batches:
        seqs = list(range(10_000, 10_000 + b))
        for s in seqs:
            runner.add_sequence(s)
        runner.forward(seqs, [[5] * context for _ in seqs])
        runner.forward(seqs, [[7] for _ in seqs])  # warm-up of this batch size
        t0 = time.perf_counter()
        for _ in range(steps):
            runner.forward(seqs, [[7] for _ in seqs])
        out[f"decode_step_ms_b{b}"] = round((time.perf_counter() - t0) / steps * 1e3, 3)
        for s in seqs:
            runner.remove_sequence(s)
    return out


def weight_bytes(artifact) -> int:
    """Bytes of every parameter the library takes (what the runner puts on the device)."""
    return int(sum(np.prod(p["shape"]) * np.dtype(p["dtype"]).itemsize for p in artifact.params()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batched-tokens", type=int, default=4096, help="engine's max_num_batched_tokens")
    ap.add_argument("--batches", help="comma-separated request counts to run (default: 1 and --requests)")
    ap.add_argument("--overlap", default="on", help="on, off, or a list (on,off): the engine's overlapped step loop, "
                    "a fresh engine for each")
    a = ap.parse_args()
    if not (a.artifact / "weights").is_dir():
        fill(a.artifact, a.tokenizer)
    batches = [int(b) for b in a.batches.split(",")] if a.batches else [1, a.requests]
    steps = tuple(b for b in (1, 16, 64) if b <= max(batches))
    report, rows, outputs = {}, [], {}
    for i, mode in enumerate(a.overlap.split(",")):  # off,off,on: is the synchronous loop itself repeatable?
        engine = Engine(EngineConfig(model_path=str(a.artifact), max_num_seqs=max(batches),
                                     kv_tokens=max(batches) * (a.prompt_len + a.max_tokens + 32)
                                     + max(steps) * 320,  # step_times' sequences, beside the prefix cache's pages
                                     max_num_batched_tokens=a.batched_tokens, overlap=mode == "on"))
        vocab = engine.runner.vocab_size
        run(engine, 4, 32, 8, vocab, seed=2)  # warm-up: first kernel launches, allocator
        if not report:
            report = dict(card=engine.runner.device.device_name or "cpu", model=engine.runner.artifact.manifest["name"],
                          dtype=engine.runner.artifact.manifest["dtype"],
                          weights_on_gpu_bytes=weight_bytes(engine.runner.artifact),
                          quantization=(engine.runner.artifact.manifest["quantization"] or {}).get("summary"),
                          runner=step_times(engine.runner, steps))
            if engine.runner._wide:  # a quantized artifact: the same steps with the dequant-fused GEMV at every
                wide, engine.runner._wide = engine.runner._wide, set()  # batch size, as before decode_wide (issue 11)
                report["runner"]["fused_gemv_only"] = step_times(engine.runner, steps)
                engine.runner._wide = wide
        for b in batches:
            # warm-up of this batch size (CUDA graph capture) on other prompts: the same ones would leave
            # their pages in the prefix cache and the timed prefill would compute nothing
            run(engine, b, a.prompt_len, 4, vocab, seed=1)
            rows.append(dict(overlap=mode, **run(engine, b, a.prompt_len, a.max_tokens, vocab,
                                                 tokens=outputs.setdefault(f"{i}:{mode}", []))))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        engine.close()
    same = len({json.dumps(v) for v in outputs.values()}) == 1  # greedy tokens equal in every mode
    print(json.dumps(dict(report, rows=rows, same_tokens_in_every_mode=same, differences=differences(outputs)),
                     indent=1))


def differences(outputs: dict) -> list:
    """Where the first mode's greedy tokens and each other mode's part: (modes, batch, request, first
    differing position, tokens generated) per differing request, the first 8 and how many in all."""
    (first, base), found = next(iter(outputs.items())), []
    for mode, runs in list(outputs.items())[1:]:
        for run_a, run_b in zip(base, runs):
            for r, (x, y) in enumerate(zip(run_a, run_b)):
                if x != y:
                    pos = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
                    found.append(dict(modes=[first, mode], batch=len(run_a), request=r, position=pos, of=len(x)))
    return found[:8] + ([dict(differing_requests=len(found))] if found else [])


if __name__ == "__main__":
    main()
