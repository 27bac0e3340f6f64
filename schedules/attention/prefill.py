"""FlashAttention-2 style prefill on tensor cores (mma.sync m16n8k16, fp32 accumulate), CUDA TIR.

Why: TVM's fallback prefill kernels use no tensor cores and spill (2.5-2.9 TFLOP/s on H200).
Block = 4 warps = 64 query rows of one sequence and one query head (16 rows per warp); blocks walk
the ragged batch's (sequence, query tile) pairs, longest causal tiles first. Q and K/V tiles of 64
tokens arrive by cp.async (K/V in 2 stages) in XOR-swizzled shared memory; ldmatrix feeds mma.sync;
the online softmax lives in the mma accumulator registers and P is re-packed in registers as the A
operand of P·V. Causal masking is applied only on tiles that cross the diagonal or the end.
GQA: a block reads the KV head of its query head (neighbouring blocks share it through L2).
H200, Llama-3.1-8B layer: 114 / 213 / 259 TFLOP/s at 1k / 4k / 16k tokens (docs/attention.md).
Used where the wgmma kernel (prefill_hopper.py, sm_90a, head_dim 128) does not apply.

Two forms with TVM's calling conventions (ragged: over the new tokens; paged: the new tokens attend
to tokens already in pages), declared in prefill_forms.py for all of Kiln's prefill kernels.
``lse`` is base 2. RoPE must be applied before the cache (rotary_mode 0); no sliding window.
"""

import math
from types import SimpleNamespace

from tvm.script import tirx as T

from .cuda_helpers import CP_ASYNC16, CP_COMMIT, EX2, LDSM_X4, LDSM_X4_T, SYNC, cp_async_wait, mma_16816, pack2
from .prefill_forms import prefill_func

PAGE_SIZE = 16
M_TILES = 1  # 16-row m-tiles per warp (2: each K/V fragment feeds two mma; measured no faster)
BN = 64  # kv tokens per tile
NT = 128  # threads (4 warps)
NEG = -1.0e30


# Macros shared with prefill_hopper.py (find_work also with metal_prefill.py). Non-hygienic macros see
# only the caller's variables: the kernel's constants, buffers and the other macros travel in its
# namespace ``K``; the buffers and ``K.kv_range`` come from prefill_forms.py's PrimFunc.


@T.macro(hygienic=False)
def find_work(q_indptr, B, rows):
    """Blocks enumerate (sequence, ``rows``-row query tile) pairs, the longest causal tiles first
    (also metal_prefill.py's)."""
    info[0] = -1
    info[1] = 0
    scan[0] = 0
    for b in T.serial(B):
        nt: T.let[T.int32] = T.truncdiv(q_indptr[b + 1] - q_indptr[b] + rows - 1, rows)
        if scan[0] <= bx and bx < scan[0] + nt:
            info[0] = b
            info[1] = nt - 1 - (bx - scan[0])  # last (longest causal) tiles first: shorter tail
        scan[0] = scan[0] + nt


@T.macro(hygienic=False)
def plan_tiles(causal):
    """info[6] = KV tiles this query tile needs (causal: up to its last row)."""
    last_row: T.let[T.int32] = T.min(info[1] * K.BM + K.BM - 1, info[3] - 1)
    info[6] = T.if_then_else(
        causal > 0,
        T.max(0, T.min(T.truncdiv(info[5] - info[3] + last_row + K.BN, K.BN), T.truncdiv(info[5] + K.BN - 1, K.BN))),
        T.truncdiv(info[5] + K.BN - 1, K.BN))


@T.macro(hygienic=False)
def run_work(causal, sm_scale):
    """Find the block's (sequence, query tile), its Q and KV ranges and KV tiles, run the kernel's main loop."""
    K.find_work(q_indptr, B, K.BM)
    if info[0] >= 0:
        info[2] = q_indptr[info[0]]
        info[3] = q_indptr[info[0] + 1] - info[2]
        K.kv_range(info[0])
        K.plan_tiles(causal)
        K.main_loop(causal, sm_scale, q, output, lse)


@T.macro(hygienic=False)
def softmax_tile(t, causal, sm_scale):
    """Scale and mask S (in the mma accumulator layout), online softmax; P overwrites S and ``alpha``
    gets the factor by which O must be rescaled (``rescale_o``, apart so the wgmma kernel can run it
    once the previous P V has landed)."""
    # scale; mask only on tiles past the sequence end or crossing the causal diagonal
    info[7] = T.if_then_else(
        t * K.BN + K.BN > info[5] or (causal > 0 and t * K.BN + K.BN - 1 > info[5] - info[3] + info[1] * K.BM), 1, 0)
    for mt in T.unroll(K.MT):
        for j in T.unroll(K.NTN):
            for e in T.unroll(4):
                sacc[mt * K.NTN + j, e] = T.if_then_else(
                    info[7] == 1 and (
                        t * K.BN + 8 * j + (lane % 4) * 2 + e % 2 >= info[5]
                        or (causal > 0 and t * K.BN + 8 * j + (lane % 4) * 2 + e % 2
                            > info[5] - info[3] + info[1] * K.BM + warp * 16 * K.MT + mt * 16 + lane // 4 + (e // 2) * 8)),
                    T.float32(K.NEG), sacc[mt * K.NTN + j, e] * sm_scale * T.float32(K.scale_log2))
    # online softmax; rows lane/4 (e = 0, 1) and lane/4 + 8 (e = 2, 3) of each m-tile, a row spans 4 lanes
    for mt in T.unroll(K.MT):
        for hr in T.unroll(2):
            mx[0] = m_i[mt * 2 + hr]
            for j in T.unroll(K.NTN):
                for e2 in T.unroll(2):
                    mx[0] = T.max(mx[0], sacc[mt * K.NTN + j, 2 * hr + e2])
            mx[0] = T.max(mx[0], T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), mx[0], 1, 32, 32))
            mx[0] = T.max(mx[0], T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), mx[0], 2, 32, 32))
            alpha[mt * 2 + hr] = T.exp2(m_i[mt * 2 + hr] - mx[0])
            m_i[mt * 2 + hr] = mx[0]
            l_i[mt * 2 + hr] = l_i[mt * 2 + hr] * alpha[mt * 2 + hr]  # per-lane partial row sum; lanes are summed at the end
            for j in T.unroll(K.NTN):
                for e2 in T.unroll(2):
                    sacc[mt * K.NTN + j, 2 * hr + e2] = T.cuda.func_call(
                        "kiln_ex2", sacc[mt * K.NTN + j, 2 * hr + e2] - mx[0], source_code=K.EX2, return_type="float32")
                    l_i[mt * 2 + hr] = l_i[mt * 2 + hr] + sacc[mt * K.NTN + j, 2 * hr + e2]


@T.macro(hygienic=False)
def rescale_o():
    """O *= alpha per row (after the online-softmax step of ``softmax_tile``)."""
    for mt in T.unroll(K.MT):
        for hr in T.unroll(2):
            for dn in T.unroll(K.DTN):
                for e2 in T.unroll(2):
                    oacc[mt * K.DTN + dn, 2 * hr + e2] = oacc[mt * K.DTN + dn, 2 * hr + e2] * alpha[mt * 2 + hr]


@T.macro(hygienic=False)
def finalize(output, lse):
    """Sum the row sums over the 4 lanes of a row, normalize O, store O and the base-2 lse."""
    for mt in T.unroll(K.MT):
        for hr in T.unroll(2):
            l_i[mt * 2 + hr] = l_i[mt * 2 + hr] + T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), l_i[mt * 2 + hr], 1, 32, 32)
            l_i[mt * 2 + hr] = l_i[mt * 2 + hr] + T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), l_i[mt * 2 + hr], 2, 32, 32)
            row: T.let[T.int32] = info[1] * K.BM + warp * 16 * K.MT + mt * 16 + lane // 4 + 8 * hr
            if row < info[3]:
                mx[1] = T.if_then_else(l_i[mt * 2 + hr] > T.float32(0), T.float32(1) / l_i[mt * 2 + hr], T.float32(0))
                for dn in T.unroll(K.DTN):
                    for e2 in T.unroll(2):
                        output[info[2] + row, hq, dn * 8 + (lane % 4) * 2 + e2] = T.cast(oacc[mt * K.DTN + dn, 2 * hr + e2] * mx[1], K.dtype)
                if lane % 4 == 0:
                    lse[info[2] + row, hq] = T.if_then_else(l_i[mt * 2 + hr] > T.float32(0), m_i[mt * 2 + hr] + T.log2(l_i[mt * 2 + hr]),
                                                            T.float32(-5e4))


def prefill_kernel(kind: str, num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str,
                   m_tiles: int = M_TILES, block_n: int = BN):
    """``kind`` "ragged" or "paged"; global symbol ``kiln_prefill_<kind>``."""
    assert kind in ("ragged", "paged") and dtype in ("float16", "bfloat16") and head_dim in (64, 128)
    H_kv, H_qo, D = num_kv_heads, num_qo_heads, head_dim
    MT, BN = m_tiles, block_n  # pylint: disable=redefined-outer-name
    G = H_qo // H_kv
    CH = D // 8  # 16-byte chunks per row
    KSTEPS = D // 16
    NTN = BN // 8  # S n-tiles per warp
    DTN = D // 8  # O n-tiles per warp
    ROWB = D * 2
    BM = 16 * MT * NT // 32  # query rows per block
    Q_BYTES = BM * ROWB
    TILE_BYTES = BN * ROWB
    SMEM_BYTES = Q_BYTES + 2 * 2 * TILE_BYTES
    CPT = BN * CH // NT  # 16-byte chunks per thread per K (and V) tile
    QCPT = BM * CH // NT  # ... per Q tile
    MMA, MMA_SRC = mma_16816(dtype)
    PACK, PACK_SRC = pack2(dtype)
    WAIT1, WAIT1_SRC = cp_async_wait(1)
    scale_log2 = math.log2(math.e)
    K = SimpleNamespace(**{n: v for n, v in locals().items() if n[0].isupper() or n in ("dtype", "scale_log2")})
    K.NEG, K.PAGE_SIZE, K.NT = NEG, PAGE_SIZE, NT
    K.CP_ASYNC16, K.CP_COMMIT, K.LDSM_X4, K.LDSM_X4_T, K.SYNC, K.EX2 = CP_ASYNC16, CP_COMMIT, LDSM_X4, LDSM_X4_T, SYNC, EX2

    # pylint: disable=invalid-name,too-many-locals,too-many-statements,unused-argument
    if kind == "ragged":

        @T.macro(hygienic=False)
        def issue_kv(t):
            for i in T.unroll(K.CPT):
                r: T.let[T.int32] = (tid + i * K.NT) // K.CH
                c: T.let[T.int32] = (tid + i * K.NT) % K.CH
                pos: T.let[T.int32] = info[4] + T.min(t * K.BN + r, info[5] - 1)
                dst: T.let[T.int32] = K.Q_BYTES + (t % 2) * 2 * K.TILE_BYTES + r * K.ROWB + T.bitwise_xor(c, T.bitwise_and(r, 7)) * 16
                T.evaluate(T.cuda.func_call("kiln_cp_async16", smem.data, dst, T.address_of(k[pos, hq // K.G, c * 8]), source_code=K.CP_ASYNC16))
                T.evaluate(T.cuda.func_call("kiln_cp_async16", smem.data, dst + K.TILE_BYTES, T.address_of(v[pos, hq // K.G, c * 8]), source_code=K.CP_ASYNC16))
    else:

        @T.macro(hygienic=False)
        def issue_kv(t):
            for i in T.unroll(K.CPT):
                r: T.let[T.int32] = (tid + i * K.NT) // K.CH
                c: T.let[T.int32] = (tid + i * K.NT) % K.CH
                pos: T.let[T.int32] = T.min(t * K.BN + r, info[5] - 1)
                page: T.let[T.int64] = T.Cast("int64", page_values[info[4] + pos // K.PAGE_SIZE])
                dst: T.let[T.int32] = K.Q_BYTES + (t % 2) * 2 * K.TILE_BYTES + r * K.ROWB + T.bitwise_xor(c, T.bitwise_and(r, 7)) * 16
                T.evaluate(T.cuda.func_call("kiln_cp_async16", smem.data, dst, T.address_of(pages[page, 0, hq // K.G, pos % K.PAGE_SIZE, c * 8]), source_code=K.CP_ASYNC16))
                T.evaluate(T.cuda.func_call("kiln_cp_async16", smem.data, dst + K.TILE_BYTES, T.address_of(pages[page, 1, hq // K.G, pos % K.PAGE_SIZE, c * 8]), source_code=K.CP_ASYNC16))

    @T.macro(hygienic=False)
    def issue_q(q):
        for i in T.unroll(K.QCPT):
            r: T.let[T.int32] = (tid + i * K.NT) // K.CH
            c: T.let[T.int32] = (tid + i * K.NT) % K.CH
            T.evaluate(T.cuda.func_call(
                "kiln_cp_async16", smem.data, r * K.ROWB + T.bitwise_xor(c, T.bitwise_and(r, 7)) * 16,
                T.address_of(q[info[2] + T.min(info[1] * K.BM + r, info[3] - 1), hq, c * 8]), source_code=K.CP_ASYNC16))

    @T.macro(hygienic=False)
    def compute_tile(t, causal, sm_scale):
        kbase: T.let[T.int32] = K.Q_BYTES + (t % 2) * 2 * K.TILE_BYTES
        vbase: T.let[T.int32] = kbase + K.TILE_BYTES
        for i in T.unroll(K.MT * K.NTN):
            for e in T.unroll(4):
                sacc[i, e] = T.float32(0)
        # S = Q K^T; each K fragment (ldmatrix) feeds the MT m-tiles of the warp
        for kk2 in T.unroll(K.KSTEPS // 2):
            for mt in T.unroll(K.MT):
                for h in T.unroll(2):
                    qr: T.let[T.int32] = warp * 16 * K.MT + mt * 16 + lane % 8 + 8 * ((lane // 8) % 2)
                    qc: T.let[T.int32] = 2 * (2 * kk2 + h) + lane // 16
                    T.evaluate(T.cuda.func_call("kiln_ldsm_x4", smem.data, qr * K.ROWB + T.bitwise_xor(qc, T.bitwise_and(qr, 7)) * 16,
                                                T.tvm_access_ptr(T.type_annotation("uint32"), qf.data, (mt * 2 + h) * 4, 4, 2), source_code=K.LDSM_X4))
            for j in T.unroll(K.NTN):
                kr: T.let[T.int32] = 8 * j + lane % 8
                kc: T.let[T.int32] = 4 * kk2 + lane // 8
                T.evaluate(T.cuda.func_call("kiln_ldsm_x4", smem.data, kbase + kr * K.ROWB + T.bitwise_xor(kc, T.bitwise_and(kr, 7)) * 16,
                                            T.tvm_access_ptr(T.type_annotation("uint32"), kb.data, 0, 4, 2), source_code=K.LDSM_X4))
                for mt in T.unroll(K.MT):
                    for h in T.unroll(2):
                        T.evaluate(T.cuda.func_call(K.MMA, T.tvm_access_ptr(T.type_annotation("float32"), sacc.data, (mt * K.NTN + j) * 4, 4, 3),
                                                    T.tvm_access_ptr(T.type_annotation("uint32"), qf.data, (mt * 2 + h) * 4, 4, 1), T.tvm_access_ptr(T.type_annotation("uint32"), kb.data, h * 2, 2, 1),
                                                    source_code=K.MMA_SRC))
        K.softmax_tile(t, causal, sm_scale)
        K.rescale_o()
        # O += P V, P re-packed from the S accumulators as A fragments; each V fragment feeds MT m-tiles
        for kt in T.unroll(K.BN // 16):
            for mt in T.unroll(K.MT):
                for h in T.unroll(2):
                    pf[mt, 2 * h] = T.cuda.func_call(K.PACK, sacc[mt * K.NTN + 2 * kt + h, 0], sacc[mt * K.NTN + 2 * kt + h, 1],
                                                     source_code=K.PACK_SRC, return_type="uint32")
                    pf[mt, 2 * h + 1] = T.cuda.func_call(K.PACK, sacc[mt * K.NTN + 2 * kt + h, 2], sacc[mt * K.NTN + 2 * kt + h, 3],
                                                         source_code=K.PACK_SRC, return_type="uint32")
            for dp in T.unroll(K.DTN // 2):
                vr: T.let[T.int32] = 16 * kt + lane % 8 + 8 * ((lane // 8) % 2)
                vc: T.let[T.int32] = 2 * dp + lane // 16
                T.evaluate(T.cuda.func_call("kiln_ldsm_x4_t", smem.data, vbase + vr * K.ROWB + T.bitwise_xor(vc, T.bitwise_and(vr, 7)) * 16,
                                            T.tvm_access_ptr(T.type_annotation("uint32"), vb.data, 0, 4, 2), source_code=K.LDSM_X4_T))
                for mt in T.unroll(K.MT):
                    for h in T.unroll(2):
                        T.evaluate(T.cuda.func_call(K.MMA, T.tvm_access_ptr(T.type_annotation("float32"), oacc.data, (mt * K.DTN + 2 * dp + h) * 4, 4, 3),
                                                    T.tvm_access_ptr(T.type_annotation("uint32"), pf.data, mt * 4, 4, 1), T.tvm_access_ptr(T.type_annotation("uint32"), vb.data, h * 2, 2, 1),
                                                    source_code=K.MMA_SRC))

    @T.macro(hygienic=False)
    def main_loop(causal, sm_scale, q, output, lse):
        for i in T.unroll(K.MT * 2):
            m_i[i] = T.float32(K.NEG)
            l_i[i] = T.float32(0)
        for i in T.unroll(K.MT * K.DTN):
            for e in T.unroll(4):
                oacc[i, e] = T.float32(0)
        K.issue_q(q)
        if info[6] > 0:
            K.issue_kv(0)
        T.evaluate(T.cuda.func_call("kiln_cp_async_commit", source_code=K.CP_COMMIT))
        for t in T.serial(info[6]):
            if t + 1 < info[6]:
                K.issue_kv(t + 1)
            T.evaluate(T.cuda.func_call("kiln_cp_async_commit", source_code=K.CP_COMMIT))
            T.evaluate(T.cuda.func_call(K.WAIT1, source_code=K.WAIT1_SRC))
            T.evaluate(T.cuda.func_call("kiln_syncthreads", source_code=K.SYNC))
            K.compute_tile(t, causal, sm_scale)
            T.evaluate(T.cuda.func_call("kiln_syncthreads", source_code=K.SYNC))
        K.finalize(output, lse)

    def allocs():
        """Plain function (not a macro): buffers it creates stay visible in the kernel body.

        Fragments go to the PTX helpers as tvm_access_ptr with an extent: TVM compacts a local
        buffer to the elements it sees used, and an element address would shrink it."""
        return (
            T.sblock_alloc_buffer((SMEM_BYTES // 2,), "uint16", scope="shared.dyn"),  # smem: Q | 2 x (K, V)
            T.sblock_alloc_buffer((MT * 2, 4), "uint32", scope="local"),  # qf: Q A-fragments, 2 k-steps
            T.sblock_alloc_buffer((MT * NTN, 4), "float32", scope="local"),  # sacc: S (then P) accumulators
            T.sblock_alloc_buffer((MT * DTN, 4), "float32", scope="local"),  # oacc: O accumulators
            T.sblock_alloc_buffer((4,), "uint32", scope="local"),  # kb: K B-fragments (2 k-steps)
            T.sblock_alloc_buffer((4,), "uint32", scope="local"),  # vb: V B-fragments (2 n-tiles)
            T.sblock_alloc_buffer((MT, 4), "uint32", scope="local"),  # pf: P A-fragments
            T.sblock_alloc_buffer((MT * 2,), "float32", scope="local"),  # m_i: row max (log2 units)
            T.sblock_alloc_buffer((MT * 2,), "float32", scope="local"),  # l_i: row sum (this lane's part)
            T.sblock_alloc_buffer((MT * 2,), "float32", scope="local"),  # alpha: O rescale factor per row
            T.sblock_alloc_buffer((2,), "float32", scope="local"),  # mx: scratch
            # info: seq, q tile, q start, q len, kv start | page begin, kv len, kv tiles, mask this tile
            T.sblock_alloc_buffer((8,), "int32", scope="local"),
            T.sblock_alloc_buffer((1,), "int32", scope="local"),  # scan: tiles before this sequence
        )

    # non-hygienic macros see only the caller's variables: constants and macros travel in K
    K.issue_kv, K.issue_q, K.compute_tile = issue_kv, issue_q, compute_tile
    K.find_work, K.plan_tiles, K.softmax_tile, K.rescale_o, K.finalize = find_work, plan_tiles, softmax_tile, rescale_o, finalize
    K.run_work = run_work
    K.main_loop, K.allocs = main_loop, allocs

    @T.macro(hygienic=False)
    def kernel():
        for bx in T.thread_binding(T.truncdiv(qo_len + K.BM - 1, K.BM) + B, thread="blockIdx.x"):
            for hq in T.thread_binding(K.H_qo, thread="blockIdx.y"):
                for tid in T.thread_binding(K.NT, thread="threadIdx.x"):
                    with T.sblock("attn"):
                        T.reads()
                        T.writes()
                        smem, qf, sacc, oacc, kb, vb, pf, m_i, l_i, alpha, mx, info, scan = K.allocs()
                        warp: T.let[T.int32] = tid // 32
                        lane: T.let[T.int32] = tid % 32
                        K.run_work(causal, sm_scale)

    K.kernel = kernel
    return prefill_func(kind, f"kiln_prefill_{kind}", K)
