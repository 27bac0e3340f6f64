"""Which Kiln weight stays packed, in which GGUF type: from a GGUF file's own types, or from `--quant`.

A plan maps each quantized Kiln weight (`model.layers.0.mlp.down_proj.weight`) to its type, or, for a
fused weight (qkv_proj, gate_up_proj) whose GGUF parts have different types (*_K_M files), to a list of
(part, rows, type) so that layer runs one matmul per part. Everything else keeps today's float path,
and the plan's notes say which tensors and why (printed at compile time, kept in kiln.yaml).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from formats.errors import KilnError
from formats.quant_layout import QUANT_TYPES
from formats.quant_layout import STORED_FLOATS

from .convert import hf_names
from .quant_mix import MIXES, mix_type
from .quantize import row_fallback

QUANT_NAMES = {"q4k": "q4_k", "q5k": "q5_k", "q6k": "q6_k", "q8_0": "q8_0", "q4_0": "q4_0", "q2k": "q2_k",
               "q3k": "q3_k", **{mix: mix for mix in MIXES}}  # `--quant` name -> Kiln type, or a mix of types


def quant_type_of(flag: str) -> str:
    """The Kiln type (or mix, compile/quant_mix.py) of a `--quant` name (q4k, q4_k or q4_k_m); an unknown
    one is a KilnError listing the valid ones."""
    name = str(flag).lower()
    if name in QUANT_NAMES.values():
        return name
    if name not in QUANT_NAMES:
        raise KilnError(f"--quant {flag}: unknown quantization; choose one of {', '.join(QUANT_NAMES)}")
    return QUANT_NAMES[name]


@dataclass
class QuantPlan:
    """`types`: {Kiln weight: type, or [(part, rows, type or None)] for a fused weight split per part};
    `notes`: one line per decision the user should know (dequantized tensors, row fallbacks, splits)."""

    origin: str
    types: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def packed(self, params) -> dict[str, tuple[str, tuple[int, int]]]:
        """{Kiln weight as the quantized model names it: (type, (N, K))}, from the float model's (name, shape)."""
        shapes = dict(params)
        out = {}
        for name, t in self.types.items():
            n, k = shapes[name]
            if isinstance(t, list):
                stem = name.removesuffix(".weight")
                out.update({f"{stem}.{part}.weight": (pt, (rows, k)) for part, rows, pt in t if pt})
            else:
                out[name] = (t, (n, k))
        return out

    def manifest(self) -> dict:
        """kiln.yaml's `quantization`: a summary (parameters per type), then every parameter's type."""
        summary = defaultdict(int)
        tensors = {}
        for name, t in self.types.items():
            if isinstance(t, list):
                for part, _, pt in t:
                    tensors[f"{name} [{part}]"] = pt or "float"
                    summary[pt or "float"] += 1
            else:
                tensors[name] = t
                summary[t] += 1
        return {"origin": self.origin, "summary": dict(sorted(summary.items())), "notes": self.notes,
                "tensors": tensors}


def _two_d_weights(params) -> list[tuple[str, tuple]]:
    """The matmul and embedding weights among (name, shape) of the float model: every 2-D `.weight`."""
    return [(n, tuple(s)) for n, s in params if n.endswith(".weight") and len(s) == 2]


def plan_gguf(source, params, dtype: str) -> QuantPlan:
    """Keep every tensor of a native type packed (and F16/BF16 ones as stored when `dtype` is float32);
    parts of a fused weight whose types differ run apart."""
    plan = QuantPlan(origin=f"gguf {source.path.name}")
    kept = set(QUANT_TYPES) | (set(STORED_FLOATS) if dtype == "float32" else set())
    dequantized = defaultdict(list)
    for name, _ in _two_d_weights(params):
        parts = hf_names(name)
        types = [source.stored_type(p) for p in parts]
        native = [t if t in kept else None for t in types]
        for part, t, n in zip(parts, types, native):
            if n is None:
                dequantized[t].append(part)
        if native[0] is not None and len(set(native)) == 1:
            plan.types[name] = native[0]
        elif any(native):
            rows = [source.tensor_shape(p)[0] for p in parts]
            plan.types[name] = [(p.split(".")[-2], r, t) for p, r, t in zip(parts, rows, native)]
            plan.notes.append(f"{name}: parts stored as {'/'.join(types)}: one matmul per part in this layer")
    for t, names in sorted(dequantized.items()):
        why = "a float type" if t in ("f32", "f16", "bf16") else f"not one of Kiln's native types ({', '.join(QUANT_TYPES)})"
        plan.notes.append(f"converted to {dtype}, type {t.upper()} ({why}): {_listed(names)}")
    return plan


def plan_quantize(qtype: str, params, cfg) -> QuantPlan:
    """`--quant`: every 2-D weight in `qtype`, or in the type llama.cpp's mix `qtype` gives it (parts of a
    fused weight whose types differ run apart); rows that do not fill a block fall back as llama.cpp does."""
    plan = QuantPlan(origin=f"--quant {qtype}")
    fallbacks = defaultdict(list)
    tied = "lm_head.weight" not in dict(params)
    llama_70b = (cfg.family == "llama" and cfg.num_hidden_layers == 80
                 and cfg.num_key_value_heads < cfg.num_attention_heads)
    for name, (_, k) in _two_d_weights(params):
        types = []
        for part in hf_names(name):
            wanted = mix_type(qtype, part, cfg.num_hidden_layers, tied, llama_70b) if qtype in MIXES else qtype
            t, reason = row_fallback(wanted, k)
            if reason:
                fallbacks[reason].append(part)
            types.append(t)
        if len(set(types)) == 1:
            if types[0] is not None:
                plan.types[name] = types[0]
        else:
            parts = [p.split(".")[-2] for p in hf_names(name)]
            plan.types[name] = [(p, _part_rows(cfg, p), t) for p, t in zip(parts, types)]
    plan.notes += [f"{reason}: {_listed(names)}" for reason, names in fallbacks.items()]
    return plan


def _part_rows(cfg, part: str) -> int:
    """Rows of one part (q_proj, k_proj, v_proj, gate_proj, up_proj) of a fused weight."""
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads, "v_proj": cfg.num_key_value_heads}
    return heads[part] * cfg.head_dim if part in heads else cfg.intermediate_size


def _listed(names: list[str]) -> str:
    """'3 tensor(s): a, b, c' with at most four names."""
    return f"{len(names)} tensor(s): {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
