"""Blocks every Kiln family shares: an fp32-accumulating Linear, the SwiGLU MLP, the decoder stack.

A family file (llama.py, qwen2.py, qwen3.py) only says how its attention differs.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode

from formats.errors import KilnError

from .config import ModelConfig
from .kv_cache import KilnPagedKVCache
from .quant import dense
from .sampling import SamplingFunctions


class Linear(nn.Linear):
    """y = x W^T (+ b), accumulated in fp32 and cast back (nn.Linear accumulates in the input dtype)."""

    def __init__(self, in_features: int, out_features: int, dtype: str, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias, dtype=dtype, out_dtype="float32")

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return super().forward(x).astype(x.dtype)


def all_reduce(x: nn.Tensor, tp: int | None) -> nn.Tensor:
    """Sum the ranks' partial outputs of a column-split (row-parallel) Linear; nothing to sum without TP.

    `tp` is the shard count of a tensor-parallel artifact, None for a single-device one. TP=1 keeps
    the all-reduce (a copy) so that a one-GPU run exercises the same Disco + NCCL path as TP=N."""
    return x if tp is None else nn.op.ccl_allreduce(x, "sum")


def shard(count: int, tp: int | None, what: str) -> int:
    """`count` split evenly over `tp` ranks (Megatron: each rank owns whole heads / whole MLP rows)."""
    if tp is None:
        return count
    if tp < 1 or count % tp:
        raise KilnError(f"--tp {tp}: {what}={count} does not split evenly over {tp} ranks; "
                        f"choose a tensor-parallel degree that divides it")
    return count // tp


def rms_norm(size: int, eps: float, dtype: str) -> nn.RMSNorm:
    return nn.RMSNorm(size, -1, eps, bias=False, dtype=dtype)  # nn.RMSNorm adds a bias by default


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused into one matmul.

    Tensor-parallel: each rank holds 1/tp of the gate and up rows and the matching down columns."""

    def __init__(self, cfg: ModelConfig, dtype: str, tp: int | None = None):
        self.tp = tp
        self.inter = shard(cfg.intermediate_size, tp, "intermediate_size")
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * self.inter, dtype)
        self.down_proj = Linear(self.inter, cfg.hidden_size, dtype)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        gate, up = nn.op.split(self.gate_up_proj(x), 2, axis=-1)
        return all_reduce(self.down_proj(nn.op.silu(gate) * up), self.tp)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, attention: nn.Module, dtype: str, tp: int | None = None):
        self.input_layernorm = rms_norm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = attention
        self.post_attention_layernorm = rms_norm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, tp)

    def forward(self, x: nn.Tensor, kv: PagedKVCache) -> nn.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Token embedding, the layer stack and the final norm (HF's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig, attention_cls, dtype: str, tp: int | None = None):
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(
            [DecoderLayer(cfg, attention_cls(cfg, i, dtype, tp), dtype, tp) for i in range(cfg.num_hidden_layers)])
        self.norm = rms_norm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x: nn.Tensor, kv: PagedKVCache) -> nn.Tensor:
        for layer in self.layers:
            x = layer(x, kv)
        return self.norm(x)


class CausalLM(nn.Module, SamplingFunctions):
    """A decoder with an LM head, exposing the functions of model_defs/spec.py.

    Prefill and decode return final hidden states; `logits` applies the LM head separately so
    intermediate prefill chunks never pay for it. With `tp` (tensor parallelism) each rank holds its
    share of the attention heads, KV heads and MLP rows; embeddings, norms and the LM head are replicated.
    """

    attention_cls: type = None  # set by each family

    def __init__(self, cfg: ModelConfig, dtype: str, target, attention_kernels: dict | None = None,
                 tp: int | None = None):
        # the KV cache's kernels are per target: Kiln's as the compiler chose them (None: TVM's)
        self.cfg, self.dtype, self.target, self.attention_kernels = cfg, dtype, target, attention_kernels
        self.tp = tp
        self.model = Decoder(cfg, self.attention_cls, dtype, tp)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, dtype)

    def embed(self, input_ids: nn.Tensor) -> nn.Tensor:
        return self.model.embed_tokens(input_ids)

    def prefill(self, embeds: nn.Tensor, logit_pos: nn.Tensor, kv: PagedKVCache) -> nn.Tensor:
        n, hidden = embeds.shape
        h = self.model(nn.op.reshape(embeds, (1, n, hidden)), kv)
        h = nn.op.take(h, logit_pos, axis=1)  # (1, b, H): the last new token of each sequence
        return nn.op.reshape(h, (logit_pos.shape[0], hidden))

    def decode(self, embeds: nn.Tensor, kv: PagedKVCache) -> nn.Tensor:
        b, hidden = embeds.shape
        return nn.op.reshape(self.model(nn.op.reshape(embeds, (b, 1, hidden)), kv), (b, hidden))

    def logits(self, hidden: nn.Tensor) -> nn.Tensor:
        head = self.model.embed_tokens if self.cfg.tie_word_embeddings else self.lm_head
        return nn.op.matmul(hidden, nn.op.permute_dims(dense(head.weight)), out_dtype="float32")

    def create_paged_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                              support_sliding_window) -> PagedKVCache:
        cfg = self.cfg
        return KilnPagedKVCache(  # Kiln's attention kernels on CUDA and Metal, TVM's elsewhere
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=relax.ShapeExpr([0, cfg.num_hidden_layers]),
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=shard(cfg.num_attention_heads, self.tp, "num_attention_heads"),
            num_key_value_heads=shard(cfg.num_key_value_heads, self.tp, "num_key_value_heads"),
            qk_head_dim=cfg.head_dim,
            v_head_dim=cfg.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL,  # the cache applies RoPE (rotate_half) to q and k
            rope_scale=1,
            rope_theta=cfg.rope_theta,
            rope_scaling=cfg.rope_scaling,
            rope_ext_factors=relax.prim_value(0),
            rotary_dim=cfg.head_dim,
            enable_disaggregation=False,
            dtype=self.dtype,
            target=self.target,
            kernels=self.attention_kernels,
        )
