"""Qwen2 (Yang et al. 2024): the LLaMA architecture with a bias on the Q, K and V projections.

The bias comes from `attention_bias`, which ModelConfig sets for Qwen2, so the LLaMA attention serves.
"""

from .llama import LlamaAttention
from .layers import CausalLM


class Qwen2ForCausalLM(CausalLM):
    attention_cls = LlamaAttention


MODEL = Qwen2ForCausalLM  # the class model_defs.spec builds for this family
