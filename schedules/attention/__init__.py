"""Kiln's paged-attention kernels (TIR), one module per kernel family.

decode.py   split-KV flash-decoding over pages (one query token per sequence)
"""

from .decode import decode_kernel


def kernels_for_bench(num_kv_heads, num_qo_heads, head_dim, dtype):
    """(name, PrimFunc) pairs of every Kiln CUDA kernel, for bench/attention.py and the tests."""
    return [
        ("kiln_decode_paged_kv", decode_kernel(num_kv_heads, num_qo_heads, head_dim, dtype)),
        # variant: splits for two waves of blocks (the default fills one)
        ("kiln_decode_paged_kv_w2", decode_kernel(num_kv_heads, num_qo_heads, head_dim, dtype, resident_blocks=2 * 396)),
    ]
