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


# Upper bounds of the integer sizes: far beyond any released model, low enough that no product of
# them overflows the compiler's 64-bit shapes or asks for an impossible allocation.
_LIMITS = {"hidden_size": 1 << 17, "intermediate_size": 1 << 20, "num_hidden_layers": 1024,
           "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 1024, "vocab_size": 1 << 24,
           "max_position_embeddings": 1 << 24}


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
        if not isinstance(archs, list) or not archs:
            raise KilnError(f"{source}: field 'architectures' is missing; expected one of {sorted(FAMILIES)}")
        arch = archs[0]
        if not isinstance(arch, str) or arch not in FAMILIES:
            raise KilnError(f"{source}: architecture {arch!r} is not supported; Kiln runs {sorted(FAMILIES)}")

        def need(name: str, default=None):
            """A positive integer no larger than _LIMITS[name] (JSON 64.0 is not an integer size)."""
            value = raw.get(name)
            if value is None:
                if default is None:
                    raise KilnError(f"{source}: required field '{name}' is missing")
                return default
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= _LIMITS[name]:
                raise KilnError(f"{source}: field '{name}' must be an integer in [1, {_LIMITS[name]}], got {value!r}")
            return value

        def number(name: str, value, low: float, high: float) -> float:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not low < value <= high:
                raise KilnError(f"{source}: field '{name}' must be a number in ({low:g}, {high:g}], got {value!r}")
            return float(value)

        def flag(name: str, default: bool) -> bool:
            value = raw.get(name, default)
            if not isinstance(value, bool):
                raise KilnError(f"{source}: field '{name}' must be true or false, got {value!r}")
            return value

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        kv_heads = need("num_key_value_heads", heads)
        if heads % kv_heads:
            raise KilnError(f"{source}: num_attention_heads={heads} is not a multiple of "
                            f"num_key_value_heads={kv_heads}")
        if raw.get("head_dim") is None and hidden % heads:
            raise KilnError(f"{source}: hidden_size={hidden} is not a multiple of num_attention_heads={heads} "
                            "(and no head_dim is given)")
        head_dim = need("head_dim", hidden // heads)
        if head_dim % 2:
            raise KilnError(f"{source}: head_dim={head_dim} is odd; RoPE needs an even head size")
        vocab = need("vocab_size")

        def token_ids(name: str) -> list[int]:
            value = raw.get(name)
            ids = value if isinstance(value, list) else [value]
            if not all(t is None or (isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab) for t in ids):
                raise KilnError(f"{source}: field '{name}' must be token ids in [0, {vocab}), got {value!r}")
            return [t for t in ids if t is not None]

        rope_params = raw.get("rope_parameters") or {}  # transformers >= 5 keeps RoPE settings here
        scaling = raw.get("rope_scaling") or rope_params
        if not isinstance(scaling, dict) or not isinstance(rope_params, dict):
            raise KilnError(f"{source}: field 'rope_scaling' must be an object, got {scaling!r:.60}")
        if scaling:
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.get("type"))
            if scaling["rope_type"] not in ("llama3", "default", None):  # default: plain RoPE
                raise KilnError(f"{source}: rope_scaling type '{scaling['rope_type']}' is not supported "
                                "(Kiln supports llama3)")
            if scaling["rope_type"] != "llama3":
                scaling = {}
            for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if scaling:
                    number(f"rope_scaling.{key}", scaling.get(key), 0, 1e9)
        bos = token_ids("bos_token_id")
        return cls(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=vocab,
            max_position_embeddings=need("max_position_embeddings"),
            rms_norm_eps=number("rms_norm_eps", raw.get("rms_norm_eps", 1e-6), 0, 1),
            rope_theta=number("rope_theta", raw.get("rope_theta") or rope_params.get("rope_theta", 10000.0), 0, 1e12),
            rope_scaling=scaling,
            tie_word_embeddings=flag("tie_word_embeddings", False),
            attention_bias=flag("attention_bias", arch == "Qwen2ForCausalLM"),
            bos_token_id=bos[0] if bos else None,
            eos_token_id=token_ids("eos_token_id"),
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
