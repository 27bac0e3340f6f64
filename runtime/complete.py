"""Batch completion: every prompt at once through the engine, then a throughput summary.

    python -m runtime.complete --w artifacts/ --prompts "How are you? | How to make money?" --max 128
    python -m runtime.complete --w artifacts/ --file prompts.txt --temperature 0   # one prompt a line
"""

from __future__ import annotations

import time
from pathlib import Path

from .cli import check_flags, engine_and_params, run
from formats.errors import KilnError


def read_prompts(prompts: str | None, file: str | None) -> list[str]:
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise KilnError(f"--file {file}: no such file")
        try:
            found = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError:
            raise KilnError(f"--file {file}: not UTF-8 text") from None
    elif prompts is not None:
        found = [p.strip() for p in str(prompts).split("|")]
    else:
        raise KilnError('give prompts with --prompts "first | second" or --file FILE (one per line)')
    found = [p for p in found if p]
    if not found:
        raise KilnError("no prompts given (all empty)")
    return found


def main(w: str = "artifacts/", prompts: str | None = None, file: str | None = None, **flags):
    """Complete each prompt (--prompts split on '|', or --file with one per line). Engine and sampling
    flags as chat: --d --kvmem --max --temperature --top-p --top-k --min-p --seed --stop, penalties."""
    check_flags(flags)
    texts = read_prompts(prompts, file)
    engine, params = engine_and_params(w, **flags)
    start = time.perf_counter()
    outputs = engine.generate_sync(params, texts)
    seconds = time.perf_counter() - start
    for i, (prompt, out) in enumerate(zip(texts, outputs)):
        print(f"[{i}] {prompt}")
        print(f"error: {out.error}" if out.error else out.text)
        print()
    tokens = sum(o.num_output_tokens for o in outputs)
    print(f"{len(texts)} prompts, {tokens} tokens in {seconds:.2f} s, {tokens / seconds:.1f} tokens/s")


if __name__ == "__main__":
    run(main, "python -m runtime.complete")
