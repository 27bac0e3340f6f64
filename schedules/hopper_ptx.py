"""Hopper (sm_90a) PTX wrappers for TIR kernels, called through ``T.cuda.func_call``: one wrapper per
instruction, each a (name, CUDA source) pair (constants) or a function returning one; TVM emits a
source once per function name.

Why: TVM 0.27's TIR has no stable script form for wgmma, TMA or mbarriers outside its tile-primitive
framework; these few lines of inline PTX are what a warpgroup matrix multiply needs (shared-memory
descriptors, the asynchronous MMA itself, its fence / commit / wait) and what feeds it (TMA loads
completing on mbarriers), for the attention prefill and the GEMM (schedules/matmul_wgmma.py).

Shared operands are passed as (dynamic shared buffer, byte offset), so that TVM's sync planner sees
no shared-memory access to order; the buffer's base must be 1024-byte aligned for the 128-byte
swizzle (see ``SMEM_ALIGN_PAD``).
"""

_TYPES = {"bfloat16": "bf16", "float16": "f16"}

# bytes to add to a dynamic shared buffer's offsets so that offset 0 is 1024-byte aligned
SMEM_ALIGN_PAD = ("kiln_smem_align_pad", r"""
__device__ __forceinline__ int kiln_smem_align_pad(void* smem) {
  return (int)((1024u - ((unsigned)__cvta_generic_to_shared(smem) & 1023u)) & 1023u);
}
""")

# shared-memory matrix descriptor, 128-byte swizzle: start address, leading / stride byte offsets
DESC_SW128 = ("kiln_desc_sw128", r"""
__device__ __forceinline__ unsigned long long kiln_desc_sw128(void* smem, int byte_offset, int lbo, int sbo) {
  unsigned s = (unsigned)__cvta_generic_to_shared((char*)smem + byte_offset);
  return (unsigned long long)((s >> 4) & 0x3FFF) | ((unsigned long long)((lbo >> 4) & 0x3FFF) << 16)
       | ((unsigned long long)((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}
""")

# the same (name, source) pairs as on the GEMM branch (gemm-wgmma), byte for byte
WGMMA_FENCE = ("kiln_wgmma_fence", r"""
__device__ __forceinline__ void kiln_wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
""")
WGMMA_COMMIT = ("kiln_wgmma_commit", r"""
__device__ __forceinline__ void kiln_wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
""")

# make ordinary shared-memory writes (cp.async, st.shared) visible to the tensor cores' async proxy
FENCE_PROXY_ASYNC = ("kiln_fence_proxy_async", r"""
__device__ __forceinline__ void kiln_fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
""")


def _regs(first: int, n: int) -> str:
    return ",".join(f"%{first + i}" for i in range(n))


def wgmma_wait(n: int, *acc_sizes: int):
    """(name, source): wait until at most ``n`` wgmma groups are pending. The accumulator arrays of
    ``acc_sizes`` floats each are tied to the wait (as CUTLASS's warpgroup_fence_operand does), so the
    compiler reads them only after it."""
    name = f"kiln_wgmma_wait{n}" + "".join(f"_f{s}" for s in acc_sizes)
    params = ", ".join(f"float* a{i}" for i in range(len(acc_sizes)))
    outs = ", ".join(f'"+f"(a{i}[{j}])' for i, s in enumerate(acc_sizes) for j in range(s))
    src = (f"\n__device__ __forceinline__ void {name}({params}) {{\n"
           f'  asm volatile("wgmma.wait_group.sync.aligned {n};\\n" : {outs} :: "memory");\n}}\n')
    return name, src


def wgmma_ss(n: int, dtype: str, trans_b: int = 0):
    """(name, source): D(64 x n, f32) (+)= A(64 x 16) B(16 x n), both from shared memory descriptors
    (A K-major; B K-major, or MN-major with ``trans_b``); ``scale_d`` 0 overwrites D."""
    t = _TYPES[dtype]
    name = f"kiln_wgmma_m64n{n}k16_ss_{t}_t{trans_b}"
    nd = n // 2
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(nd))
    src = f"""
__device__ __forceinline__ void {name}(float* d, unsigned long long da, unsigned long long db, int scale_d) {{
  asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{nd + 2}, 0;\\n"
               "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{t}.{t} {{{_regs(0, nd)}}}, %{nd}, %{nd + 1}, p, 1, 1, 0, {trans_b};\\n}}\\n"
               : {outs} : "l"(da), "l"(db), "r"(scale_d) : "memory");
}}
"""
    return name, src


def wgmma_rs(n: int, dtype: str, trans_b: int = 0):
    """(name, source): D(64 x n, f32) += A(64 x 16, four 16-bit-pair registers per thread in the
    mma.sync A-fragment layout per warp) B(16 x n) from a shared memory descriptor; ``scale_d`` 0
    overwrites D."""
    t = _TYPES[dtype]
    name = f"kiln_wgmma_m64n{n}k16_rs_{t}_t{trans_b}"
    nd = n // 2
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(nd))
    src = f"""
__device__ __forceinline__ void {name}(float* d, const unsigned* a, unsigned long long db, int scale_d) {{
  asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{nd + 5}, 0;\\n"
               "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{t}.{t} {{{_regs(0, nd)}}}, {{{_regs(nd, 4)}}}, %{nd + 4}, p, 1, 1, {trans_b};\\n}}\\n"
               : {outs} : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d) : "memory");
}}
"""
    return name, src


# ---------------------------------------------------------------- mbarriers and TMA (the GEMM's loads)
# `bar` arguments are the byte offset of an 8-byte mbarrier in the shared buffer.
MBAR_INIT = ("kiln_mbar_init", r"""
__device__ __forceinline__ void kiln_mbar_init(void* smem, int bar, int count) {
  unsigned b = (unsigned)__cvta_generic_to_shared((char*)smem + bar);
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(b), "r"(count) : "memory");
}
""")

# makes barrier initialisation visible to the async proxy (TMA), then a CTA barrier
MBAR_INIT_FENCE = ("kiln_mbar_init_fence", r"""
__device__ __forceinline__ void kiln_mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  __syncthreads();
}
""")

MBAR_EXPECT_TX = ("kiln_mbar_expect_tx", r"""
__device__ __forceinline__ void kiln_mbar_expect_tx(void* smem, int bar, int bytes) {
  unsigned b = (unsigned)__cvta_generic_to_shared((char*)smem + bar);
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(b), "r"(bytes) : "memory");
}
""")

MBAR_ARRIVE = ("kiln_mbar_arrive", r"""
__device__ __forceinline__ void kiln_mbar_arrive(void* smem, int bar) {
  unsigned b = (unsigned)__cvta_generic_to_shared((char*)smem + bar);
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(b) : "memory");
}
""")

MBAR_WAIT = ("kiln_mbar_wait", r"""
__device__ __forceinline__ void kiln_mbar_wait(void* smem, int bar, int parity) {
  unsigned b = (unsigned)__cvta_generic_to_shared((char*)smem + bar);
  asm volatile("{\n .reg .pred p;\n WAIT_%=:\n"
               " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
               " @!p bra WAIT_%=;\n}\n" :: "r"(b), "r"(parity) : "memory");
}
""")

# 2-D tiled TMA load global → shared (byte offset `dst`), completing on the mbarrier at `bar`
# (transaction bytes). `tmap` is the address of a __grid_constant__ CUtensorMap kernel parameter;
# x is the inner (contiguous) coordinate.
TMA_LOAD_2D = ("kiln_tma_load_2d", r"""
__device__ __forceinline__ void kiln_tma_load_2d(void* smem, int dst, unsigned long long tmap, int bar, int x, int y) {
  unsigned d = (unsigned)__cvta_generic_to_shared((char*)smem + dst);
  unsigned b = (unsigned)__cvta_generic_to_shared((char*)smem + bar);
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n"
               :: "r"(d), "l"(tmap), "r"(b), "r"(x), "r"(y) : "memory");
}
""")


def setmaxnreg(count: int, increase: bool):
    """(name, source): re-balance this warpgroup's registers (needs a register cap at entry)."""
    op = "inc" if increase else "dec"
    name = f"kiln_setmaxnreg_{op}{count}"
    return name, (f'__device__ __forceinline__ void {name}() '
                  f'{{ asm volatile("setmaxnreg.{op}.sync.aligned.u32 {count};\\n"); }}\n')


def store_pair(dtype: str):
    """(name, source): store two adjacent values of `dtype` (4- or 8-byte aligned) as one vector."""
    vec, make = {"bfloat16": ("__nv_bfloat162", "__halves2bfloat162"), "float16": ("half2", "__halves2half2"),
                 "float32": ("float2", "make_float2")}[dtype]
    scalar = {"bfloat16": "nv_bfloat16", "float16": "half", "float32": "float"}[dtype]
    name = f"kiln_store_pair_{dtype}"
    return name, (f"__device__ __forceinline__ void {name}(void* p, {scalar} a, {scalar} b) "
                  f"{{ *({vec}*)p = {make}(a, b); }}\n")
