"""Tensor-core GEMM rule for CUDA: ldmatrix + mma.sync, cp.async multi-stage pipeline.

dlight's `Matmul` only tensorizes fp16 with static M and its wmma path runs at ~3% of cuBLAS on
an H100; prefill matmuls have a dynamic token count and bf16 weights. This rule takes any
matmul-like PrimFunc (one reduction block C[S,I,J] += A[S,I,K]·B[S,J,K] in fp32 over fp16/bf16
inputs, any elementwise epilogue: cast, residual add, ...) and tiles it for tensor cores:

  block tile BM×BN×BK, warps WM×WN, each warp (BM/WM)×(BN/WN) of 16×16 mma tiles;
  A and B tiles: global → shared (cp.async, XOR-swizzled rows, `stages` deep);
  shared → registers with ldmatrix.x4, two mma.sync m16n8k16 per 16×16×16 step;
  epilogue: fp32 accumulators → shared (per warp, per 16×16 tile) → elementwise ops → global;
  blocks are rasterized in panels of `raster` N-tiles so that concurrent blocks share weights
  and activations in L2.

M (tokens) may be dynamic: it is padded to BM by predication (pad_einsum); N and K are static.
With few column tiles (N = 1024), M ≤ 32 switches at run time to StreamingGEMV (schedules/low_batch.py).
Build with `tir_pipeline=TIR_PIPELINE` (below): without it the kernels are right but slow.
Measured: ~47-50% of cuBLAS on an H100 for M ≥ 512 (docs/gemm.md, bench/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.gpu.matmul import (
    auto_inline_consumer_chain,
    auto_inline_producers,
    get_index_map,
    get_reduction_blocks,
)

from . import mma_intrin
from .low_batch import RowDispatchGemmRule
from .mma_intrin import frag_layout

# TIR options our kernels need at build time (`PassContext(config=PASS_CONFIG)`):
# - use_async_copy: pipelined global→shared copies become cp.async (else synchronous, slower);
# - disable_cse_tir: TIR's CSE runs before LowerWarpMemory and hides the `lane * 8 + i` fragment
#   offsets behind let-variables, which LowerWarpMemory then cannot lower. nvcc does its own CSE.
PASS_CONFIG = {"tirx.use_async_copy": True, "tirx.disable_cse_tir": True}
_WARP_ALLOCS = 8
TIR_PIPELINE = "kiln"  # `tvm.compile(..., tir_pipeline=TIR_PIPELINE)`: sets PASS_CONFIG itself


def _kiln_tir_pipeline():
    """TVM's default TIR pipeline, with PASS_CONFIG applied and warp memory fully lowered.

    TVM 0.27's LowerWarpMemory rewrites only the first warp-scope allocation of a kernel per run
    (the others stay as 32× larger local arrays, indexed by lane: slow stack memory). Our
    kernels hold 3-5 (A, B, accumulators; the software pipeline copies A and B), so it runs up
    to 8 times; a run with
    nothing left to lower changes nothing.
    """
    main, host, device = tvm.tirx.get_tir_pipeline("default")

    @tvm.transform.module_pass(opt_level=0, name="KilnTIR")
    def _main(mod, ctx):
        with tvm.transform.PassContext(opt_level=ctx.opt_level,
                                       config={**dict(ctx.config), **PASS_CONFIG}):
            return main(mod)

    def _device():
        return tvm.transform.Sequential([tirx.transform.LowerWarpMemory()] * (_WARP_ALLOCS - 1)
                                        + [device()])

    return _main, host, _device


tvm.tirx.compilation_pipeline.register_tir_pipeline(TIR_PIPELINE, _kiln_tir_pipeline)


@dataclass(frozen=True)
class Config:
    """One tiling. Defaults: 128×128×64 tiles, 2×2 warps of 64×64, 3 stages (96 KiB shared),
    the best of those measured on an H100 (docs/gemm.md)."""

    bm: int = 128
    bn: int = 128
    bk: int = 64
    wm: int = 2
    wn: int = 2
    stages: int = 3
    raster: int = 8
    vec: int = 8  # elements per 16-byte copy
    swizzle: bool = True  # XOR-permuted shared rows; False pads rows by 16 bytes instead
    warp_epilogue: bool = False  # stage a warp's whole tile at once (1 barrier, not 1 per 16×16)


def _unroll(sch, loop) -> None:
    """Unroll in CUDA (`#pragma unroll`), not in TIR: with the tile index still a loop variable,
    LowerWarpMemory can split fragment offsets `tile * 256 + lane * 8 + 4` into lane and
    register; once folded to a constant (`lane * 8 + 260`) it cannot, and the fragments fall
    into local memory."""
    sch.unroll(loop)
    sch.annotate(loop, "pragma_unroll_explicit", False)


def _tiles16(sch, block):
    """Split the block's last two loops into unrolled 16×16 tiles: (y0, x1), the innermost loop over
    tiles and the first loop inside one (where a tile is blockized or tensorized)."""
    x, y = sch.get_loops(block)[-2:]
    x0, x1 = sch.split(x, [None, 16])
    y0, y1 = sch.split(y, [None, 16])
    sch.reorder(x0, y0, x1, y1)
    _unroll(sch, x0)
    _unroll(sch, y0)
    return y0, x1


def _static(x) -> int | None:
    return int(x) if isinstance(x, tirx.IntImm) else None


class MatmulTensorCore(RowDispatchGemmRule):
    """Schedules fp16/bf16 matmuls (fp32 accumulation) with M ≥ `min_m` on sm_80+ tensor cores.

    Returns None (so the next rule applies) for other targets, dtypes, shapes with a static M
    below `min_m`, and non-static N or K. `min_m`, `small_m`, `few_tiles`: RowDispatchGemmRule.
    """

    def __init__(self, config: Config | None = None, min_m: int = 64, small_m: int = 32,
                 few_tiles: int = 16):
        super().__init__(min_m, small_m, few_tiles)
        self.config = config or Config()

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "cuda":
            return None
        arch = str(target.attrs.get("arch", ""))
        if not arch.startswith("sm_") or int("".join(c for c in arch[3:] if c.isdigit())) < 80:
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(get_root_block(sch))
        reduction = get_reduction_blocks(sch, blocks)
        if reduction is None:
            return None
        main = reduction[0]
        stmt = sch.get(main)
        if len(stmt.reads) != 2 or len(stmt.writes) != 1:
            return None
        a_dtype, b_dtype = (str(r.source.dtype) for r in stmt.reads)
        if a_dtype != b_dtype or a_dtype not in mma_intrin.DTYPES:
            return None
        if str(stmt.writes[0].source.dtype) != "float32":
            return None
        maps = get_index_map(stmt)
        if maps is None:
            return None
        try:
            tc = self._schedule(sch, main, maps, a_dtype)
        except (tvm.TVMError, ValueError, AssertionError):
            return None
        if tc is None:
            return None
        sch, m_ext, n_tiles = tc
        result = sch.mod["main"]
        if _static(m_ext) is None:
            result = self.gemv_for_few_rows(func, target, result, m_ext, n_tiles)
        return s_tir.Schedule(result)

    def _schedule(self, sch, main, maps, dtype):
        mma_intrin.register()
        c = self.config
        matmul_map, a_map, b_map, c_map = maps
        sch.transform_layout(sch.reindex(main, ("read", 0)), ("write", 0), a_map)
        sch.transform_layout(sch.reindex(main, ("read", 1)), ("write", 0), b_map)
        sch.transform_layout(sch.reindex(main, ("write", 0)), ("read", 0), c_map)
        sch.transform_block_layout(main, matmul_map)

        # Shape checks on the normalized C[S, I, J] += A[S, I, K] * B[S, J, K].
        s_ext, m_ext, n_ext, k_ext = (iv.dom.extent for iv in sch.get(main).iter_vars)
        m, n, k = _static(m_ext), _static(n_ext), _static(k_ext)
        if n is None or k is None or (m is not None and m < self.min_m):
            return None
        if n % 16 or k % c.bk:
            return None
        if _static(s_ext) != 1:
            return None

        sch.pad_einsum(main, [1, c.bm, c.bn, c.bk])
        batch, i, j, kk = sch.get_loops(main)
        i, ii = sch.split(i, [None, 16])
        j, ji = sch.split(j, [None, 16])
        kk, ki = sch.split(kk, [None, 16])
        sch.reorder(i, j, kk, ii, ji, ki)
        inner = main
        outer = sch.blockize(ii)

        tm, tn = c.bm // c.wm // 16, c.bn // c.wn // 16  # 16×16 tiles per warp
        i0, i1, i2 = sch.split(i, [None, c.wm, tm])
        j0, j1, j2 = sch.split(j, [None, c.wn, tn])
        k0, k1 = sch.split(kk, [None, c.bk // 16])
        n_tiles = -(-n // c.bn)
        raster = next(r for r in (c.raster, 8, 4, 2, 1) if r and n_tiles % r == 0)
        jp, jr = sch.split(j0, [None, raster])
        sch.reorder(batch, jp, i0, jr, i1, j1, k0, k1, i2, j2)
        # Launch order is x fastest: a panel of `raster` N-tiles sweeps down M, then the next.
        sch.bind(jr, "blockIdx.x")
        sch.bind(i0, "blockIdx.y")
        sch.bind(sch.fuse(batch, jp), "blockIdx.z")
        for loop in (k1, i2, j2):
            _unroll(sch, loop)
        warp = sch.fuse(i1, j1)
        sch.bind(warp, "threadIdx.y")
        n_warps = c.wm * c.wn

        def to_shared(idx):
            blk = sch.cache_read(outer, idx, "shared.dyn")
            sch.compute_at(blk, k0)
            fused = sch.fuse(*sch.get_loops(blk)[-2:])
            f0, f1, f2, f3 = sch.split(fused, [None, n_warps, 32, c.vec])
            sch.bind(f1, "threadIdx.y")
            sch.bind(f2, "threadIdx.x")
            sch.vectorize(f3)
            _unroll(sch, f0)
            if c.swizzle:
                sch.annotate(blk, "permuted_layout", 1)
            else:
                sch.storage_align(blk, 0, axis=-2, factor=16, offset=8)
            return blk

        a_s = to_shared(0)
        b_s = to_shared(1)
        auto_inline_producers(sch, a_s)
        auto_inline_producers(sch, b_s)

        def to_warp(idx, operand):
            blk = sch.cache_read(outer, idx, "warp")
            sch.compute_at(blk, k1)
            sch.transform_layout(blk, ("write", 0), lambda s, x, y: (
                s, x // 16, y // 16, *frag_layout(x % 16, y % 16)))
            _, x1 = _tiles16(sch, blk)
            tile = sch.blockize(x1)
            if c.swizzle:
                sch.annotate(tile, "permuted_layout", 1)
            sch.tensorize(tile, mma_intrin.ldmatrix_name(dtype, operand))
            return blk

        to_warp(0, "a")
        to_warp(1, "b")

        # Epilogue: accumulators → per-warp shared staging → fused elementwise → global. The
        # elementwise ops are inlined into pad_einsum's un-padding copy, not into the staging
        # block: computed at the tile, that copy keeps its `row < M` guard.
        c_s = sch.cache_write(outer, 0, "shared.dyn")
        (epi,) = sch.get_consumers(c_s)
        auto_inline_consumer_chain(sch, epi)
        sch.compute_inline(c_s)
        c_w = sch.cache_write(outer, 0, "warp")
        sch.reverse_compute_at(c_w, warp)
        y0, _ = _tiles16(sch, c_w)
        sch.reverse_compute_at(epi, warp if c.warp_epilogue else y0)
        fused = sch.fuse(*sch.get_loops(epi)[-2:])
        f0, f1, f2 = sch.split(fused, [None, 32, c.vec])
        sch.bind(f1, "threadIdx.x")
        sch.vectorize(f2)
        _unroll(sch, f0)
        sch.transform_layout(c_w, ("read", 0), lambda s, x, y: (
            s, x // 16, y // 16, *frag_layout(x % 16, y % 16)))

        init = sch.decompose_reduction(outer, k0)
        for loop in sch.get_loops(init)[-2:]:
            _unroll(sch, loop)
        sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2], mma_intrin.FILL)
        sch.tensorize(sch.get_loops(c_w)[-2], mma_intrin.STORE)
        sch.tensorize(sch.get_loops(inner)[-3], mma_intrin.mma_name(dtype))

        if c.stages > 1:
            sch.annotate(k0, "software_pipeline_stage", [0, 0, c.stages - 1])
            sch.annotate(k0, "software_pipeline_order", [0, 1, 2])
            sch.annotate(k0, "software_pipeline_async_stages", [0])
        return sch, m_ext, n_tiles
