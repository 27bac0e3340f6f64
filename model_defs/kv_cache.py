"""Kiln's paged KV cache: TVM's runtime cache object with Kiln's attention kernels on CUDA and Metal.

`KilnPagedKVCache` takes exactly the arguments of TVM's `TIRPagedKVCache` and emits the same
`vm.builtin.paged_attention_kv_cache_create` call (the runtime in paged_kv_cache.cc is unchanged),
but passes Kiln's TIR kernels (schedules/attention/, chosen there by paged_kv_kernels and handed in by
the compiler as `kernels`) where they exist:
  - decode: split-KV flash-decoding (schedules/attention/decode.py); TVM's runs one block per
    (sequence, KV head) and reaches ~1% of HBM bandwidth at batch 1;
  - ragged prefill and prefill over pages (chunked prefill), head_dim 64 or 128: on sm_90a with
    head_dim 128 FlashAttention-3 style wgmma (schedules/attention/prefill_hopper.py), otherwise
    FlashAttention-2 on mma.sync (prefill.py); TVM's use no tensor cores (~3 TFLOP/s).
On Metal: the same split-KV decode in plain TIR (decode.py, form "metal") and a tiled
online-softmax prefill (metal_prefill.py) where its tiles fit 32 KB of threadgroup memory.
Everything else (sliding-window and tree-attention variants, state merge, page copies, RoPE) stays
TVM's. Other targets (llvm: TVM's *_cpu kernels), MLA, inline RoPE
and non-16-bit dtypes fall back to `TIRPagedKVCache` unchanged.
"""

from typing import Any

import tvm
from tvm import relax as rx
from tvm.relax.frontend.nn.llm import kv_cache as tvm_kv
from tvm.relax.frontend.nn.llm.kv_cache import AttnKind, PagedKVCache, RopeMode, TIRPagedKVCache



def _cap_decode_threads(target, head_dim: int, group: int):
    """TVM's decode kernel makes blockDim.z = threads / (bdx·bdy) with bdx = head_dim / vec; for tiny
    heads (stories260K: head_dim 8) that exceeds CUDA's limit of 64 and the launch fails. Lower the
    target's thread limit just enough for this cache's kernels."""
    if target.kind.name != "cuda":
        return target
    cap = 64 * (head_dim // 4) * group  # TVM's _attention_decode: bdx = head_dim / 4, bdy = group
    if cap >= int(target.attrs["max_num_threads"]) or cap >= 512:
        return target
    spec = dict(target.export())
    spec.update(max_num_threads=cap, max_threads_per_block=cap)
    spec.pop("keys", None)
    return tvm.target.Target(spec, host=target.host)


class KilnPagedKVCache(PagedKVCache):  # pylint: disable=too-few-public-methods
    """Drop-in for `TIRPagedKVCache` (same positional and keyword arguments) plus `kernels`: Kiln's
    kernels for this target and head shape as schedules.attention.paged_kv_kernels chose them (None: TVM's)."""

    def __init__(  # pylint: disable=too-many-locals,too-many-arguments
        self,
        attn_kind,
        max_batch_size,
        max_total_seq_len,
        prefill_chunk_size,
        page_size,
        support_sliding_window,
        layer_partition,
        num_hidden_layers: int,
        num_attention_heads: int,
        num_key_value_heads: int,
        qk_head_dim: int,
        v_head_dim: int,
        mla_original_qk_head_dim: int,
        mla_original_v_head_dim: int,
        rope_mode,
        rope_scale,
        rope_theta,
        rope_scaling: dict[str, Any],
        rope_ext_factors,
        rotary_dim: int,
        enable_disaggregation: bool,
        dtype: str,
        target,
        name: str = "paged_kv_cache",
        *,
        layer_sliding_window_size: int = 1024,
        kernels: dict | None = None,
    ) -> None:
        args = (attn_kind, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size, support_sliding_window,
                layer_partition, num_hidden_layers, num_attention_heads, num_key_value_heads, qk_head_dim, v_head_dim,
                mla_original_qk_head_dim, mla_original_v_head_dim, rope_mode, rope_scale, rope_theta, rope_scaling,
                rope_ext_factors, rotary_dim, enable_disaggregation, dtype, target)
        if kernels is None or attn_kind != "mha" or rope_mode == RopeMode.INLINE or qk_head_dim != v_head_dim:
            target = _cap_decode_threads(target, qk_head_dim, num_attention_heads // num_key_value_heads)
            args = (*args[:-1], target)
            tvm_cache = TIRPagedKVCache(*args, name, layer_sliding_window_size=layer_sliding_window_size)
            super().__init__(_expr=tvm_cache._expr, _name=name)  # pylint: disable=protected-access
            return

        rope_scaling = tvm_kv._prepare_yarn_rope_scaling(rope_scaling, rope_theta)  # pylint: disable=protected-access
        h_kv, h_qo, d = num_key_value_heads, num_attention_heads, qk_head_dim
        bb = rx.BlockBuilder.current()

        def tir(func, fname):
            return rx.Tuple([tvm.ir.StringImm("tirx"), bb.add_func(func, fname)])

        # Same argument list as TIRPagedKVCache builds for GPU targets (kv_cache.py, TVM 0.27),
        # with Kiln's kernels in the decode and (non-sliding) prefill slots.
        call_args = [
            rx.ShapeExpr([max_batch_size, max_total_seq_len, prefill_chunk_size, page_size, support_sliding_window,
                          layer_sliding_window_size]),
            layer_partition,
            rx.prim_value(h_qo),
            rx.prim_value(h_kv),
            rx.prim_value(qk_head_dim),
            rx.prim_value(v_head_dim),
            rx.ShapeExpr([int(AttnKind.MHA) for _ in range(num_hidden_layers)]),
            rx.prim_value(enable_disaggregation),
            rx.prim_value(rope_mode),
            rx.prim_value(rope_scale),
            rx.prim_value(rope_theta),
            rope_ext_factors,
            rx.op.zeros((), dtype),
            bb.add_func(tvm_kv._kv_cache_transpose_append(h_kv, d, dtype), "kv_cache_transpose_append"),
            bb.add_func(tvm_kv._kv_cache_transpose_append_mla(d, dtype), "kv_cache_transpose_append_mla"),
            tir(kernels["prefill_ragged"]
                or tvm_kv._attention_prefill_ragged(h_kv, h_qo, d, v_head_dim, dtype, rope_scaling, target),
                "tir_attention_prefill_ragged"),
            tir(kernels["prefill_paged"]
                or tvm_kv._attention_prefill(h_kv, h_qo, d, dtype, False, rope_scaling, target),
                "tir_attention_prefill"),
            tir(kernels["decode"], "kiln_attention_decode"),
            tir(tvm_kv._attention_prefill(h_kv, h_qo, d, dtype, True, rope_scaling, target,
                                          sliding_window_size=layer_sliding_window_size),
                "tir_attention_prefill_sliding_window"),
            tir(tvm_kv._attention_decode(h_kv, h_qo, d, dtype, True, rope_scaling, target),
                "tir_attention_decode_sliding_window"),
            tir(tvm_kv.tree_attn_with_paged_kv_cache(h_kv, h_qo, d, dtype, rope_scaling, target),
                "tir_attention_prefill_with_tree_mask_with_paged_kv_cache"),
            tir(tvm_kv.tree_attn(h_kv, h_qo, d, dtype, rope_scaling, target), "tir_attention_prefill_with_tree_mask"),
            rx.Tuple([]),  # no MLA prefill
            rx.Tuple([bb.add_func(tvm_kv._merge_state_inplace(h_qo, v_head_dim, dtype, target, "tir_attention_merge_state"),
                                  "tir_attention_merge_state")]),
            bb.add_func(tvm_kv.llama_rope_with_position_map(rope_theta, rope_scale, d, h_qo, h_kv, dtype, rope_scaling,
                                                            rotary_dim), "tir_split_rotary"),
            bb.add_func(tvm_kv._copy_single_page(h_kv, page_size, d, dtype, target), "kv_cache_copy_single_page"),
            bb.add_func(tvm_kv._kv_cache_debug_get_kv(num_hidden_layers, h_kv, d, dtype), "kv_cache_debug_get_kv"),
            bb.add_func(tvm_kv._compact_kv_copy(h_kv, d, dtype, target), "kv_cache_compact_kv_copy"),
        ]
        super().__init__(
            _expr=rx.call_pure_packed("vm.builtin.paged_attention_kv_cache_create", *call_args, ty_args=rx.AnyType()),
            _name=name,
        )
