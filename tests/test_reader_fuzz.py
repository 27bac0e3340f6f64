"""The model-file readers under targeted damage: HF config.json values and GGUF metadata numbers set
to absurd values, type labels that lie about the bytes, integer tensors posing as weights. Each
case ends in a one-line KilnError naming the file, or in a config whose every size is a sane
integer (what the compiler gets). Fixed seeds, bounded budgets; byte-level fuzz of GGUF and
safetensors is in test_gguf_errors.py, of artifacts in test_artifact_checks.py.
"""

from __future__ import annotations

import json
import random
import shutil
import struct

import gguf
import pytest
from conftest import DATA, STORIES_HF

from formats.errors import KilnError
from formats.gguf import GGUFSource
from formats.safetensors_checks import SafetensorsModel
from model_defs.config import _LIMITS, ModelConfig

F32_GGUF = DATA / "stories260K" / "gguf" / "stories260K-f32.gguf"
ABSURD = [0, -1, 64.0, 1.5, 2 ** 31, 2 ** 63, 10 ** 30, -1e308, float("inf"), "64", "x", None, True, [], {}, [1, "a"]]
CONFIG_FIELDS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                 "rope_theta", "rope_scaling", "tie_word_embeddings", "attention_bias", "bos_token_id",
                 "eos_token_id", "architectures"]


def assert_sane(cfg: ModelConfig) -> None:
    """What the compiler may rely on after from_dict."""
    for name, limit in _LIMITS.items():
        value = getattr(cfg, name)
        assert isinstance(value, int) and not isinstance(value, bool) and 0 < value <= limit, (name, value)
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0 and cfg.head_dim % 2 == 0
    assert 0 < cfg.rms_norm_eps <= 1 and 0 < cfg.rope_theta < float("inf")
    assert all(0 <= t < cfg.vocab_size for t in cfg.eos_token_id + [cfg.bos_token_id or 0])


def from_dict_or_error(raw: dict, source: str) -> str:
    try:
        cfg = ModelConfig.from_dict(raw, source)
    except KilnError as e:
        assert source in str(e) and "\n" not in str(e), str(e)
        return "error"
    assert_sane(cfg)
    return "ok"


CRAFTED = [("hidden_size", 64.0), ("rope_theta", -1), ("eos_token_id", "x"), ("eos_token_id", [2, 10 ** 6]),
           ("hidden_size", 2 ** 31), ("num_attention_heads", 3), ("rms_norm_eps", 0), ("rope_scaling", [1]),
           ("rope_scaling", {"rope_type": "llama3", "factor": "big"}), ("tie_word_embeddings", "yes"),
           ("architectures", "LlamaForCausalLM"), ("head_dim", 7)]


@pytest.mark.parametrize("field, value", CRAFTED, ids=[f"{f}={v!r}"[:30] for f, v in CRAFTED])
def test_crafted_config_values_are_refused(field, value):
    raw = json.loads((STORIES_HF / "config.json").read_text())
    raw[field] = value
    with pytest.raises(KilnError, match=rf"config\.json: .*{field}"):
        ModelConfig.from_dict(raw, "model/config.json")


def test_fuzz_config_json():
    """150 configs with one to three fields set to absurd values or removed."""
    base = json.loads((STORIES_HF / "config.json").read_text())
    rnd = random.Random(15)
    outcomes = []
    for _ in range(150):
        raw = dict(base)
        for field in rnd.sample(CONFIG_FIELDS, rnd.randint(1, 3)):
            if rnd.random() < 0.15:
                raw.pop(field, None)
            else:
                raw[field] = rnd.choice(ABSURD)
        outcomes.append(from_dict_or_error(raw, "model/config.json"))
    print(f"150 damaged config.json: {outcomes.count('error')} one-line errors, {outcomes.count('ok')} sane")
    assert outcomes.count("error") >= 100, outcomes


def test_integer_tensor_relabelled_as_a_weight(tmp_path):
    """An F32 tensor's header relabelled I32 (same byte size): the bytes would become integer "weights"."""
    folder = tmp_path / "model"
    shutil.copytree(STORIES_HF, folder)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "I32"
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)  # same length: padded with spaces
    assert len(text) == n
    path.write_bytes(data[:8] + text + data[8 + n:])
    with pytest.raises(KilnError, match=rf"model\.safetensors: tensor '{name}' is stored as int32"):
        SafetensorsModel(folder).tensor(name)


def _value_offset(reader: gguf.GGUFReader, key: str) -> int:
    field = reader.fields[key]
    return field.offset + sum(int(p.nbytes) for p in field.parts[:-1])


def _gguf_with(tmp_path, key: str, packed: bytes, name: str = "damaged.gguf"):
    data = bytearray(F32_GGUF.read_bytes())
    at = _value_offset(gguf.GGUFReader(F32_GGUF), key)
    data[at:at + len(packed)] = packed
    out = tmp_path / name
    out.write_bytes(bytes(data))
    return out


def load_gguf_config(path) -> str:
    """GGUFSource, every tensor, and the config the compiler would build: ok or one KilnError."""
    try:
        src = GGUFSource(path)
        for name in src.tensor_names():
            src.tensor(name)
        return from_dict_or_error(src.config, str(path))
    except KilnError as e:
        assert str(path) in str(e) and "\n" not in str(e), str(e)
        return "error"


def test_gguf_embedding_length_beyond_the_tensor(tmp_path):
    path = _gguf_with(tmp_path, "llama.embedding_length", struct.pack("<I", 2 ** 31))
    with pytest.raises(KilnError, match=r"embedding_length = 2147483648 but token_embd\.weight has shape"):
        GGUFSource(path)


def test_gguf_quant_label_over_f32_bytes(tmp_path):
    """A tensor typed Q4_0 whose data is F32-sized: the bytes left over are named, not silently skipped."""
    reader = gguf.GGUFReader(F32_GGUF)
    tensor = next(t for t in reader.tensors if t.name.endswith("attn_q.weight"))
    field = tensor.field
    type_at = field.offset + sum(int(p.nbytes) for p in field.parts[:4])
    data = bytearray(F32_GGUF.read_bytes())
    data[type_at:type_at + 4] = struct.pack("<I", int(gguf.GGMLQuantizationType.Q4_0))
    path = tmp_path / "relabelled.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(KilnError, match=rf"tensor '{tensor.name}': shape .* of Q4_0 is \d+ bytes, but \d+ more"):
        GGUFSource(path)


def test_fuzz_gguf_metadata_numbers(tmp_path):
    """Every numeric metadata value of a GGUF set to 0, 1, odd and huge numbers, one at a time."""
    reader = gguf.GGUFReader(F32_GGUF)
    numeric = [k for k, f in reader.fields.items() if not k.startswith(("GGUF.", "tokenizer."))
               and f.types and f.types[0] in (gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32)]
    outcomes = []
    for key in numeric:
        float32 = reader.fields[key].types[0] == gguf.GGUFValueType.FLOAT32
        values = [0.0, -1.0, 1e-30, 3.4e38, float("nan"), float("inf")] if float32 else [0, 1, 3, 7, 2 ** 31, 2 ** 32 - 1]
        for value in values:
            path = _gguf_with(tmp_path, key, struct.pack("<f" if float32 else "<I", value), "fuzz.gguf")
            outcomes.append(load_gguf_config(path))
    print(f"{len(outcomes)} GGUF metadata edits: {outcomes.count('error')} one-line errors, "
          f"{outcomes.count('ok')} sane")
    assert len(outcomes) >= 60 and outcomes.count("error") >= 30, outcomes
