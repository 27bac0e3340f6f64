"""llama.cpp's *_K_M mixes for `--quant q4_k_m|q5_k_m|q3_k_m`: which type each weight gets.

Written from llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp; /work/shared/notes/QUANT.md §4)
for a dense, non-Falcon model quantized without an importance matrix:
- the LM head (or, tied, the embedding that serves as it): Q6_K;
- attn_v: Q6_K on the `use_more_bits` layers (q4_k_m, q5_k_m); Q5_K on the first two layers and Q4_K on
  the rest (q3_k_m); a Llama of 80 layers with grouped-query attention (llama.cpp's LLM_TYPE_70B) lifts
  a Q3_K / Q4_K attn_v to Q5_K;
- ffn_down: Q6_K on the `use_more_bits` layers (q4_k_m, q5_k_m); Q5_K on the first n/16 layers, else
  Q4_K (q3_k_m);
- attn_output: Q4_K (q3_k_m);
- everything else, the embedding included: the mix's base type.
llama.cpp counts attn_v and ffn_down tensors in layer order, so in a dense model its index is the layer.
Rows that fit no block then fall back per tensor (compile/quantize.py's row_fallback), as llama.cpp does.
"""

from __future__ import annotations

import re

MIXES = {"q4_k_m": "q4_k", "q5_k_m": "q5_k", "q3_k_m": "q3_k"}  # mix -> its base type
_LAYER = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.weight$")


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every third between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def mix_type(mix: str, hf_name: str, layers: int, tied: bool, llama_70b: bool = False) -> str:
    """The type of HF weight `hf_name` in `mix`; `tied`: the embedding is also the LM head; `llama_70b`:
    llama.cpp's LLM_TYPE_70B (a Llama of 80 layers whose KV heads are fewer than its query heads)."""
    base = MIXES[mix]
    if hf_name == "lm_head.weight" or (tied and hf_name == "model.embed_tokens.weight"):
        return "q6_k"
    m = _LAYER.match(hf_name)
    if m is None:
        return base
    layer, proj = int(m.group(1)), m.group(3)
    if proj == "v":
        if mix == "q3_k_m":
            t = "q5_k" if layer < 2 else "q4_k"
        else:
            t = "q6_k" if use_more_bits(layer, layers) else base
        return "q5_k" if llama_70b and t in ("q3_k", "q4_k") else t
    if proj == "down":
        if mix == "q3_k_m":
            return "q5_k" if layer < layers // 16 else "q4_k"
        return "q6_k" if use_more_bits(layer, layers) else base
    if proj == "o" and mix == "q3_k_m":
        return "q4_k"
    return base
