"""Batched greedy generation: the simplest loop over ModelRunner (tests and the README demo).

    python -m runtime.generate --w artifacts/ --prompt "Once upon a time" --max 64

The serving engine (scheduler, sampling, streaming) is the user-facing path; this is its oracle.
"""

from __future__ import annotations

import numpy as np

from formats.errors import exit_on_error

from .artifact import Artifact
from .cli import add_model_flags, number, parser, use_cache_flag
from .model_runner import ModelRunner
from .tokenizer import Tokenizer


def generate_ids(runner: ModelRunner, prompts: list[list[int]], max_tokens: int,
                 stop_ids: set[int] = frozenset()) -> list[list[int]]:
    """Greedy continuation of each prompt (token ids), all sequences batched in every step."""
    seqs = list(range(len(prompts)))
    for s in seqs:
        runner.add_sequence(s)
    outputs: list[list[int]] = [[] for _ in prompts]
    try:
        logits = runner.forward(seqs, [list(p) for p in prompts])
        active = list(seqs)
        while active:
            next_ids = np.argmax(logits, axis=-1)
            still = []
            for s, tok in zip(active, next_ids.tolist()):
                if tok in stop_ids:
                    continue
                outputs[s].append(tok)
                if len(outputs[s]) < max_tokens and len(prompts[s]) + len(outputs[s]) < runner.max_context:
                    still.append(s)
            active = still
            if active:
                logits = runner.forward(active, [[outputs[s][-1]] for s in active])
    finally:
        for s in seqs:
            runner.remove_sequence(s)
    return outputs


def generate(runner: ModelRunner, tokenizer: Tokenizer, prompts: list[str], max_tokens: int) -> list[str]:
    """Greedy text continuations of `prompts`, stopping at the model's end-of-sequence tokens."""
    ids = [tokenizer.encode(p) for p in prompts]
    stop = set(tokenizer.eos_token_ids)
    return [tokenizer.decode(out) for out in generate_ids(runner, ids, max_tokens, stop)]


def main(argv: list[str] | None = None) -> None:
    p = parser("python -m runtime.generate", "Print a greedy continuation of a prompt (no sampling, no batching).")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--max", "--max-tokens", "--max_tokens", type=number(int, 1), default=256, metavar="N",
                   help="tokens to generate")
    add_model_flags(p)
    args = p.parse_args(argv)
    use_cache_flag(args)
    artifact = Artifact.open(args.w, args.dtype, args.quant)
    runner = ModelRunner(artifact, device=f"{artifact.target}:{args.d[0]}")
    tokenizer = Tokenizer(artifact.path)
    print(args.prompt + generate(runner, tokenizer, [args.prompt], args.max)[0])


if __name__ == "__main__":
    exit_on_error(main)
