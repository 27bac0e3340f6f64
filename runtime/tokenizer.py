"""Text ↔ token ids for an artifact, a Hugging Face folder, a tokenizer.json, a SentencePiece
tokenizer.model or a GGUF file.

Every input becomes one HF `tokenizers` Tokenizer: a GGUF vocabulary (`tokenizer.ggml.*`) or a
SentencePiece model is rebuilt in the layout transformers' converters write, so encoding and
decoding run in the same well-tested Rust code whatever file the model came in.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from .errors import KilnError

SPM_SPACE = "\u2581"
# Token types shared by llama.cpp (`tokenizer.ggml.token_type`) and SentencePiece's ModelProto.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# tokenizer.ggml.pre -> split regex: the expressions of the models' own tokenizer.json files
# (llama.cpp's llama-vocab.cpp uses the same ones). Others (llama.cpp's "default" included) have
# their own regexes and are refused rather than approximated. Tested: llama-bpe, qwen2.
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_BPE_PRE = {"llama-bpe": _LLAMA3_RE, "llama3": _LLAMA3_RE, "llama-v3": _LLAMA3_RE, "qwen2": _QWEN2_RE,
            "gpt-2": _GPT2_RE}
# Llama 3's tokenizer.json sets ignore_merges (a word that is itself a token is not re-merged).
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3"}


def _add_vocab_tokens(tok: HFTokenizer, tokens: list[str], types: list[int]) -> None:
    """Control/unknown tokens become special added tokens, user-defined ones plain added tokens:
    both are matched verbatim in the input before the model runs (as in transformers and llama.cpp)."""
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty in (CONTROL, UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)


def _bos_processor(tokens: list[str], bos_id: int | None, add_bos: bool):
    if not add_bos or bos_id is None:
        return None
    bos = tokens[bos_id]
    return processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                         special_tokens=[(bos, bos_id)])


def _vocab(tokens: list[str]) -> dict[str, int]:
    """piece -> id; a piece listed twice maps to its last id, as in llama.cpp's token_to_id."""
    return {t: i for i, t in enumerate(tokens)}


def spm_tokenizer(tokens: list[str], scores: list[float], types: list[int], *, unk_id: int | None,
                  bos_id: int | None, add_bos: bool, add_space_prefix: bool = True) -> HFTokenizer:
    """SentencePiece BPE with byte fallback (Llama 2, Mistral, TinyStories), as transformers'
    LlamaConverter lays it out: merges are every split of a normal piece into two pieces, ranked
    by the merged piece's score, which is exactly SentencePiece's greedy highest-score merge."""
    vocab = _vocab(tokens)
    merges = []
    for pid, piece in enumerate(tokens):
        if types[pid] != NORMAL or vocab[piece] != pid:
            continue
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                merges.append((-scores[pid], vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: m[:3])
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=unk,
                                 fuse_unk=True, byte_fallback=True))
    norms = [normalizers.Prepend(SPM_SPACE)] if add_space_prefix else []
    tok.normalizer = normalizers.Sequence(norms + [normalizers.Replace(" ", SPM_SPACE)])
    strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()] + strip)
    _add_vocab_tokens(tok, tokens, types)
    if (post := _bos_processor(tokens, bos_id, add_bos)) is not None:
        tok.post_processor = post
    return tok


def bpe_tokenizer(tokens: list[str], types: list[int], merges: list[str], pre: str, *,
                  bos_id: int | None, add_bos: bool, source: str = "") -> HFTokenizer:
    """Byte-level BPE (GPT-2 style: Llama 3, Qwen2/2.5/3) with the pre-tokenizer named by
    `tokenizer.ggml.pre`."""
    if pre not in _BPE_PRE:
        raise KilnError(f"{source}: tokenizer.ggml.pre = {pre!r} is not supported; "
                        f"known: {', '.join(sorted(_BPE_PRE))}")
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise KilnError(f"{source}: tokenizer.ggml.merges entry {m!r} is not two tokens separated by a space")
        pairs.append((left, right))
    tok = HFTokenizer(models.BPE(vocab=_vocab(tokens), merges=pairs, ignore_merges=pre in _IGNORE_MERGES))
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_BPE_PRE[pre]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    _add_vocab_tokens(tok, tokens, types)
    post = _bos_processor(tokens, bos_id, add_bos)
    tok.post_processor = post if post is not None else processors.ByteLevel(trim_offsets=False)
    return tok


def _meta_value(meta: dict, key: str, kind, source: str, default=None, array: bool = False):
    """A GGUF metadata value of the expected type (a list of it when `array`), else a KilnError."""
    value = meta.get(key, default)
    if value is None:
        raise KilnError(f"{source}: GGUF metadata has no {key}; cannot build a tokenizer")
    items = value if array and isinstance(value, list) else [value]
    if (array and not isinstance(value, list)) or not all(isinstance(v, kind) for v in items) or \
            (kind is int and any(isinstance(v, bool) for v in items)):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise KilnError(f"{source}: GGUF metadata {key} is not {'an array of ' if array else 'a '}{names}")
    return value


def gguf_tokenizer_files(meta: dict, source: str = "") -> tuple[HFTokenizer, dict, dict]:
    """(tokenizer, tokenizer_config, generation_config) from GGUF `tokenizer.*` metadata."""
    kind = _meta_value(meta, "tokenizer.ggml.model", str, source)
    tokens = _meta_value(meta, "tokenizer.ggml.tokens", str, source, array=True)
    types = _meta_value(meta, "tokenizer.ggml.token_type", int, source, [NORMAL] * len(tokens), array=True)
    if len(types) != len(tokens):
        raise KilnError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    ids = {}
    for k in ("bos", "eos", "unknown", "padding", "eot", "eom"):
        key = f"tokenizer.ggml.{k}_token_id"
        ids[k] = _meta_value(meta, key, int, source) if key in meta else None
        if ids[k] is not None and not 0 <= ids[k] < len(tokens):
            raise KilnError(f"{source}: {key} = {ids[k]} is outside the {len(tokens)}-token vocabulary")
    add_bos_default = kind == "llama" or meta.get("tokenizer.ggml.pre") in _IGNORE_MERGES
    add_bos = _meta_value(meta, "tokenizer.ggml.add_bos_token", bool, source, add_bos_default)
    try:
        if kind == "llama":
            scores = _meta_value(meta, "tokenizer.ggml.scores", (int, float), source, array=True)
            if len(scores) != len(tokens):
                raise KilnError(f"{source}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
            space = _meta_value(meta, "tokenizer.ggml.add_space_prefix", bool, source, True)
            tok = spm_tokenizer(tokens, scores, types, unk_id=ids["unknown"], bos_id=ids["bos"], add_bos=add_bos,
                                add_space_prefix=space)
        elif kind == "gpt2":
            pre = _meta_value(meta, "tokenizer.ggml.pre", str, source)
            merges = _meta_value(meta, "tokenizer.ggml.merges", str, source, array=True)
            tok = bpe_tokenizer(tokens, types, merges, pre, bos_id=ids["bos"], add_bos=add_bos, source=source)
        else:
            raise KilnError(f"{source}: tokenizer.ggml.model = {kind!r} is not supported (llama or gpt2)")
    except KilnError:
        raise
    except Exception as e:  # tokenizers reports a bad vocabulary (e.g. a merge of unknown tokens) as Exception
        raise KilnError(f"{source}: the GGUF vocabulary does not make a tokenizer ({e})") from None
    name = lambda i: None if i is None else tokens[i]  # noqa: E731
    config = {"bos_token": name(ids["bos"]), "eos_token": name(ids["eos"]), "unk_token": name(ids["unknown"]),
              "pad_token": name(ids["padding"]), "add_bos_token": add_bos,
              "add_eos_token": _meta_value(meta, "tokenizer.ggml.add_eos_token", bool, source, False)}
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = _meta_value(meta, "tokenizer.chat_template", str, source)
    config = {k: v for k, v in config.items() if v is not None}
    # Chat models end a turn with EOT/EOM (Llama 3's <|eot_id|>, <|eom_id|>): generation stops on all of them.
    stops = list(dict.fromkeys(i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None))
    generation = {"bos_token_id": ids["bos"], "eos_token_id": stops[0] if len(stops) == 1 else stops or None}
    return tok, config, {k: v for k, v in generation.items() if v is not None}


def _protobuf_fields(buf: bytes, where: str):
    """(field number, value) pairs of one protobuf message: ints for varints, bytes otherwise."""
    i, n = 0, len(buf)

    def varint():
        nonlocal i
        shift = value = 0
        while True:
            if i >= n or shift > 63:
                raise KilnError(f"{where}: corrupt protobuf (truncated varint)")
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value
    while i < n:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, varint()
        elif wire in (1, 2, 5):
            size = 8 if wire == 1 else 4 if wire == 5 else varint()
            if i + size > n:
                raise KilnError(f"{where}: corrupt protobuf (field {field} runs past the end)")
            yield field, buf[i:i + size]
            i += size
        else:
            raise KilnError(f"{where}: corrupt protobuf (wire type {wire})")


def sentencepiece_tokenizer(path: Path) -> tuple[HFTokenizer, dict, dict]:
    """A SentencePiece BPE tokenizer.model (its ModelProto read directly: no sentencepiece or protobuf
    package needed) as (tokenizer, tokenizer_config, generation_config)."""
    tokens, scores, types = [], [], []
    trainer = {3: 1, 40: 0, 41: 1, 42: 2}  # model_type (1 unigram, 2 BPE), unk/bos/eos ids: proto defaults
    add_dummy_prefix = True
    for field, value in _protobuf_fields(path.read_bytes(), str(path)):
        if field in (1, 2, 3) and not isinstance(value, bytes):
            raise KilnError(f"{path}: corrupt protobuf (field {field} is not a message)")
        if field == 1:
            piece = {1: b"", 2: b"\0\0\0\0", 3: NORMAL} | dict(_protobuf_fields(value, str(path)))
            if not (isinstance(piece[1], bytes) and isinstance(piece[2], bytes) and len(piece[2]) == 4
                    and isinstance(piece[3], int)):
                raise KilnError(f"{path}: corrupt protobuf (SentencePiece piece #{len(tokens)})")
            tokens.append(piece[1].decode("utf-8", "replace"))
            scores.append(struct.unpack("<f", piece[2])[0])
            types.append(piece[3])
        elif field == 2:
            trainer |= {k: v for k, v in _protobuf_fields(value, str(path)) if k in trainer and isinstance(v, int)}
        elif field == 3:
            add_dummy_prefix = bool(dict(_protobuf_fields(value, str(path))).get(3, 1))
    if not tokens:
        raise KilnError(f"{path}: no SentencePiece pieces found; is this a tokenizer.model?")
    if trainer[3] != 2:
        raise KilnError(f"{path}: SentencePiece model type {trainer[3]} is not supported (only BPE, type 2)")
    signed = lambda v: v - (1 << 64) if v >= 1 << 63 else v  # noqa: E731  (-1 = "none" in the proto)
    unk, bos, eos = (signed(trainer[k]) for k in (40, 41, 42))
    valid = lambda v: v if 0 <= v < len(tokens) else None  # noqa: E731
    unk, bos, eos = valid(unk), valid(bos), valid(eos)
    tok = spm_tokenizer(tokens, scores, types, unk_id=unk, bos_id=bos, add_bos=True, add_space_prefix=add_dummy_prefix)
    config = {k: tokens[v] for k, v in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk)) if v is not None}
    config["add_bos_token"] = True
    return tok, config, {k: v for k, v in (("bos_token_id", bos), ("eos_token_id", eos)) if v is not None}


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text()) if file.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KilnError(f"{file}: not valid JSON ({e})") from None


def _load(path: Path) -> tuple[HFTokenizer, dict, dict]:
    if path.is_file() and path.suffix == ".gguf":
        from compile.gguf_source import GGUFFile  # the checked GGUF reader; lazy: most artifacts have tokenizer.json
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
