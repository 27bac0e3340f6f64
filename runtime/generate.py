"""Batched greedy generation: the simplest loop over ModelRunner (tests and the README demo).

    python -m runtime.generate --w artifacts/ --prompt "Once upon a time" --max_tokens 64

The serving engine (scheduler, sampling, streaming) is the user-facing path; this is its oracle.
"""

from __future__ import annotations

import sys

import numpy as np

from formats.errors import KilnError
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


def main(w: str = "artifacts/", prompt: str = "Once upon a time", max_tokens: int = 256, device: str = None):
    """Print a greedy continuation of PROMPT from the artifact at W."""
    runner = ModelRunner(w, device=device)
    tokenizer = Tokenizer(runner.artifact.path)
    print(prompt + generate(runner, tokenizer, [prompt], max_tokens)[0])


if __name__ == "__main__":
    import fire  # the CLI's only: the GPU machine's runtime-only site has no fire's dependencies

    try:
        fire.Fire(main, name="python -m runtime.generate")
    except KilnError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
