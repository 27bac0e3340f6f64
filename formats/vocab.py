"""Vocabulary conversion: a GGUF vocabulary (`tokenizer.ggml.*`) or a SentencePiece tokenizer.model
rebuilt as one HF `tokenizers` Tokenizer, in the layout transformers' converters write, so encoding
and decoding run in the same well-tested Rust code whatever file the model came in. Used by the
compiler (to write tokenizer.json) and by the runtime (to read a GGUF or tokenizer.model directly).
"""

from __future__ import annotations

import struct
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from formats.errors import KilnError

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
