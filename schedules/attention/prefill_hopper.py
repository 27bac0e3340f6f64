"""FlashAttention-3 style prefill for Hopper (sm_90a): warpgroup MMA (wgmma), CUDA TIR.

Why: mma.sync tops out near half of Hopper's tensor-core rate; the FlashAttention-2 kernel
(prefill.py) reached 39-47% of torch SDPA. wgmma reads its B operand (and here A of S = Q K^T) straight
from 128-byte-swizzled shared memory, so no ldmatrix traffic goes through the registers, and it runs
asynchronously, so the softmax of tile t overlaps P V of tile t - 1 (FlashAttention-3's
intra-warpgroup pipelining). H100: 70 / 62 / 59% of torch SDPA at 1k / 4k / 16k (docs/attention.md).

Block = ``nwg`` warpgroups x 64 query rows of one sequence and one query head (grid: heads fastest, so
the heaviest causal tiles of every head come first and GQA neighbours share K/V tiles in L2); each
warpgroup computes S = Q K^T with wgmma m64n{BN}k16 (both operands from shared memory, K-major), the
online softmax on the accumulator registers (per warp the accumulator is the mma.sync C-fragment
layout, so prefill.py's ``softmax_tile`` serves both), then O += P V with wgmma m64n{D}k16, P from
registers (the C layout re-packed as bf16 pairs is wgmma's A-register layout) and V as an MN-major
operand (transpose bit). K/V tiles of BN tokens arrive by cp.async in ``stages`` stages, laid out as
[64-dim half][token][128 B] swizzled (16-byte chunk c of row r stored at c ^ (r % 8)), which is the
layout wgmma's 128-byte swizzle mode reads for K (K-major) and V (MN-major) alike. Same calling
conventions, work list (heaviest causal tiles first) and masking as prefill.py; head_dim 128 only.
"""

import math
from types import SimpleNamespace

from tvm.script import tirx as T

from .. import hopper_ptx as H
from .cuda_helpers import CP_ASYNC16, CP_COMMIT, EX2, SYNC, cp_async_wait, pack2
from .prefill import NEG, PAGE_SIZE, finalize, find_work, plan_tiles, rescale_o, run_work, softmax_tile
from .prefill_forms import prefill_func

NWG = 1  # warpgroups per block (64 query rows each; 2 share the K/V tiles but fit only 1 block per SM)
BN = 64  # kv tokens per tile
STAGES = 2  # shared-memory stages of K and of V
MIN_BLOCKS = 2  # __launch_bounds__ minimum blocks per SM (caps the registers at 65536 / (MIN_BLOCKS x threads))


def hopper_prefill_applies(target, head_dim: int) -> bool:
    """Whether the wgmma kernel serves this target (sm_90a: wgmma exists only there) and head size."""
    return target.kind.name == "cuda" and str(target.attrs.get("arch", "")) == "sm_90a" and head_dim == 128


def prefill_hopper_kernel(kind: str, num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str,
                          nwg: int = NWG, block_n: int = BN, min_blocks: int = MIN_BLOCKS, stages: int = STAGES):
    """``kind`` "ragged" or "paged"; global symbol ``kiln_prefill_<kind>``."""
    assert kind in ("ragged", "paged") and dtype in ("float16", "bfloat16") and head_dim == 128
    assert nwg in (1, 2) and block_n in (32, 64, 128)
    H_kv, H_qo, D = num_kv_heads, num_qo_heads, head_dim
    BN = block_n  # pylint: disable=redefined-outer-name
    NT = 128 * nwg
    MT = 1  # one 16-row m-tile per warp (the softmax macros are shared with prefill.py)
    G = H_qo // H_kv
    KSTEPS = D // 16
    NTN = BN // 8  # 8-column n-tiles of S per warp
    DTN = D // 8  # ... of O
    BM = 64 * nwg  # query rows per block
    Q_BYTES = BM * D * 2
    TILE_BYTES = BN * D * 2
    S = stages
    SMEM_BYTES = 1024 + Q_BYTES + S * 2 * TILE_BYTES  # + 1024: the base is aligned at run time
    CPT = BN * (D // 8) // NT  # 16-byte chunks per thread per K (and V) tile
    QCPT = BM * (D // 8) // NT  # ... per Q tile
    PACK, PACK_SRC = pack2(dtype)
    WG_S, WG_S_SRC = H.wgmma_ss(BN, dtype)
    WG_O, WG_O_SRC = H.wgmma_rs(D, dtype, trans_b=1)
    WAIT_S, WAIT_S_SRC = H.wgmma_wait(1, BN // 2)
    WAIT_O, WAIT_O_SRC = H.wgmma_wait(0, D // 2)
    scale_log2 = math.log2(math.e)
    K = SimpleNamespace(**{n: v for n, v in locals().items() if n[0].isupper() or n in ("dtype", "scale_log2")})
    K.NEG, K.PAGE_SIZE = NEG, PAGE_SIZE
    K.CP_ASYNC16, K.CP_COMMIT, K.SYNC, K.EX2, K.cp_async_wait = CP_ASYNC16, CP_COMMIT, SYNC, EX2, cp_async_wait
    K.H = H

    # pylint: disable=invalid-name,too-many-locals,too-many-statements,unused-argument
    if kind == "ragged":

        @T.macro(hygienic=False)
        def issue_tile(t, which):
            # K (which 0) or V (1) of KV tile t into stage t % S: [64-dim half][token][128 B], swizzled
            for i in T.unroll(K.CPT):
                r: T.let[T.int32] = (tid + i * K.NT) // 16
                c: T.let[T.int32] = (tid + i * K.NT) % 16
                pos: T.let[T.int32] = info[4] + T.min(t * K.BN + r, info[5] - 1)
                dst: T.let[T.int32] = (pad + K.Q_BYTES + ((t % K.S) * 2 + which) * K.TILE_BYTES + (c // 8) * K.BN * 128 + r * 128
                                       + T.bitwise_xor(c % 8, r % 8) * 16)
                if which == 0:
                    T.evaluate(T.cuda.func_call("kiln_cp_async16", smem.data, dst, T.address_of(k[pos, hq // K.G, c * 8]), source_code=K.CP_ASYNC16))
                else:
                    T.evaluate(T.cuda.func_call("kiln_cp_async16", smem.data, dst, T.address_of(v[pos, hq // K.G, c * 8]), source_code=K.CP_ASYNC16))
    else:

        @T.macro(hygienic=False)
        def issue_tile(t, which):
            for i in T.unroll(K.CPT):
                r: T.let[T.int32] = (tid + i * K.NT) // 16
                c: T.let[T.int32] = (tid + i * K.NT) % 16
                pos: T.let[T.int32] = T.min(t * K.BN + r, info[5] - 1)
                page: T.let[T.int64] = T.Cast("int64", page_values[info[4] + pos // K.PAGE_SIZE])
                dst: T.let[T.int32] = (pad + K.Q_BYTES + ((t % K.S) * 2 + which) * K.TILE_BYTES + (c // 8) * K.BN * 128 + r * 128
                                       + T.bitwise_xor(c % 8, r % 8) * 16)
                T.evaluate(T.cuda.func_call("kiln_cp_async16", smem.data, dst, T.address_of(pages[page, which, hq // K.G, pos % K.PAGE_SIZE, c * 8]),
                                            source_code=K.CP_ASYNC16))

    @T.macro(hygienic=False)
    def issue_q(q):
        for i in T.unroll(K.QCPT):
            r: T.let[T.int32] = (tid + i * K.NT) // 16
            c: T.let[T.int32] = (tid + i * K.NT) % 16
            T.evaluate(T.cuda.func_call(
                "kiln_cp_async16", smem.data, pad + (c // 8) * K.BM * 128 + r * 128 + T.bitwise_xor(c % 8, r % 8) * 16,
                T.address_of(q[info[2] + T.min(info[1] * K.BM + r, info[3] - 1), hq, c * 8]), source_code=K.CP_ASYNC16))

    @T.macro(hygienic=False)
    def call(name, src):
        T.evaluate(T.cuda.func_call(name, source_code=src))

    @T.macro(hygienic=False)
    def tiles_landed(pending):
        # this thread's copies done (but ``pending`` groups), made visible to the tensor cores, then everyone's
        K.call(*K.cp_async_wait(pending))
        K.call(*K.H.FENCE_PROXY_ASYNC)
        K.call("kiln_syncthreads", K.SYNC)

    @T.macro(hygienic=False)
    def s_gemm(t):
        # S = Q K^T over 8 k-steps of 16 dims; a k-step moves the descriptors 32 bytes along a 128-byte row
        kbase: T.let[T.int32] = pad + K.Q_BYTES + (t % K.S) * 2 * K.TILE_BYTES
        for kk in T.unroll(K.KSTEPS):
            T.evaluate(T.cuda.func_call(
                K.WG_S, T.tvm_access_ptr(T.type_annotation("float32"), sacc.data, 0, K.NTN * 4, 3),
                T.cuda.func_call(K.H.DESC_SW128[0], smem.data, pad + (kk // 4) * K.BM * 128 + wg * 8192 + (kk % 4) * 32, 16, 1024,
                                 source_code=K.H.DESC_SW128[1], return_type="uint64"),
                T.cuda.func_call(K.H.DESC_SW128[0], smem.data, kbase + (kk // 4) * K.BN * 128 + (kk % 4) * 32, 16, 1024,
                                 source_code=K.H.DESC_SW128[1], return_type="uint64"),
                T.min(kk, 1), source_code=K.WG_S_SRC))
        K.call(*K.H.WGMMA_COMMIT)

    @T.macro(hygienic=False)
    def pv_gemm(t):
        # O += P V with P from registers and V [token][dim] read MN-major: a k-step of 16 tokens is 2 KB on;
        # LBO = distance between the two 64-dim halves, SBO = between 8-token groups
        vbase: T.let[T.int32] = pad + K.Q_BYTES + ((t % K.S) * 2 + 1) * K.TILE_BYTES
        for kt in T.unroll(K.BN // 16):
            T.evaluate(T.cuda.func_call(
                K.WG_O, T.tvm_access_ptr(T.type_annotation("float32"), oacc.data, 0, K.DTN * 4, 3),
                T.tvm_access_ptr(T.type_annotation("uint32"), pf.data, kt * 4, 4, 1),
                T.cuda.func_call(K.H.DESC_SW128[0], smem.data, vbase + kt * 2048, K.BN * 128, 1024,
                                 source_code=K.H.DESC_SW128[1], return_type="uint64"),
                1, source_code=K.WG_O_SRC))
        K.call(*K.H.WGMMA_COMMIT)

    @T.macro(hygienic=False)
    def wait_s():
        # S of this tile done; the P V group committed after it may still run
        T.evaluate(T.cuda.func_call(K.WAIT_S, T.tvm_access_ptr(T.type_annotation("float32"), sacc.data, 0, K.NTN * 4, 3),
                                    source_code=K.WAIT_S_SRC))

    @T.macro(hygienic=False)
    def wait_o():
        T.evaluate(T.cuda.func_call(K.WAIT_O, T.tvm_access_ptr(T.type_annotation("float32"), oacc.data, 0, K.DTN * 4, 3),
                                    source_code=K.WAIT_O_SRC))

    @T.macro(hygienic=False)
    def pack_p():
        # P as wgmma A registers: the accumulator layout re-packed as 16-bit pairs
        for kt in T.unroll(K.BN // 16):
            for h in T.unroll(2):
                pf[kt, 2 * h] = T.cuda.func_call(K.PACK, sacc[2 * kt + h, 0], sacc[2 * kt + h, 1], source_code=K.PACK_SRC, return_type="uint32")
                pf[kt, 2 * h + 1] = T.cuda.func_call(K.PACK, sacc[2 * kt + h, 2], sacc[2 * kt + h, 3], source_code=K.PACK_SRC, return_type="uint32")

    @T.macro(hygienic=False)
    def init_state(q):
        for i in T.unroll(2):
            m_i[i] = T.float32(K.NEG)
            l_i[i] = T.float32(0)
        for i in T.unroll(K.DTN):
            for e in T.unroll(4):
                oacc[i, e] = T.float32(0)
        K.issue_q(q)

    @T.macro(hygienic=False)
    def main_loop(causal, sm_scale, q, output, lse):
        # FlashAttention-3's intra-warpgroup overlap: the softmax of tile t runs while P V of tile t - 1 is
        # on the tensor cores. Iteration t needs K_t and V_{t-1}, and loads {K_{t+S-1}, V_{t+S-2}} (one
        # cp.async group) into the stages that iterations t - 1 and earlier have released.
        K.init_state(q)
        if info[6] > 0:
            K.issue_tile(0, 0)
        K.call("kiln_cp_async_commit", K.CP_COMMIT)
        for j in T.unroll(1, K.S - 1):
            if j < info[6]:
                K.issue_tile(j, 0)
            if j - 1 < info[6]:
                K.issue_tile(j - 1, 1)
            K.call("kiln_cp_async_commit", K.CP_COMMIT)
        for t in T.serial(info[6]):
            K.tiles_landed(K.S - 2)  # also: every warpgroup is past iteration t - 1, so its stages are free
            if t + K.S - 1 < info[6]:
                K.issue_tile(t + K.S - 1, 0)
            if t + K.S - 2 < info[6]:
                K.issue_tile(t + K.S - 2, 1)
            K.call("kiln_cp_async_commit", K.CP_COMMIT)
            K.call(*K.H.WGMMA_FENCE)
            K.s_gemm(t)
            if t > 0:
                K.pv_gemm(t - 1)
            else:
                K.call(*K.H.WGMMA_COMMIT)  # an empty group keeps the count uniform
            K.wait_s()
            K.softmax_tile(t, causal, sm_scale)
            K.wait_o()
            K.rescale_o()
            K.pack_p()
        if info[6] > 0:
            K.tiles_landed(0)
            K.call(*K.H.WGMMA_FENCE)
            K.pv_gemm(info[6] - 1)
            K.wait_o()
        K.finalize(output, lse)

    def allocs():
        """Plain function (not a macro): buffers it creates stay visible in the kernel body."""
        return (
            T.sblock_alloc_buffer((SMEM_BYTES // 2,), "uint16", scope="shared.dyn"),  # smem: Q | 2 x (K, V)
            T.sblock_alloc_buffer((NTN, 4), "float32", scope="local"),  # sacc: S (then P) accumulators
            T.sblock_alloc_buffer((DTN, 4), "float32", scope="local"),  # oacc: O accumulators
            T.sblock_alloc_buffer((BN // 16, 4), "uint32", scope="local"),  # pf: P as A registers
            T.sblock_alloc_buffer((2,), "float32", scope="local"),  # m_i: row max (log2 units)
            T.sblock_alloc_buffer((2,), "float32", scope="local"),  # l_i: row sum (this lane's part)
            T.sblock_alloc_buffer((2,), "float32", scope="local"),  # alpha: O rescale factor per row
            T.sblock_alloc_buffer((2,), "float32", scope="local"),  # mx: scratch
            # info: seq, q tile, q start, q len, kv start | page begin, kv len, kv tiles, mask this tile
            T.sblock_alloc_buffer((8,), "int32", scope="local"),
            T.sblock_alloc_buffer((1,), "int32", scope="local"),  # scan: tiles before this sequence
        )

    # non-hygienic macros see only the caller's variables: constants and macros travel in K
    K.issue_tile, K.issue_q, K.call, K.tiles_landed, K.allocs = issue_tile, issue_q, call, tiles_landed, allocs
    K.s_gemm, K.pv_gemm, K.wait_s, K.wait_o, K.pack_p, K.init_state = s_gemm, pv_gemm, wait_s, wait_o, pack_p, init_state
    K.find_work, K.plan_tiles, K.softmax_tile, K.rescale_o, K.finalize = find_work, plan_tiles, softmax_tile, rescale_o, finalize
    K.main_loop, K.run_work, K.min_blocks = main_loop, run_work, min_blocks

    @T.macro(hygienic=False)
    def kernel():
        for bx in T.thread_binding(T.truncdiv(qo_len + K.BM - 1, K.BM) + B, thread="blockIdx.y"):
            for hq in T.thread_binding(K.H_qo, thread="blockIdx.x"):
                for tid in T.thread_binding(K.NT, thread="threadIdx.x"):
                    with T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", K.min_blocks):
                        with T.sblock("attn"):
                            T.reads()
                            T.writes()
                            smem, sacc, oacc, pf, m_i, l_i, alpha, mx, info, scan = K.allocs()
                            warp: T.let[T.int32] = tid // 32
                            lane: T.let[T.int32] = tid % 32
                            wg: T.let[T.int32] = tid // 128
                            pad: T.let[T.int32] = T.cuda.func_call(K.H.SMEM_ALIGN_PAD[0], smem.data, source_code=K.H.SMEM_ALIGN_PAD[1],
                                                                   return_type="int32")
                            K.run_work(causal, sm_scale)

    K.kernel = kernel
    return prefill_func(kind, f"kiln_prefill_{kind}", K)
