"""Batch completion: every prompt at once through the engine, then a throughput summary.

    python -m runtime.complete --w model.gguf --prompts "How are you? | How to make money?" --max 64 --dtype f32
    python -m runtime.complete --w artifacts/ --file prompts.txt --temperature 0   # one prompt a line
"""

from __future__ import annotations

import time
from pathlib import Path

from .cli import add_engine_flags, add_sampling_flags, engine_and_params, parser
from formats.errors import KilnError, exit_on_error


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
        found = [p.strip() for p in prompts.split("|")]
    else:
        raise KilnError('give prompts with --prompts "first | second" or --file FILE (one per line)')
    found = [p for p in found if p]
    if not found:
        raise KilnError("no prompts given (all empty)")
    return found


def main(argv: list[str] | None = None) -> None:
    p = parser("python -m runtime.complete", "Complete prompts in one batch, then print throughput.")
    p.add_argument("--prompts", default=None, metavar='"A | B"', help="prompts separated by |, kept as typed")
    p.add_argument("--file", default=None, help="a text file with one prompt a line")
    add_engine_flags(p)
    add_sampling_flags(p)
    args = p.parse_args(argv)
    texts = read_prompts(args.prompts, args.file)
    engine, params = engine_and_params(args)
    with engine:  # Ctrl-C: the engine thread stops between steps before the process ends
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
    exit_on_error(main)
