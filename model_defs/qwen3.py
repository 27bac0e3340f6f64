"""Qwen3 (Qwen team 2025): LLaMA-style attention with RMSNorm on each query and key head before RoPE."""

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from .config import ModelConfig
from .layers import CausalLM, all_reduce, rms_norm
from .llama import LlamaAttention


def qk_norm(qkv: nn.Tensor, q_weight: nn.Tensor, k_weight: nn.Tensor, heads: int, kv_heads: int,
            eps: float) -> nn.Tensor:
    """RMSNorm over each query head (weight `q_weight`) and key head (`k_weight`) of the fused
    (b, s, heads + 2·kv_heads, head_dim) projection, value heads passed through: one kernel where
    split, two norms and a concat were four (issue 12). Same arithmetic as nn.RMSNorm: fp32,
    x · rsqrt(mean(x²) + eps) · weight, cast back."""

    def compute(x: te.Tensor, qw: te.Tensor, kw: te.Tensor) -> te.Tensor:
        dim = x.shape[-1]
        r = te.reduce_axis((tirx.IntImm("int64", 0), dim), name="r")
        sum_sq = te.compute(x.shape[:-1], lambda b, s, h: te.sum(
            x[b, s, h, r].astype("float32") * x[b, s, h, r].astype("float32"), axis=r), name="sum_sq")

        def normed(b, s, h, d):
            w = tirx.Select(h < heads, qw[d], kw[d]).astype("float32")
            y = tirx.rsqrt(sum_sq[b, s, h] / tirx.Cast("float32", dim) + tirx.const(eps, "float32")) \
                * x[b, s, h, d].astype("float32") * w
            return tirx.Select(h < heads + kv_heads, y.astype(x.dtype), x[b, s, h, d])

        return te.compute(x.shape, normed, name="qk_norm")

    return nn.op.tensor_expr_op(compute, "qk_norm", [qkv, q_weight, k_weight])


class Qwen3Attention(LlamaAttention):
    def __init__(self, cfg: ModelConfig, layer_id: int, dtype: str, tp: int | None = None):
        super().__init__(cfg, layer_id, dtype, tp)
        self.eps = cfg.rms_norm_eps
        self.q_norm = rms_norm(cfg.head_dim, cfg.rms_norm_eps, dtype)
        self.k_norm = rms_norm(cfg.head_dim, cfg.rms_norm_eps, dtype)

    def forward(self, x: nn.Tensor, kv: PagedKVCache) -> nn.Tensor:
        b, s, _ = x.shape
        qkv = qk_norm(self.project_qkv(x), self.q_norm.weight, self.k_norm.weight, self.heads, self.kv_heads,
                      self.eps)
        o = kv.attention_with_fused_qkv(self.layer_id, qkv, self.heads, sm_scale=self.head_dim**-0.5)
        return all_reduce(self.o_proj(nn.op.reshape(o, (b, s, self.heads * self.head_dim))), self.tp)


class Qwen3ForCausalLM(CausalLM):
    attention_cls = Qwen3Attention


MODEL = Qwen3ForCausalLM  # the class model_defs.spec builds for this family
