"""ldmatrix + mma.sync m16n8k16 tensor intrinsics for fp16 AND bf16 inputs, fp32 accumulation.

TVM 0.27 registers these for float16 only (its ldmatrix generator asserts float16 and its mma
name table has no bf16). ldmatrix moves 16-bit words whatever their type, and `mma.sync` takes
`bf16` operands on sm_80+, so the same descriptions with the dtype swapped are all we need.
Only the NT case (A[m,k], B[n,k], both k-contiguous in shared memory) is registered: that is
what `nn.Linear` weights in [out, in] layout give after FuseTransposeMatmul.
"""

from __future__ import annotations

from tvm.runtime import convert
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T
from tvm.tirx import Cast

WARP = 32
LOCAL = 8  # 16x16 elements / 32 lanes
DTYPES = {"float16": "fp16", "bfloat16": "bf16"}
STORE = "kiln_mma_store_f32_shared_dyn"
FILL = "kiln_mma_fill_f32"


def frag_layout(i, j):
    """(row, col) of a 16x16 tile → (lane, register) in the mma.sync m16n8k16 fragment layout.

    Ours rather than tvm.s_tir.tensor_intrin.cuda's: importing that module registers hundreds
    of intrinsics and takes ~30 s; every model compile would pay it.
    """
    return 4 * (i % 8) + (j % 8) // 2, 4 * (j // 8) + (i // 8) * 2 + (j % 2)


def ldmatrix_name(dtype: str, operand: str) -> str:
    return f"kiln_ldmatrix_{dtype}_{operand}"


def mma_name(dtype: str) -> str:
    return f"kiln_mma_{dtype}_f32_nt"


def _a_rows(stride, lane):
    """A[m,k] tile: lanes 0-15 point at rows 0-15, columns 0-7; lanes 16-31 at the same rows,
    columns 8-15 (fragments a0..a3, as the mma description below reads them)."""
    return stride * (lane % 16) + 8 * (lane // 16)


def _b_rows(stride, lane):
    """B[n,k] tile: lanes 0-7 rows n0-7 k0-7, 8-15 rows n0-7 k8-15, 16-31 the same for n8-15.

    mma's B fragment for one n8 half is (k0-7, k8-15) of the same 8 rows; this order makes
    registers 0,1 the first n8 half and 2,3 the second, as TVM's trans-B intrinsic does.
    """
    return stride * 8 * (lane // 16) + stride * (lane % 8) + 8 * ((lane % 16) // 8)


def _ldmatrix(dtype: str, lane_offset):
    """A 16x16 k-contiguous tile of shared memory → one warp's fragment (x4, no transpose); lane
    `tx` gives ldmatrix the address of element `lane_offset(row stride, tx)` (`_a_rows`, `_b_rows`)."""

    @T.prim_func(s_tir=True)
    def desc(warp_handle: T.handle, shared_handle: T.handle) -> None:
        shared = T.match_buffer(shared_handle, (16, 16), dtype, align=64, offset_factor=16,
                                scope="shared.dyn")
        warp = T.match_buffer(warp_handle, (WARP, LOCAL), dtype, align=64, offset_factor=16,
                              scope="warp")
        with T.sblock("root"):
            T.reads(shared[0:16, 0:16])
            T.writes(warp[0:WARP, 0:LOCAL])
            for ax0, ax1 in T.grid(16, 16):
                with T.sblock("shared_warp"):
                    v0, v1 = T.axis.remap("SS", [ax0, ax1])
                    T.reads(shared[v0, v1])
                    thread_id, local_id = T.meta_var(frag_layout(v0, v1))
                    T.writes(warp[thread_id, local_id])
                    warp[thread_id, local_id] = shared[v0, v1]

    @T.prim_func(s_tir=True)
    def impl(warp_handle: T.handle, shared_handle: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        shared = T.match_buffer(shared_handle, (16, 16), dtype, align=64, offset_factor=16,
                                scope="shared.dyn", strides=[s0, s1])
        warp = T.match_buffer(warp_handle, (WARP, LOCAL), dtype, align=64, offset_factor=16,
                              scope="warp")
        with T.sblock("root"):
            T.reads(shared[0:16, 0:16])
            T.writes(warp[0:WARP, 0:LOCAL])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                T.evaluate(T.ptx_legacy.ldmatrix(
                    False, 4, ".b16", warp.data, warp.elem_offset + convert(LOCAL) * tx,
                    shared.access_ptr("r"), lane_offset(s0, tx), dtype=dtype))

    return desc, impl


def _mma(dtype: str):
    """C[16,16] += A[16,16] · B[16,16]^T as two m16n8k16 mma.sync (fp32 accumulators)."""
    ab = DTYPES[dtype]

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WARP, LOCAL), dtype, align=64, offset_factor=16, scope="warp")
        B = T.match_buffer(b, (WARP, LOCAL), dtype, align=64, offset_factor=16, scope="warp")
        C = T.match_buffer(c, (WARP, LOCAL), "float32", align=64, offset_factor=16,
                           scope="warp")
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:LOCAL], A[0:WARP, 0:LOCAL], B[0:WARP, 0:LOCAL])
            T.writes(C[0:WARP, 0:LOCAL])
            for i, j, k in T.grid(16, 16, 16):
                with T.sblock("C"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    tc, lc = T.meta_var(frag_layout(vi, vj))
                    ta, la = T.meta_var(frag_layout(vi, vk))
                    tb, lb = T.meta_var(frag_layout(vj, vk))
                    T.reads(C[tc, lc], A[ta, la], B[tb, lb])
                    T.writes(C[tc, lc])
                    C[tc, lc] += Cast("float32", A[ta, la]) * Cast("float32", B[tb, lb])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WARP, LOCAL), dtype, align=64, offset_factor=16, scope="warp")
        B = T.match_buffer(b, (WARP, LOCAL), dtype, align=64, offset_factor=16, scope="warp")
        C = T.match_buffer(c, (WARP, LOCAL), "float32", align=64, offset_factor=16,
                           scope="warp")
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:LOCAL], A[0:WARP, 0:LOCAL], B[0:WARP, 0:LOCAL])
            T.writes(C[0:WARP, 0:LOCAL])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                T.evaluate(T.ptx_legacy.mma(
                    "m16n8k16", "row", "col", ab, ab, "fp32",
                    A.data, A.elem_offset + tx * convert(LOCAL),
                    B.data, B.elem_offset + tx * convert(LOCAL),
                    C.data, C.elem_offset + tx * convert(LOCAL), False, dtype="float32"))
                T.evaluate(T.ptx_legacy.mma(
                    "m16n8k16", "row", "col", ab, ab, "fp32",
                    A.data, A.elem_offset + tx * convert(LOCAL),
                    B.data, B.elem_offset + tx * convert(LOCAL) + convert(LOCAL // 2),
                    C.data, C.elem_offset + tx * convert(LOCAL) + convert(LOCAL // 2), False,
                    dtype="float32"))

    return desc, impl


def _store():
    """Accumulator fragment → 16x16 fp32 tile in shared memory, one unrolled store per element.

    TVM's "simple" store loops serially over the 8 elements; LowerWarpMemory then cannot prove
    the lane of each load and emits a __shfl_sync per element, and nvcc puts the whole
    accumulator array in local memory. Its other store (mma_store) fails on merged shared memory.
    """

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, c: T.handle) -> None:
        C_warp = T.match_buffer(a, [WARP, LOCAL], "float32", scope="warp")
        C = T.match_buffer(c, [16, 16], "float32", scope="shared.dyn")
        with T.sblock("root"):
            T.reads(C_warp[0:WARP, 0:LOCAL])
            T.writes(C[0:16, 0:16])
            for i0, i1 in T.grid(16, 16):
                with T.sblock("C_warp"):
                    v0, v1 = T.axis.remap("SS", [i0, i1])
                    thread_id, local_id = T.meta_var(frag_layout(v0, v1))
                    T.reads(C_warp[thread_id, local_id])
                    T.writes(C[v0, v1])
                    C[v0, v1] = C_warp[thread_id, local_id]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        C_warp = T.match_buffer(a, [WARP, LOCAL], "float32", scope="warp", offset_factor=1)
        C = T.match_buffer(c, [16, 16], "float32", scope="shared.dyn", offset_factor=1,
                           strides=[s0, s1])
        with T.sblock("root"):
            T.reads(C_warp[0:WARP, 0:LOCAL])
            T.writes(C[0:16, 0:16])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                for local_id in T.serial(LOCAL):
                    C[8 * (local_id % 4 // 2) + tx // 4,
                      8 * (local_id // 4) + tx % 4 * 2 + local_id % 2] = C_warp[tx, local_id]

    return desc, impl


def _fill():
    """Zero the fp32 accumulator fragment."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle) -> None:
        C_warp = T.match_buffer(a, [WARP, LOCAL], "float32", scope="warp")
        with T.sblock("root"):
            T.reads()
            T.writes(C_warp[0:WARP, 0:LOCAL])
            for i0, i1 in T.grid(16, 16):
                with T.sblock("C_warp"):
                    i, j = T.axis.remap("SS", [i0, i1])
                    thread_id, local_id = T.meta_var(frag_layout(i, j))
                    T.reads()
                    T.writes(C_warp[thread_id, local_id])
                    C_warp[thread_id, local_id] = T.float32(0)

    @T.prim_func(s_tir=True)
    def impl(a: T.handle) -> None:
        C_warp = T.match_buffer(a, [WARP, LOCAL], "float32", scope="warp", offset_factor=1)
        with T.sblock("root"):
            T.reads()
            T.writes(C_warp[0:WARP, 0:LOCAL])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                T.evaluate(T.cuda.mma_fill_legacy(LOCAL, C_warp.data, C_warp.elem_offset,
                                                  dtype="float32"))

    return desc, impl


_registered = False


def register() -> None:
    """Register the intrinsics once, on first use (parsing them costs about a second)."""
    global _registered  # noqa: PLW0603
    if _registered:
        return
    for dt in DTYPES:
        TensorIntrin.register(ldmatrix_name(dt, "a"), *_ldmatrix(dt, _a_rows), override=True)
        TensorIntrin.register(ldmatrix_name(dt, "b"), *_ldmatrix(dt, _b_rows), override=True)
        TensorIntrin.register(mma_name(dt), *_mma(dt), override=True)
    TensorIntrin.register(STORE, *_store(), override=True)
    TensorIntrin.register(FILL, *_fill(), override=True)
    _registered = True
