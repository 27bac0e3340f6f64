"""Inline PTX for Hopper (sm_90a) kernels: TMA loads, mbarriers, wgmma. One helper per instruction.

Each entry is a (name, source) pair for ``T.cuda.func_call(name, ..., source_code=source)`` (TVM emits
each source once per function name). Shared-memory operands are 32-bit shared-window addresses
(``kiln_smem_addr``): TVM's sync planner then sees no shared-memory access to order, and the
kernels do all their ordering with mbarriers and wgmma fences themselves.

Why hand-written: TVM 0.27's own wgmma/TMA ops live in its tile-primitive framework; these lines are
all the GEMM needs, and the same style as schedules/attention/cuda_helpers.py.
"""

from __future__ import annotations

# Shared-window address of a dynamic shared buffer, rounded up to 1024 bytes (the 128-byte swizzle
# atom of TMA and wgmma repeats every 8 rows of 128 bytes; TVM aligns shared.dyn to 64 only).
SMEM_ADDR = ("kiln_smem_addr", r"""
__device__ __forceinline__ unsigned kiln_smem_addr(void* smem) {
  return ((unsigned)__cvta_generic_to_shared(smem) + 1023u) & ~1023u;
}
""")

MBAR_INIT = ("kiln_mbar_init", r"""
__device__ __forceinline__ void kiln_mbar_init(unsigned bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(count) : "memory");
}
""")

# Makes barrier initialisation visible to the async proxy (TMA), then a CTA barrier.
MBAR_INIT_FENCE = ("kiln_mbar_init_fence", r"""
__device__ __forceinline__ void kiln_mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  __syncthreads();
}
""")

MBAR_EXPECT_TX = ("kiln_mbar_expect_tx", r"""
__device__ __forceinline__ void kiln_mbar_expect_tx(unsigned bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(bar), "r"(bytes) : "memory");
}
""")

MBAR_ARRIVE = ("kiln_mbar_arrive", r"""
__device__ __forceinline__ void kiln_mbar_arrive(unsigned bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(bar) : "memory");
}
""")

MBAR_WAIT = ("kiln_mbar_wait", r"""
__device__ __forceinline__ void kiln_mbar_wait(unsigned bar, int parity) {
  asm volatile("{\n .reg .pred p;\n WAIT_%=:\n"
               " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
               " @!p bra WAIT_%=;\n}\n" :: "r"(bar), "r"(parity) : "memory");
}
""")

# 2-D tiled TMA load global → shared, completing on an mbarrier (transaction bytes). `tmap` is the
# address of a __grid_constant__ CUtensorMap kernel parameter; x is the inner (contiguous) coordinate.
TMA_LOAD_2D = ("kiln_tma_load_2d", r"""
__device__ __forceinline__ void kiln_tma_load_2d(unsigned dst, unsigned long long tmap, unsigned bar, int x, int y) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n"
               :: "r"(dst), "l"(tmap), "r"(bar), "r"(x), "r"(y) : "memory");
}
""")

WGMMA_FENCE = ("kiln_wgmma_fence", r"""
__device__ __forceinline__ void kiln_wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
""")

WGMMA_COMMIT = ("kiln_wgmma_commit", r"""
__device__ __forceinline__ void kiln_wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
""")


def wgmma_wait(n: int):
    """(name, source): wait until at most ``n`` wgmma groups of this warpgroup are pending."""
    name = f"kiln_wgmma_wait{n}"
    return name, (f'__device__ __forceinline__ void {name}() '
                  f'{{ asm volatile("wgmma.wait_group.sync.aligned {n};\\n" ::: "memory"); }}\n')


def setmaxnreg(count: int, increase: bool):
    """(name, source): re-balance this warpgroup's registers (sm_90a; needs a register cap at entry)."""
    op = "inc" if increase else "dec"
    name = f"kiln_setmaxnreg_{op}{count}"
    return name, (f'__device__ __forceinline__ void {name}() '
                  f'{{ asm volatile("setmaxnreg.{op}.sync.aligned.u32 {count};\\n"); }}\n')


# Shared-memory matrix descriptor of a K-major tile with the 128-byte swizzle (rows of 64 16-bit
# values, 8-row atoms 1024 bytes apart): start address >> 4 | LBO 16 B | SBO 1024 B | swizzle mode 1.
# Successive k16 steps inside the 64-wide row add 32 bytes to the start address.
WGMMA_DESC = ("kiln_wgmma_desc", r"""
__device__ __forceinline__ unsigned long long kiln_wgmma_desc(unsigned addr) {
  return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}
""")


def wgmma_fence_operands(n_regs: int):
    """(name, source): an empty asm that claims to rewrite ``n_regs`` accumulators, so that the
    compiler neither reads them before a wgmma wait nor writes them after a wgmma is issued."""
    name = f"kiln_wgmma_fence_acc{n_regs}"
    lines = "\n".join(f'  asm volatile("" : "+f"(d[{i}]) :: "memory");' for i in range(n_regs))
    return name, f"__device__ __forceinline__ void {name}(float* d) {{\n{lines}\n}}\n"


def wgmma_ss(n: int, dtype: str):
    """(name, source): D[64×n] (fp32 registers) += A[64×16] · B[n×16]^T, both K-major in shared
    memory (descriptors), as one asynchronous warpgroup instruction."""
    assert n % 8 == 0 and 8 <= n <= 256
    t = {"bfloat16": "bf16", "float16": "f16"}[dtype]
    name = f"kiln_wgmma_m64n{n}k16_{t}"
    regs = n // 2
    dlist = ", ".join(f"%{i}" for i in range(regs))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(regs))
    src = (f"__device__ __forceinline__ void {name}(float* d, unsigned long long da, unsigned long long db) {{\n"
           f'  asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, 1, 0;\\n"\n'
           f'               "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{t}.{t} {{{dlist}}}, %{regs}, %{regs + 1}, p, 1, 1, 0, 0;\\n}}\\n"\n'
           f"               : {outs}\n"
           f'               : "l"(da), "l"(db));\n}}\n')
    return name, src


def store_pair(dtype: str):
    """(name, source): store two adjacent values of `dtype` (4- or 8-byte aligned) as one vector."""
    vec, make = {"bfloat16": ("__nv_bfloat162", "__halves2bfloat162"), "float16": ("half2", "__halves2half2"),
                 "float32": ("float2", "make_float2")}[dtype]
    scalar = {"bfloat16": "nv_bfloat16", "float16": "half", "float32": "float"}[dtype]
    name = f"kiln_store_pair_{dtype}"
    return name, (f"__device__ __forceinline__ void {name}(void* p, {scalar} a, {scalar} b) "
                  f"{{ *({vec}*)p = {make}(a, b); }}\n")
