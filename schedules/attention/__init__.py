"""Kiln's paged-attention kernels (TIR for CUDA and Metal), one module per kernel family.

choice.py          which kernels the paged KV cache gets on a target (the one table; the compiler asks it)
decode.py          split-KV flash-decoding over pages (one query token per sequence); CUDA and Metal forms
prefill.py         FlashAttention-2 prefill on tensor cores (mma.sync): ragged (new tokens) and paged (cached)
prefill_hopper.py  FlashAttention-3 style prefill for sm_90a (wgmma), same two forms
metal_prefill.py   tiled online-softmax prefill in plain TIR (Metal; also compiles for CUDA)
prefill_forms.py   TVM's ragged and paged prefill calling conventions, shared by the three prefill kernels
cuda_helpers.py    the inline PTX (cp.async, ldmatrix, mma.sync) the kernels call (wgmma: schedules/hopper_ptx.py)
"""

from .decode import decode_kernel
from .metal_prefill import metal_prefill_kernel
from .prefill import prefill_kernel
from .prefill_hopper import prefill_hopper_kernel

# Hopper prefill variants timed by bench/attention.py: (warpgroups per block, KV tile, min blocks per SM, stages)
HOPPER_VARIANTS = {"w2n64": (2, 64, 1, 2), "w1n32mb3": (1, 32, 3, 2)}


def kernels_for_bench(num_kv_heads, num_qo_heads, head_dim, dtype):
    """(name, PrimFunc) pairs of every Kiln kernel compiled for CUDA (Metal forms included), for bench/attention.py."""
    return [
        ("kiln_decode_paged_kv", decode_kernel(num_kv_heads, num_qo_heads, head_dim, dtype)),
        # variants: pipeline depth (3 stages = v3, 3 blocks per SM; 5 stages, 2 blocks per SM)
        ("kiln_decode_paged_kv_v3", decode_kernel(num_kv_heads, num_qo_heads, head_dim, dtype, stages=3)),
        ("kiln_decode_paged_kv_s5", decode_kernel(num_kv_heads, num_qo_heads, head_dim, dtype, stages=5)),
        # the in-kernel split merge loading 8 or 32 splits' states at once (16: the kernel's)
        ("kiln_decode_paged_kv_m8", decode_kernel(num_kv_heads, num_qo_heads, head_dim, dtype, merge_chunk=8)),
        ("kiln_decode_paged_kv_m32", decode_kernel(num_kv_heads, num_qo_heads, head_dim, dtype, merge_chunk=32)),
        # the Metal forms, compiled for CUDA to check them on the GPU
        ("kiln_metal_decode_paged_kv", decode_kernel(num_kv_heads, num_qo_heads, head_dim, dtype, form="metal")),
        ("kiln_metal_prefill_ragged", metal_prefill_kernel("ragged", num_kv_heads, num_qo_heads, head_dim, dtype)),
        ("kiln_metal_prefill_paged", metal_prefill_kernel("paged", num_kv_heads, num_qo_heads, head_dim, dtype)),
        # prefill: the wgmma kernel (what the cache uses on sm_90a), its variants, the mma.sync kernel
        ("kiln_prefill_ragged", prefill_hopper_kernel("ragged", num_kv_heads, num_qo_heads, head_dim, dtype)),
        *((f"kiln_prefill_ragged_{name}", prefill_hopper_kernel("ragged", num_kv_heads, num_qo_heads, head_dim, dtype, *v))
          for name, v in HOPPER_VARIANTS.items()),
        ("kiln_prefill_ragged_fa2", prefill_kernel("ragged", num_kv_heads, num_qo_heads, head_dim, dtype)),
        ("kiln_prefill_paged", prefill_hopper_kernel("paged", num_kv_heads, num_qo_heads, head_dim, dtype)),
        ("kiln_prefill_paged_fa2", prefill_kernel("paged", num_kv_heads, num_qo_heads, head_dim, dtype)),
    ]
