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


# decode variants bench/attention.py can build (`build --variants`), each as decode_kernel's keyword arguments:
# pipeline depth (3 stages, 3 blocks per SM; 5 stages); splits whose states the merge loads at once; the fewest
# pages a split takes (p2: one 2-page tile a block; p8, p16: fewer splits, no merge below 128 / 256 tokens);
# the split arrival by __threadfence around a relaxed atomic (sc, the default before an acquire-release atomic);
# the page-table reads before the PDL wait (pw: what the model builds on sm_90+)
DECODE_VARIANTS = {
    "v3": dict(stages=3), "s5": dict(stages=5), "m8": dict(merge_chunk=8), "m32": dict(merge_chunk=32),
    "p2m32": dict(min_split_pages=2, merge_chunk=32), "p8": dict(min_split_pages=8), "p16": dict(min_split_pages=16),
    "sc": dict(arrive="sc"), "pw": dict(pdl_prewait=True), "pwsc": dict(pdl_prewait=True, arrive="sc"),
    "pwp8": dict(pdl_prewait=True, min_split_pages=8),
}
DEFAULT_BENCH_VARIANTS = ("v3", "s5", "m8", "m32")


def kernels_for_bench(num_kv_heads, num_qo_heads, head_dim, dtype, decode_variants=DEFAULT_BENCH_VARIANTS,
                      pdl=False):
    """(name, PrimFunc) pairs of every Kiln kernel compiled for CUDA (Metal forms included), for bench/attention.py;
    the decode kernel also as each of `decode_variants` (DECODE_VARIANTS' names), ``kiln_decode_paged_kv_<name>``.
    `pdl`: built for programmatic dependent launch, so ``kiln_decode_paged_kv`` is the form the KV cache gets then
    (choice.py: page tables before its own wait)."""
    return [
        ("kiln_decode_paged_kv", decode_kernel(num_kv_heads, num_qo_heads, head_dim, dtype, pdl_prewait=pdl)),
        *((f"kiln_decode_paged_kv_{name}", decode_kernel(num_kv_heads, num_qo_heads, head_dim, dtype, **DECODE_VARIANTS[name]))
          for name in decode_variants),
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
