"""Inline PTX helpers the TIR kernels call through ``T.cuda.func_call`` (one function per source string: TVM emits each source once per function name).

The shared destination is passed as (buffer base, byte offset) rather than an element address, so
TVM's sync planner does not mistake the asynchronous copies for shared-memory accesses to order.

Why: TVM 0.27's TIR has no stable script form for cp.async / ldmatrix / mma.sync outside its
tile-primitive framework; these few lines of PTX are the instructions the kernels need.
"""

CP_ASYNC16 = r"""
__device__ __forceinline__ void kiln_cp_async16(void* smem, int byte_offset, const void* gmem) {
  unsigned s = (unsigned)__cvta_generic_to_shared((char*)smem + byte_offset);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(s), "l"(gmem) : "memory");
}
"""
CP_COMMIT = r"""
__device__ __forceinline__ void kiln_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
"""


def cp_async_wait(n: int):
    """(name, source) of a helper waiting until at most ``n`` cp.async groups are pending."""
    name = f"kiln_cp_async_wait{n}"
    return name, f'__device__ __forceinline__ void {name}() {{ asm volatile("cp.async.wait_group {n};\\n" ::: "memory"); }}\n'

# one MUFU instruction (exp2f adds range handling); inputs are <= 0 here, -1e30 gives 0
EX2 = r"""
__device__ __forceinline__ float kiln_ex2(float x) { float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }
"""
SYNC = r"""
__device__ __forceinline__ void kiln_syncthreads() { __syncthreads(); }
"""
# ldmatrix: four 8x8 b16 matrices; lane l gives the row address of matrix l / 8, row l % 8
LDSM_X4 = r"""
__device__ __forceinline__ void kiln_ldsm_x4(void* smem, int byte_offset, unsigned* r) {
  unsigned s = (unsigned)__cvta_generic_to_shared((char*)smem + byte_offset);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s) : "memory");
}
"""
LDSM_X4_T = r"""
__device__ __forceinline__ void kiln_ldsm_x4_t(void* smem, int byte_offset, unsigned* r) {
  unsigned s = (unsigned)__cvta_generic_to_shared((char*)smem + byte_offset);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s) : "memory");
}
"""


def mma_16816(dtype: str):
    """(name, source): D(16x8, f32) += A(16x16) B(16x8), A and B as packed 16-bit pairs."""
    t = {"bfloat16": "bf16", "float16": "f16"}[dtype]
    name = f"kiln_mma_16816_{t}"
    src = f"""
__device__ __forceinline__ void {name}(float* c, const unsigned* a, const unsigned* b) {{
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.{t}.{t}.f32 {{%0,%1,%2,%3}}, {{%4,%5,%6,%7}}, {{%8,%9}}, {{%0,%1,%2,%3}};\\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}}
"""
    return name, src


def pack2(dtype: str):
    """(name, source): two floats -> one register of two 16-bit values (low = first)."""
    if dtype == "bfloat16":
        name = "kiln_pack_bf16x2"
        body = "__nv_bfloat162 v = __floats2bfloat162_rn(lo, hi); return *(unsigned*)&v;"
    else:
        name = "kiln_pack_f16x2"
        body = "__half2 v = __floats2half2_rn(lo, hi); return *(unsigned*)&v;"
    return name, f"\n__device__ __forceinline__ unsigned {name}(float lo, float hi) {{ {body} }}\n"

# Split-KV decode's merge in the same kernel (decode.py): the last of a (sequence, KV head)'s split blocks to
# arrive merges all their states. The counters are static storage, so zero when the module loads; the merging
# block sets its slot back to 0 for the next call (which, later on the stream, sees it). Slots are
# `sequence x KV heads + KV head`, used only while a sequence has more than one split, i.e. while
# batch x KV heads <= resident blocks / 2 (decode.py checks that the array covers it).
SPLIT_ARRIVAL_SLOTS = 1024
SPLIT_ARRIVE = r"""
__device__ unsigned int kiln_split_arrivals[%d];
__device__ __forceinline__ int kiln_split_arrive(int slot, int splits) {
  __threadfence();
  unsigned old = atomicAdd(&kiln_split_arrivals[slot], 1u);
  if (old != (unsigned)(splits - 1)) return 0;
  atomicExch(&kiln_split_arrivals[slot], 0u);
  __threadfence();
  return 1;
}
""" % SPLIT_ARRIVAL_SLOTS
# The same arrival with one acquire-release atomic by the block's first thread after a block barrier (CUTLASS's
# split-K semaphore pattern): the barrier orders every thread's state stores before the release, the acquire
# orders the other blocks' stores before the merge's reads (after a second barrier); no sequentially
# consistent fence (MEMBAR.SC.GPU) on the chain. Its own counter array, so both forms build into one library.
SPLIT_ARRIVE_ACQ_REL = r"""
__device__ unsigned int kiln_split_arrivals_ar[%d];
__device__ __forceinline__ int kiln_split_arrive_ar(int slot, int splits) {
  unsigned old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %%0, [%%1], 1;\n" : "=r"(old) : "l"(&kiln_split_arrivals_ar[slot]) : "memory");
  if (old != (unsigned)(splits - 1)) return 0;
  atomicExch(&kiln_split_arrivals_ar[slot], 0u);
  return 1;
}
""" % SPLIT_ARRIVAL_SLOTS
THREADFENCE = r"""
__device__ __forceinline__ void kiln_threadfence() { __threadfence(); }
"""
# loads from L2 (ld.global.cg): other blocks' partial states, never a line this SM's L1 may hold stale
LDCG = r"""
__device__ __forceinline__ float kiln_ldcg(const float* p) { return __ldcg(p); }
"""
LDCG4 = r"""
__device__ __forceinline__ void kiln_ldcg4(float* dst, const float* src) {
  float4 v = __ldcg((const float4*)src); dst[0] = v.x; dst[1] = v.y; dst[2] = v.z; dst[3] = v.w;
}
"""
