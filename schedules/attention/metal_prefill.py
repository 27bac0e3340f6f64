"""Tiled online-softmax prefill in plain TIR (no PTX, no tensor cores): Kiln's prefill for Metal.

Why: on Metal, TVM's prefill kernels are the only option, and they read each KV head once per
query head. Here a threadgroup takes TQ query tokens x the G query heads of one KV head (R = TQ x G
rows, GQA: K/V read once per group), walks the keys in 32-token tiles staged in threadgroup memory,
and keeps the online softmax state per row. 128 threads = 4 per row: each computes 8 of a tile's 32
scores and owns 32 of the row's output dims; the 4 lanes of a row meet by SIMD shuffles. Metal
limits respected: 128 threads, <= 28 KB of threadgroup memory (head_dim <= 128), SIMD width 32,
vectors of <= 4 lanes. Blocks walk the ragged batch's (sequence, query tile) pairs, longest causal
tiles first. The same TIR compiles for CUDA, which is how bench/attention.py checks it on a GPU.

TVM's ragged and paged calling conventions (prefill_forms.py), as in prefill.py.
``lse`` is base 2; an empty KV range gives o = 0, lse = -5e4. RoPE before the cache, no sliding window.
"""

import math
from types import SimpleNamespace

from tvm.script import tirx as T

from .prefill import find_work
from .prefill_forms import prefill_func

PAGE_SIZE = 16
BN = 32  # keys per tile
NT = 128  # threads: 4 per row, 32 rows at most
TPR = 4  # threads per row
SPT = BN // TPR  # scores per thread per tile
NEG = -1.0e30


def _tiles_work(group: int, head_dim: int) -> bool:
    """A block holds at least one query token (group <= 32 rows); rows split in 4 x 4-dim vectors."""
    return group <= NT // TPR and head_dim % (4 * TPR) == 0 and head_dim <= 128


def metal_prefill_supported(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str) -> bool:
    """Shapes whose tiles fit Metal's 32 KB of threadgroup memory (TVM stores bfloat16 tiles as
    float32 on Metal, so bfloat16 fits only up to head_dim 64)."""
    group = num_qo_heads // num_kv_heads
    if dtype not in ("float16", "bfloat16") or not _tiles_work(group, head_dim):
        return False
    rows = NT // TPR // group * group
    elem = 2 if dtype == "float16" else 4
    return (rows + 2 * BN) * head_dim * elem + rows * BN * 4 <= 32 * 1024


def metal_prefill_kernel(kind: str, num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str):
    """``kind`` "ragged" or "paged"; global symbol ``kiln_metal_prefill_<kind>``. For Metal, check
    ``metal_prefill_supported`` first (this builder also serves CUDA, which has more shared memory)."""
    assert kind in ("ragged", "paged") and dtype in ("float16", "bfloat16")
    assert _tiles_work(num_qo_heads // num_kv_heads, head_dim), (num_kv_heads, num_qo_heads, head_dim)
    H_kv, H_qo, D = num_kv_heads, num_qo_heads, head_dim
    G = H_qo // H_kv
    TQ = NT // TPR // G  # query tokens per block
    R = TQ * G  # rows (query token, head) per block
    DPT = D // TPR  # output dims per thread
    K = SimpleNamespace(RAGGED=kind == "ragged", H_qo=H_qo, H_kv=H_kv, G=G, D=D, TQ=TQ, R=R, DPT=DPT, BN=BN, NT=NT, SPT=SPT, TPR=TPR,
                        NEG=NEG, PAGE_SIZE=PAGE_SIZE, dtype=dtype, scale_log2=math.log2(math.e),
                        KV_VECS=BN * D // (4 * NT), Q_VECS=(R * D + 4 * NT - 1) // (4 * NT))
    assert BN * D % (4 * NT) == 0

    # pylint: disable=invalid-name,too-many-locals,too-many-statements,unused-argument
    @T.macro(hygienic=False)
    def body():
        # info: seq, q tile, q start, q len, kv start | page begin, kv len, kv tiles
        K.find_work(q_indptr, B, K.TQ)
        seq: T.let[T.int32] = T.max(info[0], 0)
        info[2] = q_indptr[seq]
        info[3] = T.if_then_else(info[0] >= 0, q_indptr[seq + 1] - info[2], 0)
        K.kv_range(seq)
        # keys this tile needs: all, or (causal) up to the diagonal of its last query token
        last_q: T.let[T.int32] = T.min(info[1] * K.TQ + K.TQ - 1, info[3] - 1)
        info[6] = T.if_then_else(
            info[3] > 0,
            T.truncdiv(T.if_then_else(causal > 0, T.max(0, T.min(info[5], info[5] - info[3] + last_q + 1)), info[5]) + K.BN - 1, K.BN),
            0)
        r: T.let[T.int32] = tid // K.TPR
        c: T.let[T.int32] = tid % K.TPR
        lane: T.let[T.int32] = tid % 32
        qi: T.let[T.int32] = info[1] * K.TQ + r // K.G  # this row's query token in its sequence
        for i in T.unroll(K.Q_VECS):
            e: T.let[T.int32] = T.min((tid + i * K.NT) * 4, K.R * K.D - 4)  # a repeat of the last vector past the end
            for v in T.vectorized(4):
                q_s[e // K.D, e % K.D + v] = q[info[2] + T.min(info[1] * K.TQ + (e // K.D) // K.G, T.max(info[3] - 1, 0)),
                                               by * K.G + (e // K.D) % K.G, e % K.D + v]
        st[0] = T.float32(K.NEG)  # row max (log2 units)
        st[1] = T.float32(0)  # this thread's part of the row sum
        for d in T.unroll(K.DPT):
            o[d] = T.float32(0)
        for t in T.serial(info[6]):
            T.tvm_storage_sync("shared")
            for i in T.unroll(K.KV_VECS):
                e: T.let[T.int32] = (tid + i * K.NT) * 4
                pos: T.let[T.int32] = T.min(t * K.BN + e // K.D, info[5] - 1)
                # 8-byte global loads into registers, then scalar threadgroup stores (Metal's
                # vector-type rewrite of a threadgroup buffer rejects the scalar reads below)
                if K.RAGGED:
                    for x in T.vectorized(4):
                        kv4[0, x] = k[info[4] + pos, by, e % K.D + x]
                    for x in T.vectorized(4):
                        kv4[1, x] = v[info[4] + pos, by, e % K.D + x]
                else:
                    page: T.let[T.int64] = T.Cast("int64", page_values[info[4] + pos // K.PAGE_SIZE])
                    for v in T.vectorized(4):
                        kv4[0, v] = pages[page, 0, by, pos % K.PAGE_SIZE, e % K.D + v]
                    for v in T.vectorized(4):
                        kv4[1, v] = pages[page, 1, by, pos % K.PAGE_SIZE, e % K.D + v]
                for v in T.unroll(4):
                    k_s[e // K.D, e % K.D + v] = kv4[0, v]
                    v_s[e // K.D, e % K.D + v] = kv4[1, v]
            T.tvm_storage_sync("shared")
            # scores of keys c, c + 4, ... of the tile
            for j in T.unroll(K.SPT):
                s[j] = T.float32(0)
            for d4 in T.serial(K.D // 4):
                for j in T.unroll(K.SPT):
                    for v in T.unroll(4):
                        s[j] = s[j] + T.cast(q_s[r % K.R, d4 * 4 + v], "float32") * T.cast(k_s[c + j * K.TPR, d4 * 4 + v], "float32")
            mx[0] = st[0]
            for j in T.unroll(K.SPT):
                kj: T.let[T.int32] = t * K.BN + c + j * K.TPR
                s[j] = T.if_then_else(kj >= info[5] or (causal > 0 and kj > info[5] - info[3] + qi),
                                      T.float32(K.NEG), s[j] * sm_scale * T.float32(K.scale_log2))
                mx[0] = T.max(mx[0], s[j])
            mx[0] = T.max(mx[0], T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), mx[0], T.bitwise_xor(lane, 1), 32, 32))
            mx[0] = T.max(mx[0], T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), mx[0], T.bitwise_xor(lane, 2), 32, 32))
            mx[1] = T.exp2(st[0] - mx[0])
            st[0] = mx[0]
            st[1] = st[1] * mx[1]
            for j in T.unroll(K.SPT):
                s[j] = T.if_then_else(s[j] > T.float32(K.NEG), T.exp2(s[j] - mx[0]), T.float32(0))
                st[1] = st[1] + s[j]
                if r < K.R:  # rows past R (when G does not divide 32) only mirror row r % R
                    p_s[r, c + j * K.TPR] = s[j]
            for d in T.unroll(K.DPT):
                o[d] = o[d] * mx[1]
            T.tvm_storage_sync("shared")
            for j in T.serial(K.BN):
                for d in T.unroll(K.DPT):
                    o[d] = o[d] + p_s[r % K.R, j] * T.cast(v_s[j, c * K.DPT + d], "float32")
        # the row sum is spread over the row's 4 threads
        st[1] = st[1] + T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), st[1], T.bitwise_xor(lane, 1), 32, 32)
        st[1] = st[1] + T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), st[1], T.bitwise_xor(lane, 2), 32, 32)
        if r < K.R and qi < info[3]:
            for d in T.unroll(K.DPT):
                output[info[2] + qi, by * K.G + r % K.G, c * K.DPT + d] = T.cast(
                    T.if_then_else(st[1] > T.float32(0), o[d] / st[1], T.float32(0)), K.dtype)
            if c == 0:
                lse[info[2] + qi, by * K.G + r % K.G] = T.if_then_else(st[1] > T.float32(0), st[0] + T.log2(st[1]), T.float32(-5e4))

    def allocs():
        """Plain function (not a macro): the buffers stay visible in the kernel body."""
        return (
            T.sblock_alloc_buffer((R, D), dtype, scope="shared"),  # q_s
            T.sblock_alloc_buffer((BN, D), dtype, scope="shared"),  # k_s
            T.sblock_alloc_buffer((BN, D), dtype, scope="shared"),  # v_s
            T.sblock_alloc_buffer((R, BN), "float32", scope="shared"),  # p_s: probabilities of the tile
            T.sblock_alloc_buffer((SPT,), "float32", scope="local"),  # s: scores, then probabilities
            T.sblock_alloc_buffer((DPT,), "float32", scope="local"),  # o: output accumulator
            T.sblock_alloc_buffer((2,), "float32", scope="local"),  # st: row max, row-sum part
            T.sblock_alloc_buffer((2,), "float32", scope="local"),  # mx: scratch
            T.sblock_alloc_buffer((8,), "int32", scope="local"),  # info
            T.sblock_alloc_buffer((1,), "int32", scope="local"),  # scan
            T.sblock_alloc_buffer((2, 4), dtype, scope="local"),  # kv4: one K and one V vector in flight
        )

    @T.macro(hygienic=False)
    def kernel():
        for bx in T.thread_binding(T.truncdiv(qo_len + K.TQ - 1, K.TQ) + B, thread="blockIdx.x"):
            for by in T.thread_binding(K.H_kv, thread="blockIdx.y"):
                for tid in T.thread_binding(K.NT, thread="threadIdx.x"):
                    with T.sblock("attn"):
                        T.reads()
                        T.writes()
                        q_s, k_s, v_s, p_s, s, o, st, mx, info, scan, kv4 = K.allocs()
                        K.body()

    # non-hygienic macros see only the caller's variables
    K.body, K.allocs, K.kernel, K.find_work = body, allocs, kernel, find_work

    return prefill_func(kind, f"kiln_metal_prefill_{kind}", K)
