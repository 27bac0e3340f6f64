"""ModelConfig: the few numbers that define a decoder-only transformer, read from an HF config.json.

One dataclass serves every family; the family file decides what the flags mean (QKV bias,
q/k norm). Every missing or wrong field is a KilnError naming the field and the file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from formats.errors import KilnError

# HF `architectures[0]` → Kiln family (the file in model_defs/ that defines it)
FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass
class ModelConfig:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)

    @property
    def family(self) -> str:
        return FAMILIES[self.architecture]

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        """Validate an HF config dict; `source` names the file in error messages."""
        archs = raw.get("architectures") or []
        if not archs:
            raise KilnError(f"{source}: field 'architectures' is missing; expected one of {sorted(FAMILIES)}")
        arch = archs[0]
        if arch not in FAMILIES:
            raise KilnError(f"{source}: architecture '{arch}' is not supported; Kiln runs {sorted(FAMILIES)}")

        def need(name, kind=int):
            if name not in raw or raw[name] is None:
                raise KilnError(f"{source}: required field '{name}' is missing")
            value = raw[name]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0 \
                    or (kind is int and int(value) != value):
                raise KilnError(f"{source}: field '{name}' must be a positive {kind.__name__}, got {value!r}")
            return kind(value)

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        kv_heads = need("num_key_value_heads") if raw.get("num_key_value_heads") is not None else heads
        if heads % kv_heads:
            raise KilnError(f"{source}: num_attention_heads={heads} is not a multiple of "
                            f"num_key_value_heads={kv_heads}")
        head_dim = need("head_dim") if raw.get("head_dim") is not None else hidden // heads
        eos = raw.get("eos_token_id")
        rope_params = raw.get("rope_parameters") or {}  # transformers >= 5 keeps RoPE settings here
        scaling = raw.get("rope_scaling") or rope_params
        if scaling:
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.get("type"))
            if scaling["rope_type"] not in ("llama3", "default", None):  # default: plain RoPE
                raise KilnError(f"{source}: rope_scaling type '{scaling['rope_type']}' is not supported "
                                "(Kiln supports llama3)")
            if scaling["rope_type"] != "llama3":
                scaling = {}
        rope_theta = raw.get("rope_theta") or rope_params.get("rope_theta", 10000.0)
        return cls(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=need("vocab_size"),
            max_position_embeddings=need("max_position_embeddings"),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", arch == "Qwen2ForCausalLM")),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=[e for e in (eos if isinstance(eos, list) else [eos]) if e is not None],
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise KilnError(f"{path}: config.json not found")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise KilnError(f"{path}: malformed JSON ({e})") from None
        if not isinstance(raw, dict):
            raise KilnError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, str(path))

    def to_dict(self) -> dict:
        return asdict(self)
