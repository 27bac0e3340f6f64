"""LLaMA 2/3 and Mistral (Touvron et al. 2023; Jiang et al. 2023).

Pre-norm decoder, RMSNorm, SwiGLU MLP, rotary positions (Llama-3 frequency scaling where the config
asks for it) and grouped-query attention. Q, K and V come from one fused projection; the paged KV
cache applies RoPE, appends K/V and runs causal attention.
"""

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from .config import ModelConfig
from .layers import CausalLM, Linear


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: str):
        self.layer_id = layer_id
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
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
        return self.o_proj(nn.op.reshape(o, (b, s, self.heads * self.head_dim)))


class LlamaForCausalLM(CausalLM):
    attention_cls = LlamaAttention


MODEL = LlamaForCausalLM  # the class model_defs.spec builds for this family
