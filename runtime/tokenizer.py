"""Text ↔ token ids for an artifact, a Hugging Face folder, a tokenizer.json, a SentencePiece
tokenizer.model or a GGUF file (the last two converted by formats/vocab.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from formats.errors import KilnError
from formats.vocab import gguf_tokenizer_files, sentencepiece_tokenizer


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text()) if file.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KilnError(f"{file}: not valid JSON ({e})") from None


def _load(path: Path) -> tuple[HFTokenizer, dict, dict]:
    if path.is_file() and path.suffix == ".gguf":
        from formats.gguf import GGUFFile  # the checked GGUF reader; lazy: most artifacts have tokenizer.json
        return gguf_tokenizer_files(GGUFFile(path).metadata, str(path))
    folder = path if path.is_dir() else path.parent
    config, gen = _read_json(folder / "tokenizer_config.json"), _read_json(folder / "generation_config.json")
    if (folder / "chat_template.jinja").is_file():  # newer transformers save the template here; it wins
        config["chat_template"] = (folder / "chat_template.jinja").read_text()
    file = path if path.is_file() else folder / "tokenizer.json"
    if not file.is_file() and (folder / "tokenizer.model").is_file():
        file = folder / "tokenizer.model"
    if not file.is_file():
        raise KilnError(f"{path}: no tokenizer.json or tokenizer.model here; point at a model folder, "
                        "artifact, tokenizer file or GGUF file")
    if file.suffix == ".model":
        tok, spm_config, spm_gen = sentencepiece_tokenizer(file)
        return tok, spm_config | config, spm_gen | gen
    try:
        return HFTokenizer.from_file(str(file)), config, gen
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise KilnError(f"{file}: not a readable tokenizer.json ({e})") from None


class Tokenizer:
    """Encodes with the model's BOS behaviour and decodes ids back to text."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise KilnError(f"{path}: no such file or folder")
        self._tok, self.config, gen = _load(self.path)
        self.chat_template = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: transformers uses "default"
            self.chat_template = {t.get("name"): t.get("template") for t in self.chat_template
                                  if isinstance(t, dict)}.get("default")
        self.bos_token_id = self._token_id(self.config.get("bos_token")) if "bos_token" in self.config \
            else gen.get("bos_token_id")
        eos = gen.get("eos_token_id", self._token_id(self.config.get("eos_token")))
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos]) - {None}

    @property
    def hf(self) -> HFTokenizer:
        """The underlying HF `tokenizers` object (to save it as tokenizer.json)."""
        return self._tok

    def special_token(self, key: str) -> str | None:
        """The text of "bos_token"/"eos_token"/... from tokenizer_config.json (plain or AddedToken dict)."""
        token = self.config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        if token is None and key in ("bos_token", "eos_token"):
            ids = [self.bos_token_id] if key == "bos_token" else sorted(self.eos_token_ids)
            token = self._tok.id_to_token(ids[0]) if ids and ids[0] is not None else None
        return token

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Prompt text for chat messages with the model's template (runtime.chat_template's fallback if none)."""
        from .chat_template import apply_chat_template
        return apply_chat_template(messages, self.chat_template, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.special_token("bos_token"),
                                   eos_token=self.special_token("eos_token"), **kwargs)

    def _token_id(self, token) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    # The *_batch calls release the GIL (the single ones hold it): a server thread encoding a huge
    # prompt must not stop the event loop or the engine thread.
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if len(ids) < 256:  # the detokenizer's per-token windows: cheaper without the thread hand-off
            return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self._tok.decode_batch([list(ids)], skip_special_tokens=skip_special_tokens)[0]


class IncrementalDetokenizer:
    """Streams text as tokens arrive: each `add` returns only the new, complete text.

    Decoding token by token is wrong twice over: a character split across byte tokens would come
    out as U+FFFD, and SentencePiece's leading-space rule depends on the neighbouring token. So
    each step decodes a short window that starts a few tokens back and emits what it adds to the
    window's previous text; text ending in an incomplete UTF-8 sequence (U+FFFD) waits for the
    next token. `flush` returns what is still held at the end of a stream.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text):]

    def flush(self) -> str:
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(prefix_text):]
