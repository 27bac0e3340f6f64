"""Kiln's paged-attention kernels (TIR for CUDA and Metal), one module per kernel family.

decode.py         split-KV flash-decoding over pages (one query token per sequence); CUDA and Metal forms
prefill.py        FlashAttention-2 prefill on tensor cores: ragged (new tokens) and paged (cached)
metal_prefill.py  tiled online-softmax prefill in plain TIR (Metal; also compiles for CUDA)
cuda_helpers.py   the inline PTX (cp.async, ldmatrix, mma.sync) and device helpers the CUDA kernels call
"""

from .decode import decode_kernel
from .metal_prefill import metal_prefill_kernel
from .prefill import prefill_kernel


def kernels_for_bench(num_kv_heads, num_qo_heads, head_dim, dtype):
    """(name, PrimFunc) pairs of every Kiln CUDA kernel, for bench/attention.py."""
    return [
        ("kiln_decode_paged_kv", decode_kernel(num_kv_heads, num_qo_heads, head_dim, dtype)),
        # variants: pipeline depth (3 stages = v3, 3 blocks per SM; 5 stages, 2 blocks per SM)
        ("kiln_decode_paged_kv_v3", decode_kernel(num_kv_heads, num_qo_heads, head_dim, dtype, stages=3)),
        ("kiln_decode_paged_kv_s5", decode_kernel(num_kv_heads, num_qo_heads, head_dim, dtype, stages=5)),
        # the Metal forms, compiled for CUDA to check them on the GPU
        ("kiln_metal_decode_paged_kv", decode_kernel(num_kv_heads, num_qo_heads, head_dim, dtype, form="metal")),
        ("kiln_metal_prefill_ragged", metal_prefill_kernel("ragged", num_kv_heads, num_qo_heads, head_dim, dtype)),
        ("kiln_metal_prefill_paged", metal_prefill_kernel("paged", num_kv_heads, num_qo_heads, head_dim, dtype)),
        ("kiln_prefill_ragged", prefill_kernel("ragged", num_kv_heads, num_qo_heads, head_dim, dtype)),
        # variants (m-tiles per warp, KV tile): 32-token tiles (151 registers: 3 blocks per SM); 2 x 32
        ("kiln_prefill_ragged_m1n32", prefill_kernel("ragged", num_kv_heads, num_qo_heads, head_dim, dtype, 1, 32)),
        ("kiln_prefill_ragged_m2n32", prefill_kernel("ragged", num_kv_heads, num_qo_heads, head_dim, dtype, 2, 32)),
        ("kiln_prefill_paged", prefill_kernel("paged", num_kv_heads, num_qo_heads, head_dim, dtype)),
    ]
