"""Run-time dispatch on the token count for matmuls: GEMV-style kernels for a few rows, tiled GEMM for many.

A matmul with a dynamic row count (decode batch `b`, prefill tokens `n`) gets one kernel for every
M, and a tile-based GEMM wastes almost all of its work when M is 1–8: decode then reads the
weights at a fraction of the memory bandwidth. This pass gives each such PrimFunc a chain on
`M <= limit` (`branch_on_rows`, which the tensor-core rule uses too): GEMV schedules (rows padded
to a bucket, weights read once per bucket) below the limits, the large-M rules above them.

The GEMV is `StreamingGEMV`: dlight's LowBatchGEMV analysis with a CUDA schedule built to keep
enough weight bytes in flight. dlight's own gives a long-K projection (Llama's down / O, K = 14336 /
4096, N = 4096) 128 blocks of 512 threads, 8-byte loads and one load a row in flight per thread: one
block per SM, ~63% of the copy rate.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir import IRModule
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

LIMITS_AND_BUCKETS = ((2, 2), (4, 4), (8, 8))  # M <= 2 → bucket 2, ...; M > 8: the GEMM rules
LOAD_BYTES = 16  # one 128-bit load per thread and step
WARP = 32
UNROLL = 4  # K steps whose weight loads are issued together
MIN_BLOCKS = 264  # two blocks per SM on an H100 before a warp takes two output columns
ONE_COLUMN_N = 6144  # the 2-row bucket gives a warp one column and 2 × UNROLL steps up to this N ...
ONE_COLUMN_MIN_K = 1024  # ... from this K (the shapes measured: bench/RESULTS.md)
WARPS = 4  # warps a block: StreamingGEMV's default, and the fused GEMVs' (norm_gemv.py, swiglu_gemv.py)


def streams(target, n, k, dtype: str, warps: int = WARPS) -> bool:
    """Where a K-streaming GEMV schedule applies: CUDA, static N and K, K a whole number of 32 lanes ×
    16-byte loads of `dtype`, N a whole number of `warps` columns."""
    if target is None or target.kind.name != "cuda":
        return False
    if not all(isinstance(d, tirx.IntImm) for d in (n, k)):
        return False
    return int(k) % (WARP * LOAD_BYTES * 8 // tvm.DataType(dtype).bits) == 0 and int(n) % warps == 0


class StreamingGEMV(dl.gpu.LowBatchGEMV):
    """y[b, n] = x[b, :] · w[n, :] for up to `bucket` rows at once, reading `w` once per bucket.

    Each warp owns `columns` output columns (by default 2, or 1 where N is too small to leave
    MIN_BLOCKS blocks; bench/gemm.py's gemv_c4 / gemv_w8c4 measured 4); its 32 lanes stride over K with 16-byte loads
    (one contiguous 512-byte run per load instruction), `unroll` (UNROLL) steps unrolled so their loads are in
    flight together, partial sums in registers, one shuffle reduction at the end. In the 2-row bucket
    (decode at batch 1–2) with N ≤ ONE_COLUMN_N and K ≥ ONE_COLUMN_MIN_K, a warp takes 1 column and 2 × UNROLL
    steps by default: the same 8 loads in flight per thread over twice the warps (H100: 3–10 points more of
    copy bandwidth at M = 1–2 on Llama's QKV and O and Qwen3's gate/up, fewer at M = 4; bench/RESULTS.md).
    `warps` per block (128 threads) keeps blocks small so that N = 1024–4096 still gives several per SM. What
    CUDA declines here (dequantizing prologues, K not a multiple of 32 × 16 bytes) goes to dlight's.
    """

    def __init__(self, bucket: int = 4, warps: int = WARPS, columns: int | None = None, unroll: int | None = None):
        super().__init__(bucket)
        self.warps = warps
        self.columns = columns
        self.unroll = unroll

    def sch_inner_reduction(self, sch, target, block, dequantize_block, pad_input_block,
                            vector_input_buffers, epilogue_info, batch_pad):
        _, cols, red = sch.get_loops(block)
        n, k = sch.get(cols).extent, sch.get(red).extent
        weight = next(r.source for r in sch.get(block).reads if r.source not in vector_input_buffers)
        vec = LOAD_BYTES * 8 // tvm.DataType(weight.dtype).bits
        if dequantize_block is not None or pad_input_block is None or not streams(target, n, k, weight.dtype,
                                                                                   self.warps):
            return super().sch_inner_reduction(sch, target, block, dequantize_block, pad_input_block,
                                               vector_input_buffers, epilogue_info, batch_pad)
        unroll, tile_s = gemv_tiling(int(n), int(k), self.bucket, self.warps, vec, self.columns, self.unroll)
        # The weight's steps into registers first (read 1; 0 is the padded rows)
        ty = stream_over_k(sch, block, pad_input_block, batch_pad, self.warps, tile_s, unroll, vec,
                           {1: lambda lane, b, s, o, i, v: (lane, s, o, i, v)})
        epilogue = sch.get_consumers(block)
        if epilogue:  # the unpadding block, with any cast / bias / residual fused into it
            sch.set_scope(block, 0, "local")
            sch.reverse_compute_at(epilogue[0], ty, preserve_unit_loops=True)
        return sch


def gemv_tiling(n: int, k: int, bucket: int, warps: int, vec: int, columns: int | None = None,
                unroll: int | None = None) -> tuple[int, int]:
    """(K steps unrolled, output columns a warp) for an N×K weight at `bucket` rows, `vec` elements a load:
    `columns` / `unroll` where given, else the measured defaults (StreamingGEMV's docstring)."""
    narrow = columns is None and unroll is None and bucket <= 2 and n <= ONE_COLUMN_N and k >= ONE_COLUMN_MIN_K
    steps = next(u for u in (unroll or (2 * UNROLL if narrow else UNROLL), UNROLL, 2, 1) if k % (u * WARP * vec) == 0)
    tile_s = columns or (1 if narrow else 2 if n % (2 * warps) == 0 and n // (2 * warps) >= MIN_BLOCKS else 1)
    return steps, tile_s if n % (tile_s * warps) == 0 else 1


def stream_over_k(sch, block, pad_input_block, batch_pad: int, warps: int, tile_s: int, unroll: int, vec: int,
                  register_reads: dict, step_reads: dict | None = None, outputs: int = 1):
    """StreamingGEMV's loops on `block` (rows, columns, K; its row count padded to `batch_pad` by
    `pad_input_block`, None for one row, whose x is then one of `step_reads`): blocks of `batch_pad` rows ×
    `warps` × `tile_s` columns, lanes striding K with `vec` elements a load, `unroll` steps a loop trip;
    per-lane partial sums (`outputs` of them: a tuple reduction has several) in registers, reduced across
    lanes in `block`, which is left under the warp loop (returned).

    `register_reads` {read index: index map from the per-lane block's (lane, row, column, step, unrolled
    step, element)}: operands whose `unroll` steps are loaded into registers together at the top of a trip,
    laid out by loop index (cache_read would take the bounding box of the strided steps); `step_reads`
    (the same form) and x (the padded rows) are loaded per step, which keeps fewer registers live."""
    rows, cols, red = sch.get_loops(block)
    by, bi = sch.split(rows, [None, batch_pad])
    bx, ty, ts = sch.split(cols, [None, warps, tile_s])
    ro, u, tx, vc = sch.split(red, [None, unroll, WARP, vec])  # lane tx reads k = .. + vec · tx + vc
    sch.reorder(by, bx, ty, tx, ro, u, bi, ts, vc)
    partial = sch.rfactor(tx, 0)  # per-lane sums, then a cross-lane reduction in `block`
    by, bx, ty, tx, ro, u, bi, ts, vc = sch.get_loops(partial)
    for loop, axis in ((by, "blockIdx.y"), (bx, "blockIdx.x"), (ty, "threadIdx.y"), (tx, "threadIdx.x")):
        sch.bind(loop, axis)
    for loop, reads in ((ro, register_reads), (u, step_reads or {})):
        for read, index_map in reads.items():
            local = sch.reindex_cache_read(partial, read, "local", index_map)
            sch.compute_at(local, loop, preserve_unit_loops=True)
            sch.vectorize(sch.get_loops(local)[-1])
    if pad_input_block is not None:
        sch.compute_at(pad_input_block, u, preserve_unit_loops=True)  # x, zero past the real rows
        sch.set_scope(pad_input_block, 0, "local")
        sch.vectorize(sch.get_loops(pad_input_block)[-1])
    sch.decompose_reduction(partial, ro)
    for i in range(outputs):
        sch.set_scope(partial, i, "local")
    sch.unroll(u)
    sch.reverse_compute_at(block, ty, preserve_unit_loops=True)
    lane, *spatial = sch.get_loops(block)[-len(sch.get(block).iter_vars):]  # the lanes, rows, columns (maybe 2-D)
    sch.reorder(*spatial, lane)
    sch.bind(lane, "threadIdx.x")
    return ty


def holds_block(func: tirx.PrimFunc, name: str) -> bool:
    """Whether `func` has a block `name` (how a fused GEMV's rule knows its PrimFunc; FuseOps leaves them opaque)."""
    try:
        s_tir.Schedule(func).get_sblock(name)
        return True
    except s_tir.schedule.ScheduleError:
        return False


def schedule_row_chains(mod: IRModule, block: str, schedule, limits_and_buckets) -> IRModule:
    """Every unscheduled PrimFunc of `mod` holding `block` replaced by the run-time chain of `schedule(func,
    bucket)` over `limits_and_buckets` (the last bucket's kernel takes any number of rows) and marked
    `tirx.is_scheduled`: the fused GEMVs whose blocks LowBatchGEMV's analysis does not know (norm_gemv.py,
    swiglu_gemv.py)."""
    for gvar, func in mod.functions_items():
        if (not isinstance(func, tirx.PrimFunc) or func.attrs and "tirx.is_scheduled" in func.attrs
                or not holds_block(func, block)):
            continue
        rows = single_dynamic_dim(func)
        chained = schedule(func, limits_and_buckets[-1][1])
        for limit, bucket in reversed(limits_and_buckets[:-1]):
            chained = branch_on_rows(schedule(func, bucket), chained, rows, limit)
        mod.update_func(gvar, chained.with_attr("tirx.is_scheduled", True))
    return mod


def _schedule(func: tirx.PrimFunc, rules: list) -> tirx.PrimFunc:
    return dl.ApplyDefaultSchedule(*rules)(IRModule({"main": func}))["main"]


def branch_on_rows(small: tirx.PrimFunc, large: tirx.PrimFunc, rows, limit: int) -> tirx.PrimFunc:
    """One PrimFunc that runs `small`'s kernels when rows <= limit, else `large`'s.

    Each body sits in a host loop of 0 or 1 trips rather than under an `if`: TIR's ThreadSync refuses
    kernels with barriers (the tensor-core GEMM) under a condition, even a host-side one. The two
    root blocks become one, holding both sets of buffers (nested roots are rejected).
    """
    renamed = {a: b for a, b in zip(small.params, large.params) if not a.same_as(b)}
    if renamed:  # make `small`'s body refer to `large`'s parameters
        small = small.specialize(renamed)
    take = tirx.Select(rows <= limit, tirx.IntImm("int32", 1), tirx.IntImm("int32", 0))

    def once(name, trips, body):
        return tirx.For(tirx.Var(name, "int32"), tirx.IntImm("int32", 0), trips, tirx.ForKind.SERIAL, body)

    small_root, large_root = small.body.block, large.body.block
    body = tirx.SeqStmt([once("small_m", take, small_root.body), once("large_m", 1 - take, large_root.body)])
    buffers = list(small_root.alloc_buffers) + list(large_root.alloc_buffers)
    return large.with_body(s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], "root", body,
                                                                      alloc_buffers=buffers)))


class RowDispatchGemmRule(GPUScheduleRule):
    """What the tensor-core GEMM rules (MatmulTensorCore, MatmulWgmma) share: the row-count thresholds
    and the run-time switch to StreamingGEMV for a dynamic M when a kernel has few column tiles.

    `min_m`: a static M below it is declined. With a dynamic M and fewer than `few_tiles` column tiles
    (N = 1024: 8 blocks on 132 SMs), M <= `small_m` rows run StreamingGEMV (buckets of 8 rows) instead,
    chosen at run time.
    """

    def __init__(self, min_m: int = 64, small_m: int = 32, few_tiles: int = 16):
        self.min_m = min_m
        self.small_m = small_m
        self.few_tiles = few_tiles

    def gemv_for_few_rows(self, func: tirx.PrimFunc, target, result: tirx.PrimFunc, rows,
                          n_tiles: int) -> tirx.PrimFunc:
        """`result`, or (with fewer than `few_tiles` column tiles, where StreamingGEMV takes `func`) a
        PrimFunc that runs StreamingGEMV for rows <= `small_m`; `rows` is M's dynamic extent."""
        if n_tiles < self.few_tiles:
            gemv = StreamingGEMV(8).apply(func, target, False)
            if gemv is not None:
                return branch_on_rows(gemv.mod["main"], result, rows, self.small_m)
        return result


def single_dynamic_dim(func: tirx.PrimFunc):
    buffers = [p for p in func.params if hasattr(p, "shape")]  # params that are buffers, not scalars
    dims = {d for buf in buffers for d in buf.shape if isinstance(d, tirx.Var)}
    return dims.pop() if len(dims) == 1 else None


def dispatch_on_rows(func: tirx.PrimFunc, large_rules: list, gemv=StreamingGEMV,
                     limits_and_buckets=LIMITS_AND_BUCKETS) -> tirx.PrimFunc | None:
    """`func` scheduled as the chain of `gemv(bucket)` kernels below each limit and `large_rules`
    above the last; None when `func` has no single dynamic dimension or is no GEMV."""
    rows = single_dynamic_dim(func)
    if rows is None:
        return None
    small = [_schedule(func, [gemv(bucket)]) for _, bucket in limits_and_buckets]
    if any(tvm_ffi.structural_equal(s, func) for s in small):
        return None  # not a matmul LowBatchGEMV's analysis understands
    chained = _schedule(func, large_rules)
    for (limit, _), low in reversed(list(zip(limits_and_buckets, small))):
        chained = branch_on_rows(low, chained, rows, limit)
    return chained


@tvm.transform.module_pass(opt_level=0, name="KilnLowBatchDispatch")
class LowBatchDispatch:
    """Specialise every GEMV-shaped PrimFunc with one dynamic dimension (see the module docstring)."""

    def __init__(self, large_rules: list):
        self.large_rules = large_rules

    def transform_module(self, mod: IRModule, _ctx) -> IRModule:
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or func.attrs and "tirx.is_scheduled" in func.attrs:
                continue
            chained = dispatch_on_rows(func, self.large_rules)
            if chained is not None:
                mod.update_func(gvar, chained.with_attr("tirx.is_scheduled", True))
        return mod
