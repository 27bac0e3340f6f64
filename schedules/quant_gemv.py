"""Dequant-fused GEMV for packed quantized weights (docs/QUANT-LAYOUT.md), any row count M.

A quantized Linear of `decode` / `logits` reaches the scheduler as one PrimFunc, formats/quant_values.py's
`dequantize_matmul_te` (quant_fusion.py puts it there) plus elementwise epilogues (cast, residual add):
`dequantize_<qtype>_codes` (the codes as floats, from packed uint32 words), per scale group of G elements
`group_dot` = Σ x·code and `group_sum` = Σ x (types with a min), and `NT_matmul` = Σ over groups of
scale · group_dot − min · group_sum, with the scales and mins as small spatial blocks. As in llama.cpp's
MMVQ and MLC's GEMV:

  grid: blockIdx.x over N in tiles of `rows_per_thread × row_threads` rows, blockIdx.y over M in
        tiles of `m_tile` rows (so for M ≤ m_tile every weight is read once);
  thread: `lanes` threads (threadIdx.x, one warp or more: split-K inside the block) stride over K
        in chunks of 32 consecutive elements (one group, or two of 16); per chunk a thread loads the
        chunk's code words with 16-byte loads (coalesced across the warp: lane t reads the 16 bytes
        after lane t−1's) and makes the codes of its rows in registers, once for all `m_tile` rows of x;
        per group and row of x it loads x 8 values per 16-byte load, sums x once for its rows and
        x·code per row (one FMA a weight), then adds scale · dot − min · Σx (the scales loaded once
        a group);
  reduction: a cross-thread sum over the lanes, then the PrimFunc's own epilogue per output.

M is padded to the tile on NT_matmul (pad_einsum: its reads are all plain iterators): group_dot and
group_sum are computed for rows below M only and read as 0 past it, so every per-thread buffer has a
static size. K must be whole chunks and N whole row tiles; anything else is declined and left to the
other rules. `unroll` > 1 takes that many chunks per loop step, their code words loaded before the first
is used.

With the RMSNorm before it folded in (schedules/norm_gemv.py: blocks `norm_scaled`, `group_square`, NT_matmul a
(sum, Σx²) pair, `norm_rstd`), x and γ are both loaded per group by 16-byte loads, γ·x and Σx² made there once
for the thread's rows beside Σx, and both sums reduced across the lanes. That x side (γ's loads and conversion,
γ·x, x²) is 3 operations an element and thread more than the plain GEMV's 2, redone by every row thread of every
block; at M tile 1 with several row threads a block (gate/up), γ·x (fp32) of the whole row and Σγx, Σx² a group
are instead made once a block into shared memory before the K loop (`_stage_norm`), whose per-thread work then is
the plain GEMV's (bench/RESULTS.md, "Why `--fuse_norms` slows the quantized decode").

The tile sizes depend on the shape (`tiling`, measured on an H100: bench/RESULTS.md, "Quantized GEMV: a tiling
per shape"); `lanes` > 32 split a row's K over several warps, whose partial sums meet in the reduction.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block

from .low_batch import branch_on_rows

CHUNK = 32  # K elements per thread per step: one 32-element scale group
STAGED_BYTES = 32 * 1024  # γ·x of one row of x in shared memory up to this (M tile 1 with a norm)
M_TILES = (1, 4, 8)  # the run-time chain over M (each tile's kernel from `tiling`, unless a config is given)


@dataclass(frozen=True)
class QuantGemvConfig:
    """One tiling for every shape; `m_tiles` (ascending) are the M tiles of the run-time chain: M <=
    m_tiles[0] runs the first, ..., any larger M the last."""

    m_tiles: tuple = M_TILES
    lanes: int = 32
    row_threads: int = 4
    rows_per_thread: int = 2
    unroll: int = 1  # chunks per lane per loop step (unrolled: their loads can be in flight together)


MANY_ROWS = 16384  # N from which the M = 1 kernel has thousands of blocks (gate/up, LM heads)


def tiling(n: int, qtype: str, m_tile: int) -> QuantGemvConfig:
    """The tiling of one M tile's kernel for a weight of N rows of `qtype` (any K), the rule QuantGemv() uses, from
    an H100 sweep of 22 tilings at M = 1 on Llama-3.1-8B's shapes, PDL kernels back to back (bench/RESULTS.md,
    "Quantized GEMV: a tiling per shape"):

    - M tile 1, N < MANY_ROWS (QKV, O, down: 512–768 blocks of 8 rows, bound by the loads in flight):
      64 lanes × 1 row thread × 2 rows, unroll 2: each row's K split over two warps (twice the warps of
      32 lanes), two chunks' loads in flight a lane; 2 rows a block of 64 threads. Q8_0 (twice the bytes a
      chunk): 64 lanes × 2 row threads × 2 rows, no unroll.
    - M tile 1, N ≥ MANY_ROWS (thousands of blocks, bound by instructions): 32 lanes × 4 row threads,
      Q4_K with 4 rows a thread (x's conversion and Σx shared by 4 rows), the others 2 rows, unroll 4.
    - M tiles 4 and 8: 32 lanes × 4 row threads × 2 rows (a tile re-uses each code for 4–8 rows of x;
      the sweep found none better by more than 3%).

    Rows a thread (then row threads) shrink here to divide N, lanes in QuantGemv to divide K's chunks, so any
    shape gets a kernel."""
    if m_tile > 1:
        cfg = QuantGemvConfig(m_tiles=(m_tile,))
    elif n < MANY_ROWS:
        cfg = QuantGemvConfig(m_tiles=(1,), lanes=64, row_threads=2 if qtype == "q8_0" else 1, rows_per_thread=2,
                              unroll=1 if qtype == "q8_0" else 2)
    elif qtype == "q4_k":
        cfg = QuantGemvConfig(m_tiles=(1,), rows_per_thread=4)
    else:
        cfg = QuantGemvConfig(m_tiles=(1,), unroll=4)
    while n % (cfg.row_threads * cfg.rows_per_thread):
        cfg = replace(cfg, rows_per_thread=cfg.rows_per_thread // 2) if cfg.rows_per_thread > 1 else \
            replace(cfg, row_threads=cfg.row_threads // 2)
    return cfg


def vector_lanes(target) -> int:
    """16-bit values per vector load or store: 8 (16 bytes), 4 on Metal, whose vector types stop at 4."""
    return 4 if target is not None and target.kind.name == "metal" else 8


def is_packed(buf: tirx.Buffer) -> bool:
    return buf.dtype == "uint32" and len(buf.shape) in (2, 3)  # 3: matrices stacked, [S, N, words]


class QuantGemv:
    """The schedule in the module docstring; `config` fixes the tile sizes for every shape, None (the
    default) takes them per shape and M tile from `tiling`."""

    def __init__(self, config: QuantGemvConfig | None = None):
        self.config = config

    def kernel(self, func: tirx.PrimFunc, target=None) -> tirx.PrimFunc | None:
        """`func` scheduled (with a dynamic M, a run-time chain over `m_tiles`), or None if not ours."""
        if not any(is_packed(p) for p in func.params if hasattr(p, "shape")):
            return None
        dims = {d for p in func.params if hasattr(p, "shape") for d in p.shape if isinstance(d, tirx.Var)}
        m_tiles = M_TILES if self.config is None else self.config.m_tiles
        tiles = m_tiles if len(dims) == 1 else m_tiles[-1:]
        if "group_dot" not in _named_blocks(s_tir.Schedule(func)):
            return None
        try:
            kernels = [self._schedule(func, tile, vector_lanes(target)) for tile in tiles]
        except (s_tir.ScheduleError, _Decline):
            return None
        chained = kernels[-1].mod["main"]
        for tile, small in reversed(list(zip(tiles[:-1], kernels[:-1]))):
            chained = branch_on_rows(small.mod["main"], chained, next(iter(dims)), tile)
        return chained

    def _schedule(self, func, m_tile: int, lanes16: int):
        sch = s_tir.Schedule(func)
        named = _named_blocks(sch)
        if "NT_matmul" not in named:
            raise _Decline
        mm, dot, scaled = named["NT_matmul"], named["group_dot"], named.get("norm_scaled")
        per_row = [named[b] for b in ("group_sum", "group_square") if b in named]  # Σ x, Σ x² a group
        outputs = len(sch.get(mm).writes)  # 2 with a norm: (the sum, Σx²)
        codes = [b for b in sch.get_producers(dot) if any(is_packed(r.source) for r in sch.get(b).reads)]
        if len(codes) != 1:
            raise _Decline
        codes = codes[0]
        ivs = sch.get(mm).iter_vars
        group = int(sch.get(dot).iter_vars[-1].dom.extent)
        n_ext, groups = ivs[-2].dom.extent, ivs[-1].dom.extent
        if not isinstance(n_ext, tirx.IntImm) or not isinstance(groups, tirx.IntImm):
            raise _Decline
        qtype = sch.get(codes).name_hint.removeprefix("dequantize_").removesuffix("_codes")
        # stacked weights ([S, N, ...]: gate and up, swiglu_gemv.py): a thread takes its rows of every matrix,
        # tiled as the S·N rows of one
        stack = int(ivs[-3].dom.extent) if len(sch.get(codes).iter_vars) == 3 else 1
        cfg = self.config or tiling(int(n_ext) * stack, qtype, m_tile)
        rows_per_thread = max(1, cfg.rows_per_thread // stack)
        row_tile = cfg.row_threads * rows_per_thread
        if CHUNK % group or int(groups) * group % CHUNK or int(n_ext) % row_tile:
            raise _Decline
        # pad M to the tile: group_dot and group_sum read as 0 past M (computed only below it), NT_matmul
        # computed for the whole tile, so that every per-thread buffer has a static size
        sch.pad_einsum(mm, [1 if isinstance(iv.dom.extent, tirx.IntImm) else m_tile for iv in ivs[:-2]] + [1, 1])
        for block in sch.get_producers(mm):
            if not any(sch.get(block).same_as(sch.get(b)) for b in (dot, *per_row)):
                sch.compute_inline(block)  # the padded copies, the group scales and mins
        consumers = sch.get_consumers(mm)
        if not consumers:
            sch.cache_write(mm, 0, "local")
        for copy in consumers:
            if sch.get_consumers(copy):
                sch.compute_inline(copy)
        at = [sch.get(b).same_as(sch.get(mm)) for b in sch.get_child_blocks(get_root_block(sch))].index(True)
        after = sch.get_child_blocks(get_root_block(sch))[at + 1:]
        loops = sch.get_loops(mm)
        if len(loops) != len(ivs):
            raise _Decline

        *lead, j, g = loops
        stacked = [lead.pop()] if stack > 1 else []
        i = sch.fuse(*lead) if len(lead) > 1 else lead[0]
        i_o, i_i = sch.split(i, [None, m_tile])
        j_o, j_y, j_r = sch.split(j, [None, cfg.row_threads, rows_per_thread])
        k_chunks = int(groups) * group // CHUNK
        lanes = cfg.lanes
        while lanes > 1 and k_chunks % lanes:  # whole chunks per lane (a predicated split is no reduction)
            lanes //= 2
        g_o, g_t, g_c = sch.split(g, [None, lanes, CHUNK // group])
        sch.reorder(j_o, i_o, j_y, g_t, g_o, i_i, g_c, *stacked, j_r)
        rf = sch.rfactor(g_t, 0)
        j_o, i_o, j_y, g_t, g_o, i_i, g_c, *stacked, j_r = sch.get_loops(rf)
        unroll = max(u for u in range(1, cfg.unroll + 1) if k_chunks // lanes % u == 0)
        g_o, g_u = sch.split(g_o, [None, unroll])
        sch.bind(j_o, "blockIdx.x")
        sch.bind(i_o, "blockIdx.y")
        sch.bind(j_y, "threadIdx.y")
        sch.bind(g_t, "threadIdx.x")

        # per group and row: Σ x·code and Σ x in registers; the chunk's codes for the thread's rows
        threads = cfg.row_threads * lanes
        k = int(groups) * group
        # with a norm, at M tile 1, where a block's row threads walk the same K: its x side once per block
        staged = (scaled is not None and m_tile == 1 and cfg.row_threads > 1 and k * 4 <= STAGED_BYTES
                  and k % (threads * lanes16) == 0 and int(groups) % threads == 0
                  and str(sch.get(j_y).loop_var.ty) == str(sch.get(g_t).loop_var.ty))
        sch.compute_at(dot, j_r, preserve_unit_loops=True)
        for block in per_row:
            sch.compute_at(block, i_o if staged else g_c, preserve_unit_loops=True)
        sch.compute_at(codes, g_u, preserve_unit_loops=True)
        for block in (dot, *per_row, codes):
            sch.set_scope(block, 0, "shared" if staged and block in per_row else "local")
        deq_reads = [r.source for r in sch.get(codes).reads]
        for idx, buf in enumerate(deq_reads):
            if not is_packed(buf):
                continue
            cache = sch.cache_read(codes, idx, "local", consumer_blocks=[codes])
            sch.compute_at(cache, g_o, preserve_unit_loops=True)  # all the step's words first
            words = sch.get_loops(cache)[-1]
            width = next(w for w in (4, 2, 1) if int(sch.get(words).extent) % w == 0)
            if width > 1:
                _, vec = sch.split(words, [None, width])
                sch.vectorize(vec)
        for loop in sch.get_loops(codes)[-2 - len(stacked):]:
            sch.unroll(loop)

        # x: a group's values by 16-byte loads, per row of the M tile, shared by the thread's rows; with a
        # norm, γ the same way and γ·x (fp32) made once a group for the thread's rows, Σx² beside Σx
        readers = [dot, *per_row]
        if staged:
            _stage_norm(sch, scaled, per_row, i_o, cfg.row_threads, lanes, lanes16)
        elif scaled is not None:
            sch.compute_at(scaled, g_c, preserve_unit_loops=True)
            sch.set_scope(scaled, 0, "local")
            readers = [scaled, *[b for b in per_row if sch.get(b).name_hint == "group_square"]]
        x_buf = [r.source for r in sch.get(readers[0]).reads if not r.source.same_as(sch.get(codes).writes[0].source)]
        if len(x_buf) != (1 if scaled is None or staged else 2):
            raise _Decline
        x_buf.sort(key=lambda buf: len(buf.shape) == 1)  # x first, then γ
        for buf in x_buf:  # x, then γ (read by norm_scaled only); staged: γ·x from shared memory
            idx = [r.source for r in sch.get(readers[0]).reads].index(buf)
            cache = sch.cache_read(readers[0], idx, "local", consumer_blocks=readers if buf.same_as(x_buf[0])
                                   and not staged else readers[:1])
            sch.compute_at(cache, g_c, preserve_unit_loops=True)
            _, vec = sch.split(sch.get_loops(cache)[-1], [None, 4 if staged else lanes16])
            sch.vectorize(vec)
        for block in (dot, *([] if staged else per_row)):
            t = sch.get_loops(block)[-1]
            sch.decompose_reduction(block, t)
            sch.unroll(t)
        for loop in (g_u, i_i, g_c, *stacked, j_r):
            sch.unroll(loop)
        sch.decompose_reduction(rf, g_o)
        for i in range(outputs):
            sch.set_scope(rf, i, "local")

        sch.reverse_compute_at(mm, j_y, preserve_unit_loops=True)
        lane, *spatial = sch.get_loops(mm)[-len(ivs):]
        sch.reorder(*spatial, lane)
        sch.bind(lane, "threadIdx.x")
        for i in range(outputs):
            sch.set_scope(mm, i, "local")
        for epi in after[:-1]:
            sch.compute_inline(epi)
        if after:
            sch.reverse_compute_at(after[-1], j_y, preserve_unit_loops=True)
        return sch


def _stage_norm(sch: s_tir.Schedule, scaled, per_row: list, block_loop, row_threads: int, lanes: int,
                vec: int) -> None:
    """The norm's x side made once per block, not per thread: γ·x (fp32, `scaled`) of the whole K into shared
    memory by the block's threads together (x and γ by 16-byte loads), then Σγx and Σx² a group (`per_row`,
    already at `block_loop` in shared memory) one group a thread; the K loop reads γ·x from there 16 bytes at a
    time (group_dot's cache, made by the caller) and both sums a group."""
    sch.compute_at(scaled, block_loop, preserve_unit_loops=True)
    sch.set_scope(scaled, 0, "shared")
    # a lane's chunk is 128 bytes past its neighbour's: rows of CHUNK values padded by 16 bytes, so that the
    # lanes' 16-byte reads of one step fall in different banks
    sch.transform_layout(scaled, ("write", 0), lambda *i: (*i[:-1], i[-1] // CHUNK, i[-1] % CHUNK))
    sch.storage_align(scaled, 0, axis=-2, factor=CHUNK, offset=4)
    _, ty, tx, inner = sch.split(sch.fuse(*sch.get_loops(scaled)[-2:]), [None, row_threads, lanes, vec])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    for idx in range(2):  # x, γ
        cache = sch.cache_read(scaled, idx, "local", consumer_blocks=[scaled])
        sch.compute_at(cache, tx, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(cache)[-1])
    sch.unroll(inner)
    for block in per_row:  # summed in a register, stored once
        store = sch.cache_write(block, 0, "local")
        *_, row, grp = sch.get_loops(store)
        _, ty, tx = sch.split(sch.fuse(row, grp), [None, row_threads, lanes])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        sch.compute_at(block, tx, preserve_unit_loops=True)
        # the group's values by 16-byte loads (a thread's group starts a group past its neighbour's: scalar
        # shared-memory reads would hit one bank)
        reads = [r.source for r in sch.get(block).reads]
        idx = next(i for i, buf in enumerate(reads) if not buf.same_as(sch.get(block).writes[0].source))
        cache = sch.cache_read(block, idx, "local", consumer_blocks=[block])
        sch.compute_at(cache, tx, preserve_unit_loops=True)
        _, inner = sch.split(sch.get_loops(cache)[-1], [None, 128 // tvm.DataType(reads[idx].dtype).bits])
        sch.vectorize(inner)
        red = sch.get_loops(block)[-1]
        sch.decompose_reduction(block, red)
        sch.unroll(red)


def _named_blocks(sch: s_tir.Schedule) -> dict:
    """{name: block} of the root's children (formats/quant_values.py names the factored form's blocks)."""
    return {sch.get(b).name_hint: b for b in sch.get_child_blocks(get_root_block(sch))}


class _Decline(Exception):
    pass
