"""Kiln's paged-attention kernels (TIR for CUDA), one module per kernel family.

decode.py        split-KV flash-decoding over pages (one query token per sequence)
prefill.py       FlashAttention-2 prefill on tensor cores: ragged (new tokens) and paged (cached)
cuda_helpers.py  the inline PTX (cp.async, ldmatrix, mma.sync) the kernels call
"""

from .decode import decode_kernel
from .prefill import prefill_kernel


def kernels_for_bench(num_kv_heads, num_qo_heads, head_dim, dtype):
    """(name, PrimFunc) pairs of every Kiln CUDA kernel, for bench/attention.py."""
    return [
        ("kiln_decode_paged_kv", decode_kernel(num_kv_heads, num_qo_heads, head_dim, dtype)),
        # variant: splits for two waves of blocks (the default fills one)
        ("kiln_decode_paged_kv_w2", decode_kernel(num_kv_heads, num_qo_heads, head_dim, dtype, resident_blocks=2 * 396)),
        ("kiln_prefill_ragged", prefill_kernel("ragged", num_kv_heads, num_qo_heads, head_dim, dtype)),
        # variants (m-tiles per warp, KV tile): 32-token tiles (151 registers: 3 blocks per SM); 2 x 32
        ("kiln_prefill_ragged_m1n32", prefill_kernel("ragged", num_kv_heads, num_qo_heads, head_dim, dtype, 1, 32)),
        ("kiln_prefill_ragged_m2n32", prefill_kernel("ragged", num_kv_heads, num_qo_heads, head_dim, dtype, 2, 32)),
        ("kiln_prefill_paged", prefill_kernel("paged", num_kv_heads, num_qo_heads, head_dim, dtype)),
    ]
