"""Tensor parallelism on GPUs: TP=N against TP=1 on the same machine (issue 13's GPU report).

Build here (nvcc, no GPU): a tiny random Llama-3 (head_dim 128, 4 heads, 2 KV heads) with weights,
compiled for one device, --tp 1 and --tp 2, and the Llama-3.1-8B shape without weights:
  python -m compile --model HF_TINY --target cuda --context 512 --prefill_chunk 128 --max_batch 8 --out G/tiny-none
  python -m compile ... --out G/tiny-1 --tp 1;   python -m compile ... --out G/tiny-2 --tp 2
  python -m compile --model llama3 --target cuda --out G/llama3-none;   ... --out G/llama3-1 --tp 1   (-2 --tp 2)
There (logits: TP=1 through Disco + NCCL on one GPU, or TP=2 on two, against the one-device artifact):
  python3 bench/tensor_parallel.py parity G/tiny-none G/tiny-1
  python3 bench/tensor_parallel.py speed G/llama3-none G/llama3-1 --tokenizer TOKENIZER_DIR   (or G/llama3-2)
The 8B-shape artifacts get random weights on first use (bench/random_weights.py; every rank the same
values); TOKENIZER_DIR needs a vocabulary of at least 128,256 entries (random prompt ids).

`speed` prints, for each artifact, batch-1 decode tokens/s and batch-B generated tokens/s through the
Engine (greedy, random prompt ids, ignore_eos), decode-step milliseconds of the runner, and the ratios
TP=N / TP=1 (issue 13 asks ≥ 1.6× at batch 1 and ≥ 1.7× at batch 64 for TP=2). `parity` prints the
largest logit difference between a one-device artifact and a tensor-parallel one over a ragged prefill
and decode steps, relative to the largest logit. A --tp 1 artifact runs through Disco and NCCL on one GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engine_throughput import run, step_times  # noqa: E402
from bench.random_weights import fill  # noqa: E402
from runtime import Engine, EngineConfig  # noqa: E402
from runtime.model_runner import ModelRunner  # noqa: E402
from runtime.sharded_runner import ShardedModelRunner  # noqa: E402

PROMPTS = [[1, 17, 99, 3, 250, 42, 7], [1, 5], list(range(100, 170))]


def speed(artifact: Path, tokenizer: Path | None, batch: int, prompt_len: int, max_tokens: int) -> dict:
    manifest = yaml.safe_load((artifact / "kiln.yaml").read_text())
    if not manifest.get("weights"):
        fill(artifact, tokenizer)
    tp = manifest.get("tensor_parallel") or 1
    engine = Engine(EngineConfig(model_path=str(artifact), device_ids=list(range(tp)),
                                 kv_tokens=batch * (max(prompt_len + max_tokens, 320) + 64),  # step_times: 256 + 33
                                 max_num_seqs=batch,
                                 max_num_batched_tokens=4096))
    vocab = engine.runner.vocab_size
    run(engine, 4, 32, 8, vocab)  # warm-up: first kernel launches, CUDA graphs of small batches
    steps = step_times(engine.runner, batches=(1, batch))
    rows = [run(engine, 1, prompt_len, max_tokens, vocab), run(engine, batch, prompt_len, max_tokens, vocab)]
    engine.close()
    if hasattr(engine.runner, "close"):
        engine.runner.close()
    return dict(artifact=artifact.name, tp=manifest.get("tensor_parallel"), runner=steps, rows=rows)


def parity(one: Path, sharded: Path) -> dict:
    tp = yaml.safe_load((sharded / "kiln.yaml").read_text())["tensor_parallel"]
    runners = [ModelRunner(one, max_batch=4, kv_tokens=1024),
               ShardedModelRunner(sharded, list(range(tp)), max_batch=4, kv_tokens=1024)]
    worst, peak = 0.0, 0.0
    for r in runners:
        for i in range(len(PROMPTS)):
            r.add_sequence(i)
    logits = [r.forward(list(range(len(PROMPTS))), PROMPTS) for r in runners]
    for _ in range(8):
        worst, peak = max(worst, float(np.abs(logits[0] - logits[1]).max())), max(peak, float(np.abs(logits[0]).max()))
        tokens = [[int(t)] for t in logits[0].argmax(axis=1)]  # both follow the one-device model's tokens
        logits = [r.forward(list(range(len(PROMPTS))), tokens) for r in runners]
    runners[1].close()
    return dict(tp=tp, max_abs_diff=worst, max_abs_logit=peak, relative=worst / peak)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("speed")
    s.add_argument("tp1", type=Path)
    s.add_argument("tpn", type=Path)
    s.add_argument("--tokenizer", type=Path)
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--prompt-len", type=int, default=128)
    s.add_argument("--max-tokens", type=int, default=128)
    p = sub.add_parser("parity")
    p.add_argument("one", type=Path)
    p.add_argument("sharded", type=Path)
    a = ap.parse_args()
    if a.mode == "parity":
        print(json.dumps(parity(a.one, a.sharded), indent=1))
        return
    base, tpn = (speed(art, a.tokenizer, a.batch, a.prompt_len, a.max_tokens) for art in (a.tp1, a.tpn))
    ratio = {"batch1_decode": tpn["rows"][0]["generated_tok_s"] / base["rows"][0]["generated_tok_s"],
             f"batch{a.batch}_generated": tpn["rows"][1]["generated_tok_s"] / base["rows"][1]["generated_tok_s"]}
    print(json.dumps(dict(tp1=base, tpn=tpn, ratio_tpn_over_tp1={k: round(v, 2) for k, v in ratio.items()}), indent=1))


if __name__ == "__main__":
    main()
