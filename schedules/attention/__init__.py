"""Kiln's paged-attention kernels (TIR for CUDA), one module per kernel family.

decode.py        split-KV flash-decoding over pages (one query token per sequence)
prefill.py       FlashAttention-2 prefill on tensor cores (mma.sync): ragged (new tokens) and paged (cached)
prefill_hopper.py  FlashAttention-3 style prefill for sm_90a (wgmma), same two forms
cuda_helpers.py  the inline PTX (cp.async, ldmatrix, mma.sync) the kernels call (wgmma: schedules/hopper_ptx.py)
"""

from .decode import decode_kernel
from .prefill import prefill_kernel
from .prefill_hopper import prefill_hopper_kernel

# Hopper prefill variants timed by bench/attention.py: (warpgroups per block, KV tile, min blocks per SM, stages)
HOPPER_VARIANTS = {"w2n64": (2, 64, 1, 2), "w1n32mb3": (1, 32, 3, 2)}


def kernels_for_bench(num_kv_heads, num_qo_heads, head_dim, dtype):
    """(name, PrimFunc) pairs of every Kiln CUDA kernel, for bench/attention.py."""
    return [
        ("kiln_decode_paged_kv", decode_kernel(num_kv_heads, num_qo_heads, head_dim, dtype)),
        # variant: splits for two waves of blocks (the default fills one)
        ("kiln_decode_paged_kv_w2", decode_kernel(num_kv_heads, num_qo_heads, head_dim, dtype, resident_blocks=2 * 396)),
        # prefill: the wgmma kernel (what the cache uses on sm_90a), its variants, the mma.sync kernel
        ("kiln_prefill_ragged", prefill_hopper_kernel("ragged", num_kv_heads, num_qo_heads, head_dim, dtype)),
        *((f"kiln_prefill_ragged_{name}", prefill_hopper_kernel("ragged", num_kv_heads, num_qo_heads, head_dim, dtype, *v))
          for name, v in HOPPER_VARIANTS.items()),
        ("kiln_prefill_ragged_fa2", prefill_kernel("ragged", num_kv_heads, num_qo_heads, head_dim, dtype)),
        ("kiln_prefill_paged", prefill_hopper_kernel("paged", num_kv_heads, num_qo_heads, head_dim, dtype)),
        ("kiln_prefill_paged_fa2", prefill_kernel("paged", num_kv_heads, num_qo_heads, head_dim, dtype)),
    ]
