"""The functions every Kiln artifact exports, and how a ModelConfig picks its family's module."""

from __future__ import annotations

import importlib

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from .config import ModelConfig
from .quant import quantize_modules

_PACKED = {"param_mode": "packed", "effect_mode": "none"}  # weights: one tuple argument, last
_NO_PARAMS = {"param_mode": "none", "effect_mode": "none"}


def build_model(cfg: ModelConfig, dtype: str, target, attention_kernels: dict | None = None,
                quant: dict[str, str] | None = None, tp: int | None = None) -> nn.Module:
    """The family's model (with `tp`: one rank's share); the parameters named in `quant` ({param: qtype})
    packed (model_defs/quant.py)."""
    model = importlib.import_module(f"model_defs.{cfg.family}").MODEL(cfg, dtype, target, attention_kernels, tp)
    quantize_modules(model, quant or {})
    return model


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
        # on-device sampling (model_defs/sampling.py)
        "argmax": {"logits": nn.spec.Tensor(["b", "vocab"], "float32"), "$": _NO_PARAMS},
        "sample_probs": {"logits": nn.spec.Tensor(["b", "vocab"], "float32"),
                         "temperature": nn.spec.Tensor(["b"], "float32"),
                         "min_p": nn.spec.Tensor(["b"], "float32"), "$": _NO_PARAMS},
        "sample_multinomial": {"probs": nn.spec.Tensor(["b", "vocab"], "float32"),
                               "uniform": nn.spec.Tensor(["n", 1], "float32"),
                               "rows": nn.spec.Tensor(["n", 1], "int32"), "$": _NO_PARAMS},
        "sample_top_p_top_k": {"probs": nn.spec.Tensor(["b", "vocab"], "float32"),
                               "top_p": nn.spec.Tensor(["b", 1], "float32"),
                               "top_k": nn.spec.Tensor(["b", 1], "int32"),
                               "uniform": nn.spec.Tensor(["n", 1], "float32"),
                               "rows": nn.spec.Tensor(["n", 1], "int32"), "$": _NO_PARAMS},
        "apply_penalties": {"logits": nn.spec.Tensor(["b", "vocab"], "float32"),
                            "pairs": nn.spec.Tensor(["m", 2], "int64"), "counts": nn.spec.Tensor(["m"], "float32"),
                            "repetition": nn.spec.Tensor(["m"], "float32"),
                            "frequency": nn.spec.Tensor(["m"], "float32"),
                            "presence": nn.spec.Tensor(["m"], "float32"), "$": _NO_PARAMS},
        "logprobs": {"logits": nn.spec.Tensor(["b", "vocab"], "float32"),
                     "tokens": nn.spec.Tensor(["b", 1], "int32"), "$": _NO_PARAMS},
        "create_paged_kv_cache": {
            "max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int,
            "page_size": int, "support_sliding_window": int, "$": _NO_PARAMS,
        },
    }


def export(cfg: ModelConfig, dtype: str, target, max_batch: int = 256, prefill_chunk: int = 1024,
           attention_kernels: dict | None = None, quant: dict[str, str] | None = None, tp: int | None = None):
    """(IRModule, [(param_name, nn.Parameter)]) for `cfg` on `target`, with the paged KV cache's
    `attention_kernels` (schedules.attention.paged_kv_kernels; None: TVM's) and the weights in `quant`
    ({param: qtype}) packed; with `tp`, one rank's share of a tensor-parallel model (every rank runs the
    same module on its own weight shards).

    The bounds on the dynamic sizes (`b` sequences, `n` tokens per forward) let the memory planner
    allocate every intermediate once, statically, which in turn lets CUDA capture decode steps as
    graphs (one graph per batch size, replayed instead of hundreds of kernel launches).
    """
    mod, params = build_model(cfg, dtype, target, attention_kernels, quant, tp).export_tvm(
        spec=export_spec(cfg, dtype))
    bounds = {"embed": {"n": prefill_chunk}, "prefill": {"n": prefill_chunk, "b": max_batch},
              "decode": {"b": max_batch}, "logits": {"b": max_batch}}
    for name, bound in bounds.items():
        func = mod[name].with_attr("tir_var_upper_bound", bound)
        if name == "decode":
            func = func.with_attr("relax.rewrite_cuda_graph.capture_symbolic_vars", ["b"])
        mod[name] = func
    return mod, params
