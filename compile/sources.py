"""Model sources: where a model's config, weights and tokenizer come from.

A source gives an HF-style config dict, HF tensor names, one tensor at a time (memory-mapped,
so converting never holds the model twice) and the tokenizer files. `open_source` picks the reader:
an HF folder here, a GGUF file in formats/gguf.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from formats.errors import KilnError

from formats.safetensors_checks import SafetensorsModel

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "chat_template.jinja")


class HFSource:
    """A Hugging Face model folder: config.json + model.safetensors or sharded safetensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise KilnError(f"{config_file}: config.json not found; is {self.path} a Hugging Face model folder?")
        try:
            self.config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise KilnError(f"{config_file}: malformed JSON ({e})") from None
        self._weights = SafetensorsModel(self.path)

    def files(self) -> list[Path]:
        """The files the model is made of (what the artifact's content hash covers)."""
        return [self.path / "config.json", *self._weights.files()]

    def tensor_names(self) -> list[str]:
        return self._weights.names()

    def tensor(self, name: str) -> np.ndarray:
        """The tensor in its stored dtype, a memory-mapped view (convert casts it)."""
        return self._weights.array(name)

    def write_tokenizer(self, out_dir: Path) -> None:
        for name in TOKENIZER_FILES:
            if (self.path / name).is_file():
                shutil.copyfile(self.path / name, out_dir / name)


def open_source(path: str | Path):
    """The reader for `path`: a GGUF file or an HF folder."""
    path = Path(path)
    if not path.exists():
        raise KilnError(f"{path}: no such file or folder")
    if path.suffix == ".gguf":
        from formats.gguf import GGUFSource
        return GGUFSource(path)
    return HFSource(path)
