"""Two artifacts of the same model and weights decode alike on one GPU (a fusion's build against main's, say).

Run on the GPU machine:  python bench/compare_artifacts.py ART_A ART_B [--batches 1,3,12] [--steps 16]

Both decode the same prompts together at each batch size (teacher-forced along A's greedy path, so that the
positions agree): prints one JSON row per batch with the largest relative logits difference over the steps
and whether free-running greedy decoding gives the same tokens; "ok" when the difference is within bf16
noise (2e-2, bench/gpu_parity.py's bound against transformers). Batches above 8 rows run `decode_wide`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = [1, 17, 99, 3, 250, 42, 7, 11, 200, 5]
TOLERANCE = 2e-2


def compare(a: Path, b: Path, batch: int, steps: int) -> dict:
    import numpy as np

    from runtime.generate import generate_ids
    from runtime.model_runner import ModelRunner

    prompts = [[(t * (i + 3)) % 250 + 3 for t in PROMPT] for i in range(batch)]
    runners = [ModelRunner(art, kv_tokens=4096) for art in (a, b)]
    greedy = [generate_ids(r, prompts, steps) for r in runners]
    seqs = list(range(batch))
    logits = []
    for runner in runners:
        for s in seqs:
            runner.add_sequence(s)
        got = [runner.forward(seqs, prompts)]
        got += [runner.forward(seqs, [[greedy[0][i][t]] for i in seqs]) for t in range(steps - 1)]
        for s in seqs:
            runner.remove_sequence(s)
        logits.append(got)
    rel = max(float(np.linalg.norm(x[r] - y[r]) / np.linalg.norm(y[r]))
              for x, y in zip(*logits) for r in seqs)
    return dict(batch=batch, max_logits_rel_diff=round(rel, 5), same_greedy_tokens=greedy[0] == greedy[1],
                ok=rel < TOLERANCE)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--batches", default="1,3,12")
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    for batch in (int(b) for b in args.batches.split(",")):
        print(json.dumps(compare(args.a, args.b, batch, args.steps)), flush=True)


if __name__ == "__main__":
    main()
