"""python -m runtime.tokenize --model FILE_OR_DIR [--ids] TEXT

Prints the token ids of TEXT (with BOS when the model adds one), or with --ids the text of the
given ids (special tokens shown) ("1 403 407", "1,403,407" or "[1, 403, 407]").
MODEL is an artifact, an HF folder, a tokenizer.json / tokenizer.model or a GGUF file.
"""

from __future__ import annotations

import re
from pathlib import Path

from .cli import parser
from formats.errors import KilnError, exit_on_error
from .model_file import MANIFEST, resolve_model
from .tokenizer import Tokenizer


def main(argv: list[str] | None = None) -> None:
    """Text → ids, or with --ids, ids → text. The words are kept exactly as typed ("1e5" stays text)."""
    p = parser("python -m runtime.tokenize", "Print the token ids of TEXT, or with --ids the text of ids.")
    p.add_argument("--model", required=True, metavar="FILE_OR_DIR",
                   help="an artifact (or folder of them), an HF folder, a tokenizer.json / tokenizer.model or a .gguf")
    p.add_argument("--ids", action="store_true", help="TEXT is token ids ('1 403 407', '1,403,407' or '[1, 403]')")
    p.add_argument("text", nargs="*", help="the text (or ids)")
    args = p.parse_args(argv)
    path = Path(args.model)
    if path.is_dir() and not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model")) \
            and any(path.glob(f"*/{MANIFEST}")):
        path = resolve_model(path)  # a folder of artifacts, as `--w artifacts/` takes
    tok = Tokenizer(path)
    words = " ".join(args.text)
    if args.ids:
        numbers = re.findall(r"-?\d+", words)
        if not numbers or any(int(n) < 0 or int(n) >= tok.vocab_size for n in numbers):
            raise KilnError(f"--ids needs token ids between 0 and {tok.vocab_size - 1}, got {words!r}")
        print(tok.decode([int(n) for n in numbers], skip_special_tokens=False))
    else:
        print(" ".join(map(str, tok.encode(words, add_special_tokens=True))))


if __name__ == "__main__":
    exit_on_error(main)
