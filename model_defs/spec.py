"""The functions every Kiln artifact exports, and how a ModelConfig picks its family's module."""

from __future__ import annotations

import importlib

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from .config import ModelConfig

_PACKED = {"param_mode": "packed", "effect_mode": "none"}  # weights: one tuple argument, last


def build_model(cfg: ModelConfig, dtype: str, target) -> nn.Module:
    return importlib.import_module(f"model_defs.{cfg.family}").MODEL(cfg, dtype, target)


def export_spec(cfg: ModelConfig, dtype: str) -> dict:
    """The VM functions of an artifact (see DEVELOPERS.md): names, argument shapes and dtypes."""
    hidden = cfg.hidden_size
    kv = nn.spec.Object(object_type=PagedKVCache)
    return {
        "embed": {"input_ids": nn.spec.Tensor(["n"], "int32"), "$": _PACKED},
        "prefill": {"embeds": nn.spec.Tensor(["n", hidden], dtype),
                    "logit_pos": nn.spec.Tensor(["b"], "int32"), "kv": kv, "$": _PACKED},
        "decode": {"embeds": nn.spec.Tensor(["b", hidden], dtype), "kv": kv, "$": _PACKED},
        "logits": {"hidden": nn.spec.Tensor(["b", hidden], dtype), "$": _PACKED},
        "create_paged_kv_cache": {
            "max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int,
            "page_size": int, "support_sliding_window": int,
            "$": {"param_mode": "none", "effect_mode": "none"},
        },
    }


def export(cfg: ModelConfig, dtype: str, target):
    """(IRModule, [(param_name, nn.Parameter)]) for `cfg` on `target`."""
    return build_model(cfg, dtype, target).export_tvm(spec=export_spec(cfg, dtype))
