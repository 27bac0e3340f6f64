"""Which of Kiln's attention kernels serve the paged KV cache on a target: the one table.

    target                      decode                  prefill (ragged and paged)
    CUDA sm_90a, head_dim 128   split-KV (cp.async)     FlashAttention-3 style, wgmma (prefill_hopper.py)
      (on sm_90+ with PDL the split-KV decode reads its page tables before its PDL wait)
    CUDA, head_dim 64 or 128    split-KV (cp.async)     FlashAttention-2, mma.sync (prefill.py)
    CUDA, other head sizes      split-KV (cp.async)     TVM's
    Metal, tiles fit 32 KB      split-KV (plain TIR)    tiled online softmax (metal_prefill.py)
    Metal, otherwise            split-KV (plain TIR)    TVM's
    anything else, fp32, or a head shape decode.py does not cover: None (TVM's cache, all its kernels)

The compiler asks this table and hands the answer to the model (model_defs never imports schedules/).
"""

from .decode import decode_kernel, decode_supported
from .metal_prefill import metal_prefill_kernel, metal_prefill_supported
from .prefill import prefill_kernel
from .prefill_hopper import hopper_prefill_applies, prefill_hopper_kernel
from ..pdl import supports_pdl


def paged_kv_kernels(target, num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str,
                     pdl: bool = True) -> dict | None:
    """{"decode", "prefill_ragged", "prefill_paged": PrimFunc, or None where TVM's kernel stays}, or None
    where TVM's cache serves whole. `pdl`: the artifact's kernels use programmatic dependent launch where the
    target has it; the decode kernel then reads its page tables before its own wait (decode.py's pdl_prewait)."""
    form = target.kind.name
    if form not in ("cuda", "metal") or dtype not in ("float16", "bfloat16") \
            or not decode_supported(num_kv_heads, num_qo_heads, head_dim, form):
        return None
    shape = (num_kv_heads, num_qo_heads, head_dim, dtype)
    if form == "metal":
        prefill = metal_prefill_kernel if metal_prefill_supported(*shape) else None
    elif hopper_prefill_applies(target, head_dim):
        prefill = prefill_hopper_kernel
    else:
        prefill = prefill_kernel if head_dim in (64, 128) else None
    return {"decode": decode_kernel(*shape, form=form, pdl_prewait=pdl and supports_pdl(target)),
            "prefill_ragged": prefill and prefill("ragged", *shape),
            "prefill_paged": prefill and prefill("paged", *shape)}
