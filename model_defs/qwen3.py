"""Qwen3 (Qwen team 2025): LLaMA-style attention with RMSNorm on each query and key head before RoPE."""

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from .config import ModelConfig
from .layers import CausalLM, all_reduce, rms_norm
from .llama import LlamaAttention


class Qwen3Attention(LlamaAttention):
    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: str, tp: int | None = None):
        super().__init__(cfg, layer_id, dtype, tp)
        self.q_norm = rms_norm(cfg.head_dim, cfg.rms_norm_eps, dtype)
        self.k_norm = rms_norm(cfg.head_dim, cfg.rms_norm_eps, dtype)

    def forward(self, x: nn.Tensor, kv: PagedKVCache) -> nn.Tensor:
        b, s, _ = x.shape
        q, k, v = nn.op.split(self.project_qkv(x), [self.heads, self.heads + self.kv_heads], axis=2)
        qkv = nn.op.concat([self.q_norm(q), self.k_norm(k), v], dim=2)
        o = kv.attention_with_fused_qkv(self.layer_id, qkv, self.heads, sm_scale=self.head_dim**-0.5)
        return all_reduce(self.o_proj(nn.op.reshape(o, (b, s, self.heads * self.head_dim))), self.tp)


class Qwen3ForCausalLM(CausalLM):
    attention_cls = Qwen3Attention


MODEL = Qwen3ForCausalLM  # the class model_defs.spec builds for this family
