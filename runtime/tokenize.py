"""python -m runtime.tokenize --model FILE_OR_DIR [--ids] TEXT

Prints the token ids of TEXT (with BOS when the model adds one), or with --ids the text of the
given ids (special tokens shown) ("1 403 407", "1,403,407" or "[1, 403, 407]").
MODEL is an artifact, an HF folder, a tokenizer.json / tokenizer.model or a GGUF file.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import fire

from .artifact import MANIFEST, find_artifact
from formats.errors import KilnError
from .tokenizer import Tokenizer

def _raw_words(argv: list[str]) -> list[str]:
    """The words after the flags exactly as typed: fire would turn "1e5" into 100000.0, "1,2" into a
    tuple, and takes the word after a bare --ids as its value."""
    words, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--model":
            skip = True
        elif arg.startswith("--ids="):
            words.append(arg[len("--ids="):])
        elif not arg.startswith("--"):
            words.append(arg)
    return words


def tokenize(*text, model: str, ids=False) -> None:
    """Text → ids, or with --ids, ids → text."""
    argv = sys.argv[1:]
    words = _raw_words(argv)
    path = Path(model)
    if path.is_dir() and not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model")) \
            and any(path.glob(f"*/{MANIFEST}")):
        path = find_artifact(path)  # a folder of artifacts, as `--w artifacts/` takes
    tok = Tokenizer(path)
    if any(a == "--ids" or a.startswith("--ids=") for a in argv):
        numbers = re.findall(r"-?\d+", " ".join(words))
        if not numbers or any(int(n) < 0 or int(n) >= tok.vocab_size for n in numbers):
            raise KilnError(f"--ids needs token ids between 0 and {tok.vocab_size - 1}, got {' '.join(words)!r}")
        print(tok.decode([int(n) for n in numbers], skip_special_tokens=False))
    else:
        print(" ".join(map(str, tok.encode(" ".join(words), add_special_tokens=True))))


def main() -> None:
    try:
        fire.Fire(tokenize)
    except KilnError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
