"""Text ↔ token ids for an artifact, a Hugging Face folder or a tokenizer.json (HF `tokenizers`)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from .errors import KilnError


class Tokenizer:
    """Encodes with the model's BOS behaviour and decodes ids back to text."""

    def __init__(self, path: str | Path):
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        file = path if path.is_file() else folder / "tokenizer.json"
        if not file.is_file():
            raise KilnError(f"{file}: no tokenizer.json here; point at a model folder or artifact that has one")
        self._tok = HFTokenizer.from_file(str(file))
        cfg_file = folder / "tokenizer_config.json"
        self.config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.chat_template = self.config.get("chat_template")
        gen_file = folder / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        self.bos_token_id = self._token_id(self.config.get("bos_token")) if "bos_token" in self.config \
            else gen.get("bos_token_id")
        eos = gen.get("eos_token_id", self._token_id(self.config.get("eos_token")))
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos]) - {None}

    def _token_id(self, token) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
