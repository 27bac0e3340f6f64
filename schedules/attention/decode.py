"""Split-KV (flash-decoding) paged attention for one query token per sequence, TIR for CUDA and Metal.

Why: TVM's fallback decode kernel runs one thread block per (sequence, KV head), so at batch 1 it
occupies 8 of 132 SMs and reaches ~1% of HBM bandwidth. Here each sequence's pages are split over
``num_splits`` blocks (chosen from the batch size so that batch x KV heads x splits fills one wave of
resident blocks), each block writes a partial softmax state (o, lse), and on CUDA the last of a
(sequence, KV head)'s split blocks to finish merges them (an atomic arrival counter, as split-K "fixup"
GEMMs do): one kernel a call. Each block reads its KV head once for the whole GQA group, on CUDA by
16-byte cp.async copies in a 4-stage pipeline (docs/attention.md has the measurements). The Metal
form is the same algorithm in plain TIR (loads straight to registers, SIMD shuffles by lane) with the
merge as a second kernel in the same PrimFunc.

Calling convention = TVM's ``TIRPagedDecodeFunc`` (runtime/vm/attn_backend.h):
``(q, pages, page_indptr, page_values, length_info, k_rope_pos_offset, q_rope_position,
output, lse, rotary_mode, rope_scale, rope_theta, sm_scale)``; ``lse`` is base-2 like TVM's.
Only RopeMode NORMAL/NONE (RoPE applied before the cache) and no sliding window.
"""

import math

from tvm.script import tirx as T

from .cuda_helpers import (CP_ASYNC16, CP_COMMIT, LDCG, LDCG4, SPLIT_ARRIVAL_SLOTS, SPLIT_ARRIVE, SPLIT_ARRIVE_ACQ_REL,
                           THREADFENCE, cp_async_wait)

PAGE_SIZE = 16
TOKENS_PER_ROW = 4  # tokens one row of lanes handles per iteration (loads in flight per thread)
SMS, SMEM_PER_SM = 132, 228 * 1024  # H100 / H200
MAX_BLOCKS_PER_SM = 3  # registers: 159 x 128 threads
METAL_RESIDENT_BLOCKS = 38 * 4  # Metal form: an M2 Max's 38 GPU cores x 4 threadgroups (not measured)
MIN_SPLIT_PAGES = 4  # below 64 tokens per block the merge costs more than it saves
# cp.async pipeline depth: 3 tiles (48 KB) in flight per block while one is computed, 2 blocks per SM.
# H100, b=1/8k: 41% of copy bandwidth per call (3 stages, 3 blocks per SM: 37%; 5 or 6 stages: 36-37%);
# b=64: 97-100% (3 stages: 74-76%, 512 blocks in 1.3 waves of 396; here 1.9 waves of 264)
STAGES = 4
MERGE_SLICES = 16  # thread rows of the Metal form's split-merge kernel (splits merged in parallel)
MERGE_CHUNK = 16  # CUDA: splits whose states a merging thread loads at once (5 registers each)
NEG = -1.0e30  # finite "minus infinity": exp2(NEG - NEG) must not be NaN


def decode_supported(num_kv_heads: int, num_qo_heads: int, head_dim: int, form: str = "cuda") -> bool:
    """Head shapes the kernel covers: 4-32 lanes of 8 dims per token, the block's row-merge buffer
    (group x 128 threads x 8 dims x 4 bytes) within shared memory (48 KB; Metal 32 KB, less the rest)."""
    group = num_qo_heads // num_kv_heads
    return head_dim % 8 == 0 and head_dim // 8 in (4, 8, 16, 32) and group * 4096 <= (48 if form == "cuda" else 30) * 1024


def decode_kernel(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str, stages: int = STAGES,
                  form: str = "cuda", merge_chunk: int = MERGE_CHUNK, min_split_pages: int = MIN_SPLIT_PAGES,
                  arrive: str = "acq_rel", pdl_prewait: bool = False):
    """Build the split-KV decode PrimFunc (global symbol ``kiln_decode_paged_kv``).

    ``form`` "cuda": K/V tiles by cp.async in a ``stages``-deep pipeline; "metal": plain TIR (loads
    straight to registers, shuffles by lane), which also compiles for CUDA to be checked on a GPU.
    ``min_split_pages``: the fewest pages a split block takes (fewer splits at short contexts; a block
    walks its pages in tiles of 2, so 2 makes every block one tile long). ``arrive`` (CUDA): how a split
    block counts itself in for the merge: "acq_rel" (the default: one acquire-release atomic after a block
    barrier, cuda_helpers.SPLIT_ARRIVE_ACQ_REL) or "sc" (``__threadfence`` around a relaxed atomic, 0.4-1.3 us
    slower a call on an H100 at batch 1-16, bench/RESULTS.md "Decode attention at short contexts, measured").
    ``pdl_prewait`` (CUDA, sm_90+): the kernel places its own programmatic-dependent-launch trigger (first) and
    ``griddepcontrol.wait`` (schedules/pdl.py then adds only the launch tag), the wait after the page-table
    reads, so under PDL the two dependent round trips to page_indptr / page_values overlap the previous
    kernel's tail. Sound because the page tables (and length_info) are the host's copies for this step,
    which no kernel writes; q and the pages (the new token's K/V) are read after the wait. The compiler turns
    it on wherever it builds with PDL (schedules/attention/choice.py).
    """
    assert dtype in ("float16", "bfloat16"), dtype
    assert form in ("cuda", "metal"), form
    assert arrive in ("sc", "acq_rel"), arrive
    assert min_split_pages >= 1, min_split_pages
    assert not (pdl_prewait and form != "cuda"), "pdl_prewait is a CUDA (sm_90+) form"
    ARRIVE_NAME, ARRIVE_SRC = (("kiln_split_arrive", SPLIT_ARRIVE) if arrive == "sc" else
                               ("kiln_split_arrive_ar", SPLIT_ARRIVE_ACQ_REL))
    CUDA = form == "cuda"
    H_kv, H_qo, D = num_kv_heads, num_qo_heads, head_dim
    G = H_qo // H_kv
    assert decode_supported(H_kv, H_qo, D, form), (H_kv, H_qo, D, form)
    VEC = 8  # 8 x 16-bit = one 16-byte load per lane
    LANES = D // VEC
    ROWS = 128 // LANES
    U = TOKENS_PER_ROW
    # blocks that fit on the GPU at once (shared memory: pipeline + row-merge buffer + 1 KB reserved)
    block_smem = stages * 2 * ROWS * U * D * 2 + ROWS * G * D * 4 + ROWS * G * 8 + 1024
    resident_blocks = SMS * min(MAX_BLOCKS_PER_SM, SMEM_PER_SM // block_smem) if CUDA else METAL_RESIDENT_BLOCKS
    ROWS_PER_PAGE = PAGE_SIZE // U
    PAGES_PER_TILE = ROWS // ROWS_PER_PAGE
    NTHREADS = ROWS * LANES
    EPT = (G * D + NTHREADS - 1) // NTHREADS  # outputs each thread finalizes
    MVEC = 4  # dims per thread in the Metal form's split-merge kernel
    MCOLS = (G * D // 4 + NTHREADS - 1) // NTHREADS  # CUDA merge: float4 columns per thread
    # a sequence has more than one split only while B x H_kv <= resident_blocks / 2: its arrival slot exists
    assert resident_blocks // 2 <= SPLIT_ARRIVAL_SLOTS, resident_blocks
    scale_log2 = math.log2(math.e)
    WAIT_NAME, WAIT_SRC = cp_async_wait(stages - 1)  # tile `it` landed, later ones may fly

    # pylint: disable=invalid-name,too-many-locals,too-many-statements
    @T.prim_func(s_tir=True)
    def kiln_decode_paged_kv(
        Q_handle: T.handle,
        pages_handle: T.handle,
        page_indptr_handle: T.handle,
        page_values_handle: T.handle,
        length_info_handle: T.handle,
        k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle,
        output_handle: T.handle,
        lse_handle: T.handle,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": "kiln_decode_paged_kv"})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        length_info_elem_offset = T.int32()
        k_rope_elem_offset = T.int32()
        q_rope_elem_offset = T.int32()

        Q = T.match_buffer(Q_handle, (B, H_qo, D), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, H_kv, PAGE_SIZE, D), dtype)
        page_indptr = T.match_buffer(page_indptr_handle, (B + 1,), "int32", elem_offset=page_indptr_elem_offset)
        page_values = T.match_buffer(page_values_handle, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        length_info = T.match_buffer(length_info_handle, (B,), "int32", elem_offset=length_info_elem_offset)
        k_rope_pos_offset = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_rope_elem_offset)
        q_rope_position = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=q_rope_elem_offset)
        output = T.match_buffer(output_handle, (B, H_qo, D), dtype)
        lse = T.match_buffer(lse_handle, (B, H_qo), "float32")

        # splits per sequence: as many as fit in one wave of resident blocks (a second, partial wave
        # would cost a whole block time)
        NS = T.meta_var(T.max(1, T.floordiv(resident_blocks, B * H_kv)))
        O_part = T.alloc_buffer((NS, B, H_qo, D), "float32")
        L_part = T.alloc_buffer((NS, B, H_qo), "float32")

        # ---- kernel 1: one block per (split, kv head, sequence) ----
        for bz in T.thread_binding(B, thread="blockIdx.z"):
            for by in T.thread_binding(H_kv, thread="blockIdx.y"):
                for bx in T.thread_binding(NS, thread="blockIdx.x"):
                    for ty in T.thread_binding(ROWS, thread="threadIdx.y"):
                        for tx in T.thread_binding(LANES, thread="threadIdx.x"):
                            with T.sblock("split"):
                                T.reads()
                                T.writes()
                                q_loc = T.sblock_alloc_buffer((G, VEC), "float32", scope="local")
                                o_loc = T.sblock_alloc_buffer((G, VEC), "float32", scope="local")
                                m_loc = T.sblock_alloc_buffer((G,), "float32", scope="local")
                                d_loc = T.sblock_alloc_buffer((G,), "float32", scope="local")
                                k_loc = T.sblock_alloc_buffer((U, VEC), dtype, scope="local")
                                v_loc = T.sblock_alloc_buffer((U, VEC), dtype, scope="local")
                                vf = T.sblock_alloc_buffer((U, VEC), "float32", scope="local")
                                s_loc = T.sblock_alloc_buffer((U, G), "float32", scope="local")
                                p_loc = T.sblock_alloc_buffer((U,), "float32", scope="local")
                                valid = T.sblock_alloc_buffer((U,), "bool", scope="local")
                                mx = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                alpha = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                page_no = T.sblock_alloc_buffer((1,), "int32", scope="local")
                                fin = T.sblock_alloc_buffer((4,), "float32", scope="local")
                                # each thread copies and later reads only its own 16-byte chunks, so
                                # the pipeline needs cp.async.wait_group but no block barrier
                                if CUDA:
                                    kv_sm = T.sblock_alloc_buffer((stages, 2, ROWS * U, D), dtype, scope="shared.dyn")
                                    pnos = T.sblock_alloc_buffer((stages - 1,), "int32", scope="local")
                                sm_o = T.sblock_alloc_buffer((ROWS, G, D), "float32", scope="shared")
                                sm_md = T.sblock_alloc_buffer((ROWS, G, 2), "float32", scope="shared")
                                if CUDA:  # the in-kernel split merge's
                                    last = T.sblock_alloc_buffer((1,), "int32", scope="shared")
                                    is_last = T.sblock_alloc_buffer((1,), "int32", scope="local")
                                    mlse = T.sblock_alloc_buffer((merge_chunk,), "float32", scope="local")
                                    mo = T.sblock_alloc_buffer((merge_chunk * 4,), "float32", scope="local")
                                    macc = T.sblock_alloc_buffer((4,), "float32", scope="local")
                                    mst = T.sblock_alloc_buffer((4,), "float32", scope="local")
                                # per-block scalars in registers (T.let would be re-expanded at every use)
                                info = T.sblock_alloc_buffer((6,), "int32", scope="local")
                                if pdl_prewait:
                                    T.evaluate(T.ptx.griddepcontrol.launch_dependents())
                                info[0] = page_indptr[bz]  # first page slot of the sequence
                                info[1] = page_indptr[bz + 1] - info[0]  # pages of the sequence
                                info[2] = T.max(T.truncdiv(info[1] + NS - 1, NS), min_split_pages)  # pages per split
                                info[3] = T.max(1, T.truncdiv(info[1] + info[2] - 1, info[2]))  # splits used
                                info[4] = T.min(info[1], bx * info[2] + info[2])  # this split's page end
                                info[5] = T.min(T.if_then_else(info[1] > 0, (info[1] - 1) * PAGE_SIZE + length_info[bz], 0), info[4] * PAGE_SIZE)  # token end
                                pg_begin: T.let[T.int32] = info[0]
                                n_used: T.let[T.int32] = info[3]
                                pg_lo: T.let[T.int32] = bx * info[2]
                                pg_hi: T.let[T.int32] = info[4]
                                tok_hi: T.let[T.int32] = info[5]
                                n_it: T.let[T.int32] = T.truncdiv(pg_hi - pg_lo + PAGES_PER_TILE - 1, PAGES_PER_TILE)
                                row_pg: T.let[T.int32] = ty // ROWS_PER_PAGE
                                row_off: T.let[T.int32] = (ty % ROWS_PER_PAGE) * U
                                lane: T.let[T.int32] = (ty * LANES + tx) % 32  # lane in the warp / SIMD group
                                if bx < n_used:
                                    if CUDA:
                                        # the prologue's page numbers first (independent loads), then its copies
                                        for st in T.unroll(stages - 1):
                                            pnos[st] = T.if_then_else(pg_lo + st * PAGES_PER_TILE + row_pg < pg_hi,
                                                                      page_values[pg_begin + pg_lo + st * PAGES_PER_TILE + row_pg], 0)
                                    if pdl_prewait:  # the previous kernel's writes (q, the new K/V) from here on
                                        T.evaluate(T.ptx.griddepcontrol.wait())
                                    for g in T.unroll(G):
                                        m_loc[g] = T.float32(NEG)
                                        d_loc[g] = T.float32(0)
                                        for v in T.unroll(VEC):
                                            o_loc[g, v] = T.float32(0)
                                            q_loc[g, v] = T.cast(Q[bz, by * G + g, tx * VEC + v], "float32") * sm_scale * T.float32(scale_log2)
                                    if CUDA:
                                        for st in T.unroll(stages - 1):
                                            if pg_lo + st * PAGES_PER_TILE + row_pg < pg_hi:
                                                for u in T.unroll(U):
                                                    for kv in T.unroll(2):
                                                        T.evaluate(T.cuda.func_call(
                                                            "kiln_cp_async16",
                                                            kv_sm.data, ((((st * 2 + kv) * ROWS * U + ty * U + u) * D) + tx * VEC) * 2,
                                                            T.address_of(pages[T.Cast("int64", pnos[st]), kv, by, row_off + u, tx * VEC]),
                                                            source_code=CP_ASYNC16))
                                            T.evaluate(T.cuda.func_call("kiln_cp_async_commit", source_code=CP_COMMIT))
                                        # page_no always holds the page of the next tile to copy
                                        page_no[0] = T.if_then_else(pg_lo + (stages - 1) * PAGES_PER_TILE + row_pg < pg_hi,
                                                                    page_values[pg_begin + pg_lo + (stages - 1) * PAGES_PER_TILE + row_pg], 0)
                                    for it in T.serial(n_it):
                                        pg: T.let[T.int32] = pg_lo + it * PAGES_PER_TILE + row_pg
                                        if CUDA:
                                            pg_next: T.let[T.int32] = pg_lo + (it + stages - 1) * PAGES_PER_TILE + row_pg
                                            if pg_next < pg_hi:
                                                for u in T.unroll(U):
                                                    for kv in T.unroll(2):
                                                        T.evaluate(T.cuda.func_call(
                                                            "kiln_cp_async16",
                                                            kv_sm.data, (((((it + stages - 1) % stages * 2 + kv) * ROWS * U + ty * U + u) * D) + tx * VEC) * 2,
                                                            T.address_of(pages[T.Cast("int64", page_no[0]), kv, by, row_off + u, tx * VEC]),
                                                            source_code=CP_ASYNC16))
                                            T.evaluate(T.cuda.func_call("kiln_cp_async_commit", source_code=CP_COMMIT))
                                            # prefetch the page number of the tile after; the compute below hides it
                                            page_no[0] = T.if_then_else(pg_next + PAGES_PER_TILE < pg_hi, page_values[pg_begin + pg_next + PAGES_PER_TILE], 0)
                                            T.evaluate(T.cuda.func_call(WAIT_NAME, source_code=WAIT_SRC))
                                            for u in T.unroll(U):
                                                for v in T.vectorized(VEC):
                                                    k_loc[u, v] = kv_sm[it % stages, 0, ty * U + u, tx * VEC + v]
                                                for v in T.vectorized(VEC):
                                                    v_loc[u, v] = kv_sm[it % stages, 1, ty * U + u, tx * VEC + v]
                                        else:
                                            # plain loads straight into registers (Metal form): the
                                            # GPU hides their latency with other threadgroups
                                            page_no[0] = T.if_then_else(pg < pg_hi, page_values[pg_begin + T.min(pg, pg_hi - 1)], 0)
                                            for u in T.unroll(U):
                                                for vo in T.unroll(VEC // 4):  # Metal vectors have at most 4 lanes
                                                    for vi in T.vectorized(4):
                                                        k_loc[u, vo * 4 + vi] = pages[T.Cast("int64", page_no[0]), 0, by, row_off + u, tx * VEC + vo * 4 + vi]
                                                    for vi in T.vectorized(4):
                                                        v_loc[u, vo * 4 + vi] = pages[T.Cast("int64", page_no[0]), 1, by, row_off + u, tx * VEC + vo * 4 + vi]
                                        for u in T.unroll(U):
                                            valid[u] = pg * PAGE_SIZE + row_off + u < tok_hi
                                            for g in T.unroll(G):
                                                s_loc[u, g] = T.float32(0)
                                                for v in T.unroll(VEC):
                                                    s_loc[u, g] = s_loc[u, g] + q_loc[g, v] * T.cast(k_loc[u, v], "float32")
                                        # sum the dot products over the LANES lanes of a row
                                        for sh in T.unroll(int(math.log2(LANES))):
                                            for u in T.unroll(U):
                                                for g in T.unroll(G):
                                                    if CUDA:
                                                        s_loc[u, g] = s_loc[u, g] + T.tvm_warp_shuffle_xor(
                                                            T.uint32(0xFFFFFFFF), s_loc[u, g], LANES >> (sh + 1), 32, 32)
                                                    else:  # Metal has simd_shuffle (by lane), no xor form
                                                        s_loc[u, g] = s_loc[u, g] + T.tvm_warp_shuffle(
                                                            T.uint32(0xFFFFFFFF), s_loc[u, g], T.bitwise_xor(lane, LANES >> (sh + 1)), 32, 32)
                                        for u in T.unroll(U):
                                            for v in T.unroll(VEC):
                                                # stale or unwritten slots may hold NaN bits: select, not multiply
                                                vf[u, v] = T.if_then_else(valid[u], T.cast(v_loc[u, v], "float32"), T.float32(0))
                                        for g in T.unroll(G):
                                            mx[0] = m_loc[g]
                                            for u in T.unroll(U):
                                                s_loc[u, g] = T.if_then_else(valid[u], s_loc[u, g], T.float32(NEG))
                                                mx[0] = T.max(mx[0], s_loc[u, g])
                                            alpha[0] = T.exp2(m_loc[g] - mx[0])
                                            m_loc[g] = mx[0]
                                            d_loc[g] = d_loc[g] * alpha[0]
                                            for u in T.unroll(U):
                                                p_loc[u] = T.if_then_else(valid[u], T.exp2(s_loc[u, g] - mx[0]), T.float32(0))
                                                d_loc[g] = d_loc[g] + p_loc[u]
                                            for v in T.unroll(VEC):
                                                o_loc[g, v] = o_loc[g, v] * alpha[0]
                                                for u in T.unroll(U):
                                                    o_loc[g, v] = o_loc[g, v] + p_loc[u] * vf[u, v]
                                    # merge the ROWS row states of this block through shared memory
                                    for g in T.unroll(G):
                                        for v in T.unroll(VEC):
                                            sm_o[ty, g, tx * VEC + v] = o_loc[g, v]
                                        if tx == 0:
                                            sm_md[ty, g, 0] = m_loc[g]
                                            sm_md[ty, g, 1] = d_loc[g]
                                    T.tvm_storage_sync("shared")
                                    for e in T.unroll(EPT):
                                        idx: T.let[T.int32] = (ty * LANES + tx) * EPT + e
                                        if idx < G * D:
                                            gi: T.let[T.int32] = idx // D
                                            di: T.let[T.int32] = idx % D
                                            fin[0] = T.float32(NEG)
                                            for r in T.unroll(ROWS):
                                                fin[0] = T.max(fin[0], sm_md[r, gi, 0])
                                            fin[1] = T.float32(0)
                                            fin[2] = T.float32(0)
                                            for r in T.unroll(ROWS):
                                                fin[3] = T.exp2(sm_md[r, gi, 0] - fin[0])
                                                fin[1] = fin[1] + sm_md[r, gi, 1] * fin[3]
                                                fin[2] = fin[2] + sm_o[r, gi, di] * fin[3]
                                            fin[2] = T.if_then_else(fin[1] > T.float32(0), fin[2] / fin[1], T.float32(0))
                                            fin[3] = T.if_then_else(fin[1] > T.float32(0), fin[0] + T.log2(fin[1]), T.float32(-5e4))
                                            if n_used == 1:
                                                output[bz, by * G + gi, di] = T.cast(fin[2], dtype)
                                                if di == 0:
                                                    lse[bz, by * G + gi] = fin[3]
                                            else:
                                                O_part[bx, bz, by * G + gi, di] = fin[2]
                                                if di == 0:
                                                    L_part[bx, bz, by * G + gi] = fin[3]
                                    if CUDA:
                                        if n_used > 1:
                                            # this block's state is stored: count it in; the sequence's last
                                            # split block to arrive merges every split's state (from L2)
                                            if arrive == "sc":
                                                T.evaluate(T.cuda.func_call("kiln_threadfence", source_code=THREADFENCE))
                                            T.tvm_storage_sync("shared")
                                            if ty == 0 and tx == 0:
                                                last[0] = T.cuda.func_call(ARRIVE_NAME, bz * H_kv + by, n_used,
                                                                           source_code=ARRIVE_SRC, return_type="int32")
                                            T.tvm_storage_sync("shared")
                                            is_last[0] = last[0]  # (TVM reads no shared memory in a branch condition)
                                            if is_last[0] == 1:
                                                for c in T.unroll(MCOLS):
                                                    # a thread merges 4 dims (one float4 column) of one query head
                                                    col: T.let[T.int32] = c * NTHREADS + ty * LANES + tx
                                                    if col * 4 < G * D:
                                                        h: T.let[T.int32] = by * G + col * 4 // D
                                                        dm: T.let[T.int32] = col * 4 % D
                                                        mst[0] = T.float32(NEG)  # running max of the splits' lse
                                                        mst[1] = T.float32(0)  # sum of 2^(lse - max)
                                                        for v in T.unroll(4):
                                                            macc[v] = T.float32(0)
                                                        for i in T.serial(T.truncdiv(n_used + merge_chunk - 1, merge_chunk)):
                                                            # a chunk's loads all in flight, then their online merge
                                                            for j in T.unroll(merge_chunk):
                                                                # past the last split: the last one's state again (no branch
                                                                # between the loads), weighed 0 below
                                                                sj: T.let[T.int32] = T.min(i * merge_chunk + j, n_used - 1)
                                                                mlse[j] = T.cuda.func_call("kiln_ldcg", T.address_of(L_part[sj, bz, h]),
                                                                                           source_code=LDCG, return_type="float32")
                                                                T.evaluate(T.cuda.func_call("kiln_ldcg4", T.address_of(mo[j * 4]),
                                                                                            T.address_of(O_part[sj, bz, h, dm]), source_code=LDCG4))
                                                            for j in T.unroll(merge_chunk):
                                                                mlse[j] = T.if_then_else(i * merge_chunk + j < n_used, mlse[j], T.float32(NEG))
                                                            mst[2] = mst[0]
                                                            for j in T.unroll(merge_chunk):
                                                                mst[2] = T.max(mst[2], mlse[j])
                                                            mst[3] = T.exp2(mst[0] - mst[2])  # rescales the merged state
                                                            mst[1] = mst[1] * mst[3]
                                                            for v in T.unroll(4):
                                                                macc[v] = macc[v] * mst[3]
                                                            for j in T.unroll(merge_chunk):
                                                                mlse[j] = T.exp2(mlse[j] - mst[2])  # 0 past the last split
                                                                mst[1] = mst[1] + mlse[j]
                                                                for v in T.unroll(4):
                                                                    macc[v] = macc[v] + mlse[j] * mo[j * 4 + v]
                                                            mst[0] = mst[2]
                                                        for v in T.unroll(4):
                                                            output[bz, h, dm + v] = T.cast(macc[v] / mst[1], dtype)
                                                        if dm == 0:
                                                            lse[bz, h] = mst[0] + T.log2(mst[1])

        # ---- Metal, kernel 2: merge the split states of sequences that used more than one split ----
        # (on CUDA the last split block of each sequence and KV head merges them, in kernel 1)
        if not CUDA:
            for bz in T.thread_binding(B, thread="blockIdx.y"):
                for bh in T.thread_binding(H_qo, thread="blockIdx.x"):
                    for ty in T.thread_binding(MERGE_SLICES, thread="threadIdx.y"):
                        for tx in T.thread_binding(D // MVEC, thread="threadIdx.x"):
                            with T.sblock("merge"):
                                T.reads()
                                T.writes()
                                acc = T.sblock_alloc_buffer((MVEC,), "float32", scope="local")
                                st = T.sblock_alloc_buffer((4,), "float32", scope="local")
                                sm_acc = T.sblock_alloc_buffer((MERGE_SLICES, D), "float32", scope="shared")
                                sm_st = T.sblock_alloc_buffer((MERGE_SLICES, 2), "float32", scope="shared")
                                info2 = T.sblock_alloc_buffer((3,), "int32", scope="local")
                                info2[0] = page_indptr[bz + 1] - page_indptr[bz]
                                info2[1] = T.max(T.truncdiv(info2[0] + NS - 1, NS), min_split_pages)
                                info2[2] = T.max(1, T.truncdiv(info2[0] + info2[1] - 1, info2[1]))
                                n_used2: T.let[T.int32] = info2[2]
                                if n_used2 > 1:
                                    # slice ty merges splits ty, ty + MERGE_SLICES, ... online
                                    st[0] = T.float32(NEG)
                                    st[1] = T.float32(0)
                                    for v in T.unroll(MVEC):
                                        acc[v] = T.float32(0)
                                    for i in T.serial(T.truncdiv(n_used2 + MERGE_SLICES - 1, MERGE_SLICES)):
                                        if i * MERGE_SLICES + ty < n_used2:
                                            st[2] = L_part[i * MERGE_SLICES + ty, bz, bh]
                                            st[3] = T.max(st[0], st[2])
                                            st[2] = T.exp2(st[2] - st[3])
                                            st[0] = T.exp2(st[0] - st[3])  # rescale factor of the old state
                                            st[1] = st[1] * st[0] + st[2]
                                            for v in T.unroll(MVEC):
                                                acc[v] = acc[v] * st[0] + O_part[i * MERGE_SLICES + ty, bz, bh, tx * MVEC + v] * st[2]
                                            st[0] = st[3]
                                    for v in T.unroll(MVEC):
                                        sm_acc[ty, tx * MVEC + v] = acc[v]
                                    if tx == 0:
                                        sm_st[ty, 0] = st[0]
                                        sm_st[ty, 1] = st[1]
                                    T.tvm_storage_sync("shared")
                                    if ty == 0:
                                        st[0] = T.float32(NEG)
                                        for r in T.unroll(MERGE_SLICES):
                                            st[0] = T.max(st[0], sm_st[r, 0])
                                        st[1] = T.float32(0)
                                        for v in T.unroll(MVEC):
                                            acc[v] = T.float32(0)
                                        for r in T.unroll(MERGE_SLICES):
                                            st[2] = T.exp2(sm_st[r, 0] - st[0])
                                            st[1] = st[1] + sm_st[r, 1] * st[2]
                                            for v in T.unroll(MVEC):
                                                acc[v] = acc[v] + sm_acc[r, tx * MVEC + v] * st[2]
                                        for v in T.unroll(MVEC):
                                            output[bz, bh, tx * MVEC + v] = T.cast(acc[v] / st[1], dtype)
                                        if tx == 0:
                                            lse[bz, bh] = st[0] + T.log2(st[1])

    return kiln_decode_paged_kv
