"""Run-time dispatch on the token count for matmuls: GEMV-style kernels for a few rows, tiled GEMM for many.

A matmul with a dynamic row count (decode batch `b`, prefill tokens `n`) gets one kernel for every
M, and a tile-based GEMM wastes almost all of its work when M is 1–8: decode then reads the
weights at a fraction of the memory bandwidth. This pass gives each such PrimFunc a chain on
`M <= limit` (`branch_on_rows`, which the tensor-core rule uses too): dlight's LowBatchGEMV
schedules (rows padded to a small bucket, weights read once per bucket) below the limits, the
large-M rules above them.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir import IRModule
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

LIMITS_AND_BUCKETS = ((2, 2), (8, 4))  # M <= 2 → bucket 2; M <= 8 → bucket 4; else the GEMM rules


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
    and the run-time switch to dlight's LowBatchGEMV for a dynamic M when a kernel has few column tiles.

    `min_m`: a static M below it is declined. With a dynamic M and fewer than `few_tiles` column tiles
    (N = 1024: 8 blocks on 132 SMs), M <= `small_m` rows run LowBatchGEMV instead, chosen at run time.
    """

    def __init__(self, min_m: int = 64, small_m: int = 32, few_tiles: int = 16):
        self.min_m = min_m
        self.small_m = small_m
        self.few_tiles = few_tiles

    def gemv_for_few_rows(self, func: tirx.PrimFunc, target, result: tirx.PrimFunc, rows,
                          n_tiles: int) -> tirx.PrimFunc:
        """`result`, or (with fewer than `few_tiles` column tiles, where LowBatchGEMV takes `func`) a
        PrimFunc that runs LowBatchGEMV for rows <= `small_m`; `rows` is M's dynamic extent."""
        if n_tiles < self.few_tiles:
            gemv = dl.gpu.LowBatchGEMV().apply(func, target, False)
            if gemv is not None:
                return branch_on_rows(gemv.mod["main"], result, rows, self.small_m)
        return result


def _single_dynamic_dim(func: tirx.PrimFunc):
    buffers = [p for p in func.params if hasattr(p, "shape")]  # params that are buffers, not scalars
    dims = {d for buf in buffers for d in buf.shape if isinstance(d, tirx.Var)}
    return dims.pop() if len(dims) == 1 else None


@tvm.transform.module_pass(opt_level=0, name="KilnLowBatchDispatch")
class LowBatchDispatch:
    """Specialise every GEMV-shaped PrimFunc with one dynamic dimension (see the module docstring)."""

    def __init__(self, large_rules: list):
        self.large_rules = large_rules

    def transform_module(self, mod: IRModule, _ctx) -> IRModule:
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or func.attrs and "tir.is_scheduled" in func.attrs:
                continue
            rows = _single_dynamic_dim(func)
            if rows is None:
                continue
            small = [_schedule(func, [dl.gpu.LowBatchGEMV(bucket)]) for _, bucket in LIMITS_AND_BUCKETS]
            if any(tvm_ffi.structural_equal(s, func) for s in small):
                continue  # not a matmul LowBatchGEMV understands
            chained = _schedule(func, self.large_rules)
            for (limit, _), low in reversed(list(zip(LIMITS_AND_BUCKETS, small))):
                chained = branch_on_rows(low, chained, rows, limit)
            mod.update_func(gvar, chained.with_attr("tir.is_scheduled", True))
        return mod
