"""A GGUF file (llama.cpp's format) as a model source: HF-style config, HF-named float32 tensors, tokenizer.

The same interface as the HF-folder source, so the converter never knows which file a model came in.
The header is parsed and checked here (GGUFFile); dequantization is `gguf.quants.dequantize`,
bit-exact with ggml for every type it implements.
"""

from __future__ import annotations

import json
import mmap
import re
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quant_shape_to_byte_shape

from formats.errors import KilnError
from formats.vocab import gguf_tokenizer_files

GGUF_MAGIC = b"GGUF"
_ARCHS = {  # general.architecture -> (HF architectures[0], model_type)
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Not weights of the HF model: llama.cpp's precomputed llama3 RoPE factors (read into rope_scaling instead).
_NOT_WEIGHTS = {"rope_freqs.weight"}


def hf_name(gguf_name: str) -> str | None:
    """The HF name of a llama.cpp tensor name, or None if it has none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _f32(x) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999974738e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


_SCALAR = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
           12: "<f8"}  # GGUF value type -> numpy dtype (7 = bool); 8 = string, 9 = array
_STRING, _ARRAY, _BOOL = 8, 9, 7
_FLOAT_TYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


class _Cursor:
    """Reads GGUF header values from a memory map; running out of bytes is a KilnError, not garbage."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > len(self.buf):
            raise KilnError(f"{self.path}: truncated GGUF header (reading {what} at byte {self.pos} "
                            f"of {len(self.buf)})")
        p, self.pos = self.pos, self.pos + n
        return p

    def scalar(self, vtype: int, what: str):
        dt = np.dtype(_SCALAR[vtype])
        value = np.frombuffer(self.buf, dt, 1, self.need(dt.itemsize, what))[0].item()
        return bool(value) if vtype == _BOOL else value

    def string(self, what: str) -> str:
        n = self.scalar(10, what)
        p = self.need(n, what)
        try:
            return bytes(self.buf[p:p + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise KilnError(f"{self.path}: {what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str):
        if vtype == _STRING:
            return self.string(what)
        if vtype in _SCALAR:
            return self.scalar(vtype, what)
        if vtype != _ARRAY:
            raise KilnError(f"{self.path}: {what} has unknown value type {vtype}")
        itype, count = self.scalar(4, what), self.scalar(10, what)
        if itype == _STRING:
            if count * 8 > len(self.buf) - self.pos:
                raise KilnError(f"{self.path}: {what} claims {count} strings, more than the file holds")
            return [self.string(what) for _ in range(count)]
        if itype not in _SCALAR:  # nested arrays: no model we load uses them
            raise KilnError(f"{self.path}: {what} is an array of unsupported value type {itype}")
        dt = np.dtype(_SCALAR[itype])
        values = np.frombuffer(self.buf, dt, count, self.need(count * dt.itemsize, what)).tolist()
        return [bool(v) for v in values] if itype == _BOOL else values


class GGUFFile:
    """A GGUF file's metadata and tensor table, parsed and checked; tensor bytes stay memory-mapped.

    Our own header parser: gguf.GGUFReader walks every array element in Python (~15 s for a
    Llama 3 vocabulary) and trusts counts and shapes; this checks each count, type, shape and byte
    range against the file, so a damaged file is a KilnError naming the file and tensor."""

    def __init__(self, path: str | Path):
        self.path = path = Path(path)
        if not path.is_file():
            raise KilnError(f"{path}: no such GGUF file")
        with open(path, "rb") as f:
            magic = f.read(4)
            if magic != GGUF_MAGIC:
                raise KilnError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        cur = _Cursor(self._map, path)
        cur.pos = 4
        version = cur.scalar(4, "version")
        if version not in (2, 3):
            raise KilnError(f"{path}: GGUF version {version} is not supported (2 or 3, little-endian)")
        n_tensors, n_kv = cur.scalar(10, "tensor count"), cur.scalar(10, "metadata count")
        if n_tensors * 24 + n_kv * 13 > len(self._map):  # smallest tensor-info and key/value records
            raise KilnError(f"{path}: header claims {n_tensors} tensors and {n_kv} metadata keys, "
                            "more than the file can hold (corrupt or truncated)")
        self.metadata: dict = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            self.metadata[key] = cur.value(cur.scalar(4, key), key)
        infos = []
        for i in range(n_tensors):
            name = cur.string(f"tensor name #{i}")
            n_dims = cur.scalar(4, name)
            if not 1 <= n_dims <= 4:
                raise KilnError(f"{path}: tensor {name!r}: {n_dims} dimensions (GGUF allows 1 to 4)")
            dims = [cur.scalar(10, name) for _ in range(n_dims)]
            infos.append((name, dims, cur.scalar(4, name), cur.scalar(10, name)))
        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
            raise KilnError(f"{path}: general.alignment = {align!r} is not a power of two")
        data_start = -(-cur.pos // align) * align
        self.tensors: dict[str, tuple[GGMLQuantizationType, list[int], int, int]] = {}
        for name, dims, raw_type, offset in infos:
            where = f"{path}: tensor {name!r}"
            if name in self.tensors:
                raise KilnError(f"{where}: appears twice")
            try:
                qtype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise KilnError(f"{where}: unknown tensor type {raw_type}") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            if 0 in dims:
                raise KilnError(f"{where}: shape {dims} has an empty dimension")
            if dims[0] % block:
                raise KilnError(f"{where}: rows of {dims[0]} elements are not whole {qtype.name} blocks of {block}")
            n_bytes = int(np.prod(dims, dtype=object)) // block * type_size
            start = data_start + offset
            if offset % align:
                raise KilnError(f"{where}: data offset {offset} is not aligned to {align}")
            if start + n_bytes > len(self._map):
                raise KilnError(f"{where}: shape {dims} of {qtype.name} needs {n_bytes} bytes at offset {start}, "
                                f"past the end of the {len(self._map)}-byte file (truncated, or a wrong shape)")
            self.tensors[name] = (qtype, dims, start, n_bytes)
        spans = sorted((start, start + n, name) for name, (_, _, start, n) in self.tensors.items())
        ends = [(nxt, other) for nxt, _, other in spans[1:]] + [(len(self._map), None)]
        for (_, end, name), (nxt, other) in zip(spans, ends):
            qtype, dims, _, _ = self.tensors[name]
            if end > nxt:
                raise KilnError(f"{path}: tensor {name!r}: shape {dims} of {qtype.name} runs {end - nxt} bytes into "
                                f"tensor {other!r} (its byte size disagrees with its shape)")
            # writers pad each tensor to the alignment and no more: a larger gap is data the type and shape
            # do not account for (e.g. a Q4_0 label over F32 bytes)
            if nxt - end >= align and (other is not None or nxt - end >= max(align, 4096)):
                raise KilnError(f"{path}: tensor {name!r}: shape {dims} of {qtype.name} is {self.tensors[name][3]} "
                                f"bytes, but {nxt - end} more follow before "
                                f"{'tensor ' + repr(other) if other else 'the end of the file'} "
                                "(its type or shape disagrees with its data)")

    def blocks(self, name: str) -> np.ndarray:
        """One tensor's raw bytes as uint8 [rows, row bytes] (memory-mapped): the blocks, for repacking."""
        _, dims, start, n_bytes = self.tensors[name]
        rows = int(np.prod(dims[1:], dtype=object))
        return np.frombuffer(self._map, np.uint8, n_bytes, start).reshape(rows, n_bytes // rows)

    def dequantize(self, name: str) -> np.ndarray:
        """One tensor as float32, numpy (reversed GGUF) shape; `gguf.quants.dequantize` for quantized types."""
        qtype, dims, start, n_bytes = self.tensors[name]
        shape = tuple(reversed(dims))
        raw = np.frombuffer(self._map, np.uint8, n_bytes, start)
        if qtype in _FLOAT_TYPES:
            return raw.view(_FLOAT_TYPES[qtype]).astype(np.float32).reshape(shape)
        try:
            out = dequantize(raw.reshape(quant_shape_to_byte_shape(shape, qtype)), qtype)
        except NotImplementedError:
            raise KilnError(f"{self.path}: tensor {name!r} has type {qtype.name}, "
                            "which Kiln cannot dequantize") from None
        return out.astype(np.float32, copy=False)


class GGUFSource:
    """A GGUF model file: `config` (HF config.json style), HF-named tensors, tokenizer files."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = GGUFFile(self.path)
        self.metadata = self.file.metadata
        self._tensors = self.file.tensors
        self.arch = self.metadata.get("general.architecture")
        self._names: dict[str, str] = {}
        if not self._tensors:
            raise KilnError(f"{self.path}: no tensors (a vocab-only GGUF holds a tokenizer, not a model)")
        if self.arch not in _ARCHS:
            raise KilnError(f"{self.path}: general.architecture = {self.arch!r} is not supported "
                            f"({', '.join(_ARCHS)})")
        for name in self._tensors:
            if name in _NOT_WEIGHTS:
                continue
            hf = hf_name(name)
            if hf is None:
                raise KilnError(f"{self.path}: tensor {name!r} has no Hugging Face equivalent for {self.arch}")
            self._names[hf] = name
        self.config = self._config()

    def _meta(self, key: str, default=None, kind: type = int):
        """`{arch}.{key}` as a positive int or float; a missing key without a default is a KilnError."""
        full = f"{self.arch}.{key}"
        value = self.metadata.get(full, default)
        if value is None:
            raise KilnError(f"{self.path}: GGUF metadata has no {full}")
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value <= 0:
            raise KilnError(f"{self.path}: GGUF metadata {full} = {value!r} is not a positive {kind.__name__}")
        return kind(value)

    def _config(self) -> dict:
        arch_name, model_type = _ARCHS[self.arch]
        if "token_embd.weight" not in self._tensors:
            raise KilnError(f"{self.path}: no token_embd.weight tensor")
        hidden = self._meta("embedding_length")
        embd_dims = self._tensors["token_embd.weight"][1]
        if len(embd_dims) != 2 or embd_dims[0] != hidden:
            raise KilnError(f"{self.path}: {self.arch}.embedding_length = {hidden} but token_embd.weight has shape "
                            f"{embd_dims} (GGUF order: hidden, vocab)")
        heads = self._meta("attention.head_count")
        head_dim = self._meta("attention.key_length", hidden // heads)
        cfg = {
            "architectures": [arch_name],
            "model_type": model_type,
            "hidden_size": hidden,
            "intermediate_size": self._meta("feed_forward_length"),
            "num_hidden_layers": self._meta("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._meta("attention.head_count_kv", heads),
            "head_dim": head_dim,
            "vocab_size": self._tensors["token_embd.weight"][1][1],
            "max_position_embeddings": self._meta("context_length"),
            "rms_norm_eps": _f32(self._meta("attention.layer_norm_rms_epsilon", kind=float)),
            "rope_theta": _f32(self._meta("rope.freq_base", 10000.0, float)),
            "rope_scaling": self._rope_scaling(head_dim),
            "hidden_act": "silu",
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "attention_bias": any(n.endswith("self_attn.q_proj.bias") for n in self._names),
            "torch_dtype": "float32",
        }
        for key in ("bos", "eos"):
            if (tid := self.metadata.get(f"tokenizer.ggml.{key}_token_id")) is not None:
                cfg[f"{key}_token_id"] = int(tid)
        return cfg

    def _rope_scaling(self, head_dim: int) -> dict | None:
        """Llama 3's rope_scaling from llama.cpp's rope_freqs tensor (the only scaling Kiln's models support).

        llama.cpp stores llama3 scaling only as the per-frequency factors, so we take Llama 3.1's
        parameters (low 1, high 4, original context 8192) with the largest factor, and check that
        they reproduce the stored factors."""
        kind = self.metadata.get(f"{self.arch}.rope.scaling.type")
        if kind not in (None, "none"):
            raise KilnError(f"{self.path}: RoPE scaling {kind!r} is not supported (Kiln supports Llama 3's, "
                            "which llama.cpp stores as rope_freqs.weight)")
        if "rope_freqs.weight" not in self._tensors:
            return None
        freqs = self.file.dequantize("rope_freqs.weight").astype(np.float64)
        scaling = {"rope_type": "llama3", "factor": float(freqs.max()), "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0,
                   "original_max_position_embeddings": self._meta("rope.scaling.original_context_length", 8192)}
        theta = self._meta("rope.freq_base", 10000.0, float)
        wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
        smooth = np.clip((scaling["original_max_position_embeddings"] / wavelen - 1.0) / 3.0, 0.0, 1.0)
        expect = 1.0 / ((1 - smooth) / scaling["factor"] + smooth)
        if freqs.shape != expect.shape or not np.allclose(freqs, expect, rtol=1e-4):
            raise KilnError(f"{self.path}: rope_freqs.weight is not llama3 RoPE scaling with low/high frequency "
                            "factors 1/4 and original context 8192; this scaling is not supported")
        return scaling

    def files(self) -> list[Path]:
        """The files the model is made of (what the artifact's content hash covers)."""
        return [self.path]

    def tensor_names(self) -> list[str]:
        return list(self._names)

    def _gguf_name(self, name: str) -> str:
        if name not in self._names:
            raise KilnError(f"{self.path}: no tensor {name!r} (GGUF has {len(self._names)} model tensors)")
        return self._names[name]

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """An HF-named tensor's shape (rows first, as numpy and HF have it)."""
        return tuple(reversed(self.file.tensors[self._gguf_name(name)][1]))

    def stored_type(self, name: str) -> str:
        """The GGUF type an HF-named tensor is stored in, lower case (q4_k, f16, ...)."""
        return self.file.tensors[self._gguf_name(name)][0].name.lower()

    def _hf_rows(self, name: str, w: np.ndarray) -> np.ndarray:
        """`w` (rows first) with llama's q/k rows back in rotate_half order; rows are whole GGUF rows, so
        this applies to float values and to raw blocks alike."""
        if self.arch == "llama" and (m := re.search(r"self_attn\.([qk])_proj\.", name)):
            heads = self.config["num_attention_heads" if m.group(1) == "q" else "num_key_value_heads"]
            if w.shape[0] % (2 * heads):
                raise KilnError(f"{self.path}: tensor {self._names[name]!r} has {w.shape[0]} rows, "
                                f"not a whole number of {heads} heads of even size")
            # llama.cpp's convert permutes rows per head from (2, d/2) to (d/2, 2) for its interleaved RoPE.
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        return w

    def tensor(self, name: str) -> np.ndarray:
        """One tensor as float32 in HF layout (q/k rows back in rotate_half order for llama)."""
        return self._hf_rows(name, self.file.dequantize(self._gguf_name(name)))

    def blocks(self, name: str) -> np.ndarray:
        """A 2-D tensor's GGUF blocks, uint8 [rows, row bytes], rows in HF order (for repacking)."""
        return self._hf_rows(name, self.file.blocks(self._gguf_name(name)))

    def write_tokenizer(self, out_dir: str | Path) -> None:
        """tokenizer.json, tokenizer_config.json and generation_config.json built from the GGUF metadata."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tok, config, generation = gguf_tokenizer_files(self.metadata, str(self.path))
        tok.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
