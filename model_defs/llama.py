"""LLaMA 2/3 and Mistral (Touvron et al. 2023; Jiang et al. 2023).

Pre-norm decoder, RMSNorm, SwiGLU MLP, rotary positions (Llama-3 frequency scaling where the config
asks for it) and grouped-query attention. Q, K and V come from one fused projection; the paged KV
cache applies RoPE, appends K/V and runs causal attention.
"""

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from .config import ModelConfig
from .layers import CausalLM, Linear, all_reduce, shard


class LlamaAttention(nn.Module):
    """Tensor-parallel (`tp`): each rank owns 1/tp of the query and KV heads (its rows of qkv_proj, its
    columns of o_proj, whose partial outputs are summed across ranks)."""

    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: str, tp: int | None = None):
        self.layer_id, self.tp = layer_id, tp
        self.heads = shard(cfg.num_attention_heads, tp, "num_attention_heads")
        self.kv_heads = shard(cfg.num_key_value_heads, tp, "num_key_value_heads")
        self.head_dim = cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim, dtype,
                               bias=cfg.attention_bias)
        self.o_proj = Linear(self.heads * self.head_dim, cfg.hidden_size, dtype)

    def project_qkv(self, x: nn.Tensor) -> nn.Tensor:
        """(b, s, hidden) → (b, s, heads + 2·kv_heads, head_dim) = [q | k | v] heads."""
        b, s, _ = x.shape
        return nn.op.reshape(self.qkv_proj(x), (b, s, self.heads + 2 * self.kv_heads, self.head_dim))

    def forward(self, x: nn.Tensor, kv: PagedKVCache) -> nn.Tensor:
        b, s, _ = x.shape
        o = kv.attention_with_fused_qkv(self.layer_id, self.project_qkv(x), self.heads,
                                        sm_scale=self.head_dim**-0.5)
        return all_reduce(self.o_proj(nn.op.reshape(o, (b, s, self.heads * self.head_dim))), self.tp)


class LlamaForCausalLM(CausalLM):
    attention_cls = LlamaAttention


MODEL = LlamaForCausalLM  # the class model_defs.spec builds for this family
