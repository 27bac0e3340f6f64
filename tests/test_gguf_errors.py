"""Damaged model files end in a KilnError that names the file and tensor (never a numpy error, a
segfault or a hang): hand-made defects in GGUF and safetensors files, then a short fuzz."""

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, STORIES_HF

import gguf  # noqa: E402
from formats.gguf import GGUFFile, GGUFSource  # noqa: E402
from formats.safetensors_checks import SafetensorsModel  # noqa: E402
from compile.sources import open_source  # noqa: E402
from formats.errors import KilnError  # noqa: E402
from formats.vocab import gguf_tokenizer_files  # noqa: E402
from runtime.tokenizer import Tokenizer  # noqa: E402

STORIES = DATA / "stories260K"
Q4 = STORIES / "gguf" / "stories260K-q4_0.gguf"
HF = STORIES_HF


def load_gguf(path):
    """Everything a compile reads from a GGUF: config, every tensor, the tokenizer."""
    src = GGUFSource(path)
    for name in src.tensor_names():
        src.tensor(name)
    gguf_tokenizer_files(src.metadata, str(path))


def load_safetensors(folder):
    model = SafetensorsModel(folder)
    for name in model.names():
        model.tensor(name)


def tensor_info_offset(path, tensor, part):
    """File offset of a tensor-info field (2 = n_dims, 3 = dims, 4 = type, 5 = offset), found by gguf's reader."""
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == tensor)
    return t.field.offset + sum(int(p.nbytes) for p in t.field.parts[:part])


def patched(src, dst, offset, data):
    buf = bytearray(Path(src).read_bytes())
    buf[offset:offset + len(data)] = data
    Path(dst).write_bytes(bytes(buf))
    return dst


def test_wrong_magic(tmp_path):
    with pytest.raises(KilnError, match=r"bad\.gguf: not a GGUF file"):
        load_gguf(patched(Q4, tmp_path / "bad.gguf", 0, b"GGML"))


@pytest.mark.parametrize("cut", [10, 200, 13000, 20000, 258000])
def test_truncated(cut, tmp_path):
    """Cut inside the header, the metadata, the tensor table and the tensor data."""
    path = tmp_path / "cut.gguf"
    path.write_bytes(Q4.read_bytes()[:cut])
    with pytest.raises(KilnError, match=r"cut\.gguf: .*(truncated|past the end)"):
        load_gguf(path)


def test_truncated_data_names_the_tensor(tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(Q4.read_bytes()[:-1000])
    with pytest.raises(KilnError, match=r"cut\.gguf: tensor 'blk\.4\.[^']*': .*past the end of the 257656-byte file"):
        GGUFSource(path)


def test_unknown_tensor_type(tmp_path):
    path = patched(Q4, tmp_path / "t.gguf", tensor_info_offset(Q4, "blk.0.attn_q.weight", 4), struct.pack("<I", 77))
    with pytest.raises(KilnError, match=r"t\.gguf: tensor 'blk\.0\.attn_q\.weight': unknown tensor type 77"):
        GGUFSource(path)


def test_type_without_dequantizer(tmp_path):
    """A valid ggml type that gguf cannot dequantize (I32) is refused when the tensor is read."""
    path = patched(Q4, tmp_path / "t.gguf", tensor_info_offset(Q4, "output_norm.weight", 4),
                   struct.pack("<I", gguf.GGMLQuantizationType.I32))
    with pytest.raises(KilnError, match=r"tensor 'output_norm\.weight' has type I32"):
        GGUFSource(path).tensor("model.norm.weight")


def test_shape_disagrees_with_bytes(tmp_path):
    """A dims entry doubled: the tensor now claims more bytes than lie before the next tensor."""
    off = tensor_info_offset(Q4, "blk.0.attn_q.weight", 3) + 8  # second dimension
    path = patched(Q4, tmp_path / "s.gguf", off, struct.pack("<Q", 128))
    with pytest.raises(KilnError, match=r"tensor 'blk\.0\.attn_q\.weight': shape \[64, 128\] of Q4_0 runs 2304 bytes "
                                        r"into tensor '.*' \(its byte size disagrees with its shape\)"):
        GGUFSource(path)


def test_row_not_whole_blocks(tmp_path):
    off = tensor_info_offset(Q4, "blk.0.attn_q.weight", 3)
    path = patched(Q4, tmp_path / "s.gguf", off, struct.pack("<Q", 48))
    with pytest.raises(KilnError, match=r"'blk\.0\.attn_q\.weight': rows of 48 elements are not whole Q4_0 blocks"):
        GGUFSource(path)


@pytest.mark.parametrize("qtype, elements", [("Q6_K", 384), ("Q4_K", 128), ("Q2_K", 224)])
def test_k_quant_row_not_whole_superblocks(qtype, elements, tmp_path):
    """ggml's own k-quant blocks with a row length that is not whole 256-weight super-blocks."""
    vectors = DATA / "ggml-quant-vectors" / "ggml-quant-vectors.gguf"
    name = f"{qtype.lower()}.q"
    path = patched(vectors, tmp_path / "k.gguf", tensor_info_offset(vectors, name, 3), struct.pack("<Q", elements))
    with pytest.raises(KilnError, match=rf"k\.gguf: tensor '{name}': rows of {elements} elements are not whole "
                                        rf"{qtype} blocks of 256"):
        GGUFFile(path)


def _copy_hf(tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(HF, folder)
    return folder


def _shard(folder):
    """Split model.safetensors into two shards with an index, as large HF models ship."""
    from safetensors.numpy import load_file, save_file
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[:20], names[20:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n].astype(np.float16) if i else tensors[n] for n in part}, folder / shard)
        weight_map |= dict.fromkeys(part, shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


def test_sharded_safetensors_fp16_and_bf16(tmp_path):
    """A sharded folder loads; an fp16 shard converts exactly; bf16 widens exactly."""
    import ml_dtypes
    folder = _copy_hf(tmp_path)
    tensors = _shard(folder)
    model = SafetensorsModel(folder)
    assert sorted(model.names()) == sorted(tensors)
    for name, t in tensors.items():
        stored = model.array(name)
        assert stored.dtype in (np.float32, np.float16)
        np.testing.assert_array_equal(model.tensor(name), t.astype(stored.dtype).astype(np.float32))
    bf = tmp_path / "bf"
    bf.mkdir()
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    raw = x.astype(ml_dtypes.bfloat16)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [3, 5], "data_offsets": [0, 30]}}).encode()
    (bf / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + raw.tobytes())
    np.testing.assert_array_equal(SafetensorsModel(bf).tensor("w"), raw.astype(np.float32))


def test_missing_shard(tmp_path):
    folder = _copy_hf(tmp_path)
    _shard(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(KilnError, match=r"index\.json: shard model-00002-of-00002\.safetensors \(.*\) is missing"):
        open_source(folder)  # the compile driver's HF-folder source reads weights through SafetensorsModel


def _lie(folder, edit):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))
    assert len(text) == n
    path.write_bytes(data[:8] + text + data[8 + n:])


@pytest.mark.parametrize("lie,message", [
    (lambda h: h["model.norm.weight"].update(shape=[128]),
     r"'model\.norm\.weight': header says 256 bytes but F32 \[128\] needs 512"),
    (lambda h: h["model.norm.weight"].update(data_offsets=[10**7, 10**7 + 256]),
     r"'model\.norm\.weight': bytes .* past the end"),
    (lambda h: h["model.norm.weight"].update(dtype="F17"), r"'model\.norm\.weight': unknown dtype 'F17'"),
    (lambda h: h["model.norm.weight"].update(data_offsets=[0, 0]), r"'model\.norm\.weight': header says 0 bytes"),
])
def test_lying_safetensors_header(lie, message, tmp_path):
    folder = _copy_hf(tmp_path)
    _lie(folder, lie)
    with pytest.raises(KilnError, match=r"model\.safetensors: tensor " + message):
        SafetensorsModel(folder)


def test_safetensors_overlap(tmp_path):
    folder = _copy_hf(tmp_path)

    def overlap(h):
        a, b = sorted((v for k, v in h.items() if k != "__metadata__" and v["dtype"] == "F32" and v["shape"] == [64]),
                      key=lambda v: v["data_offsets"][0])[:2]
        b["data_offsets"] = [a["data_offsets"][0] + 4, a["data_offsets"][1] + 4]
    _lie(folder, overlap)
    with pytest.raises(KilnError, match="overlap in the file: the header lies"):
        SafetensorsModel(folder)


def test_truncated_safetensors(tmp_path):
    folder = _copy_hf(tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(KilnError, match=r"model\.safetensors: tensor '.*': bytes .* past the end of the data"):
        SafetensorsModel(folder)


def _mutations(data: bytes, rng, count: int, hot: int):
    """Byte flips (mostly in the first `hot` bytes, where the structure lives), truncations, and both."""
    for i in range(count):
        buf = bytearray(data)
        if i % 4 != 3:
            for _ in range(rng.integers(1, 4)):
                pos = int(rng.integers(0, hot if rng.random() < 0.9 else len(buf)))
                buf[pos] ^= 1 << int(rng.integers(0, 8)) if rng.random() < 0.7 else int(rng.integers(1, 256))
        if i % 4 >= 2:
            del buf[int(rng.integers(0, len(buf))):]
        yield bytes(buf)


def test_fuzz_gguf(tmp_path):
    """Every mutated GGUF either loads (and dequantizes every tensor) or raises KilnError."""
    rng = np.random.default_rng(1234)
    data = Q4.read_bytes()
    header_end = min(t.data_offset for t in gguf.GGUFReader(Q4).tensors)
    outcomes = {"ok": 0, "error": 0}
    path = tmp_path / "fuzz.gguf"
    for case in _mutations(data, rng, 200, header_end):
        path.write_bytes(case)
        try:
            load_gguf(path)
            outcomes["ok"] += 1
        except KilnError as e:
            assert "fuzz.gguf" in str(e)
            outcomes["error"] += 1
    assert outcomes["error"] > 50, outcomes


def test_fuzz_safetensors(tmp_path):
    rng = np.random.default_rng(99)
    folder = _copy_hf(tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    outcomes = {"ok": 0, "error": 0}
    for case in _mutations(data, rng, 120, 8 + int.from_bytes(data[:8], "little")):
        path.write_bytes(case)
        try:
            load_safetensors(folder)
            outcomes["ok"] += 1
        except KilnError as e:
            assert "model.safetensors" in str(e)
            outcomes["error"] += 1
    assert outcomes["error"] > 20, outcomes


def test_fuzz_tokenizer_model(tmp_path):
    """SentencePiece protobufs too: a damaged tokenizer.model loads or raises KilnError."""
    spm = STORIES.parent / "tokenizers" / "llama2" / "tokenizer.model"
    rng = np.random.default_rng(7)
    path = tmp_path / "tokenizer.model"
    for case in _mutations(spm.read_bytes(), rng, 16, 20000):
        path.write_bytes(case)
        try:
            Tokenizer(path).encode("Hello world")
        except KilnError:
            pass


def test_vocab_only_gguf_is_not_a_model():
    vocab = STORIES.parent / "llama.cpp-vocab" / "ggml-vocab-llama-spm.gguf"
    with pytest.raises(KilnError, match=r"ggml-vocab-llama-spm\.gguf: no tensors \(a vocab-only GGUF"):
        GGUFSource(vocab)


@pytest.mark.parametrize("index", ["{", '{"weight_map": ["a"]}', '{"weight_map": {"a": 3}}', "[]"])
def test_malformed_shard_index(index, tmp_path):
    folder = _copy_hf(tmp_path)
    (folder / "model.safetensors.index.json").write_text(index)
    with pytest.raises(KilnError, match=r"model\.safetensors\.index\.json: not a valid index"):
        SafetensorsModel(folder)
