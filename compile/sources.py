"""Model sources: where a model's config, weights and tokenizer come from.

A source gives an HF-style config dict, HF tensor names, one tensor at a time (memory-mapped,
so converting never holds the model twice) and the tokenizer files. `open_source` picks the reader:
an HF folder here, a GGUF file in gguf_source.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors import safe_open

from runtime.errors import KilnError

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
        self._open: dict[Path, object] = {}
        self._where = self._index()

    def _index(self) -> dict[str, Path]:
        """tensor name → shard file, from model.safetensors.index.json or the shards' own headers."""
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise KilnError(f"{index}: malformed index ({e})") from None
            where = {name: self.path / shard for name, shard in weight_map.items()}
            for shard in sorted(set(where.values())):
                if not shard.is_file():
                    raise KilnError(f"{shard}: shard listed in {index.name} is missing")
            return where
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise KilnError(f"{self.path}: no *.safetensors weights found")
        where = {}
        for shard in shards:
            for name in self._handle(shard).keys():
                where[name] = shard
        return where

    def _handle(self, shard: Path):
        if shard not in self._open:
            try:
                self._open[shard] = safe_open(str(shard), framework="numpy")
            except Exception as e:  # safetensors raises its own error types for a bad header
                raise KilnError(f"{shard}: not a readable safetensors file ({e})") from None
        return self._open[shard]

    def tensor_names(self) -> list[str]:
        return list(self._where)

    def tensor(self, name: str) -> np.ndarray:
        shard = self._where.get(name)
        if shard is None:
            raise KilnError(f"{self.path}: tensor '{name}' not found in the safetensors weights")
        try:
            return self._handle(shard).get_tensor(name)
        except Exception as e:
            raise KilnError(f"{shard}: cannot read tensor '{name}' ({e})") from None

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
        from .gguf_source import GGUFSource
        return GGUFSource(path)
    return HFSource(path)
