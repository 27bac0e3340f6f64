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
