"""Hopper GEMM rule (sm_90a): TMA loads + wgmma, warp-specialized, with the PrimFunc's own epilogue.

mma.sync (MatmulTensorCore) tops out near half of cuBLAS on an H100; cuBLAS runs wgmma. This rule
takes the same matmul PrimFuncs — C[.., i, j] = Σ_k A[.., i, k]·B[j, k] in fp32 over fp16/bf16,
followed by elementwise ops (cast, residual or bias add) — and writes one hand-made kernel for them:

  block tile BM×BN×64, BM = 64 × consumer warpgroups; one extra producer warpgroup;
  producer: one thread issues two TMA loads per k-step (A and B tiles, 128-byte swizzle, zero fill
            past M, N and K) into a `stages`-deep ring, each stage guarded by a full/empty mbarrier pair;
  consumers: per k-step four wgmma.m64nBNk16 from shared-memory descriptors, one group kept in
            flight (a stage is released once the next group is issued);
  epilogue: each thread applies the PrimFunc's elementwise chain to its accumulators and stores two
            adjacent outputs at once (rows ≥ M skipped);
  persistent grid: min(132, tiles) blocks loop over the tiles, so the producer loads the next tile
            while the consumers store.

Few rows (9–128, decode batches): the same kernel with swapped roles (`WgmmaConfig.swap`, the
`MIDDLE` tilings): the weight rows are wgmma's M and the activation rows its N (a bucket of 32, 64 or
128), so a batch of 16 is not padded to 64; where N's tiles leave SMs idle, K is split and a second
kernel adds the fp32 partial sums and applies the epilogue. Llama-3.1-8B's projections at 16 rows
stream their weights at 73–98% of the copy rate, where the 128-row tiles reached 39–92%
(bench/RESULTS.md, "The middle").

The tensor maps are encoded on the host at every call (`runtime.cuTensorMapEncodeTiled`) and reach
the kernel as __grid_constant__ parameters, so M may be dynamic. Anything else (other layouts,
batch dimensions, reductions in the epilogue) is declined and left to MatmulTensorCore.
Measured on an H100: 89% of cuBLAS (geomean, Llama-3.1-8B shapes, M ≥ 512; docs/gemm.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace

from tvm import ir, s_tir, tirx
from tvm.ir.prim import expr as E
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.s_tir.dlight.gpu.matmul import get_reduction_blocks
from tvm.script import tirx as T

from . import hopper_ptx as ptx
from .low_batch import RowDispatchGemmRule, branch_on_rows

BK = 64  # k elements per stage: one 128-byte swizzled row of 16-bit values
DTYPES = ("float16", "bfloat16")


@dataclass(frozen=True)
class WgmmaConfig:
    """One tiling. `bn` is the wgmma N (≤ 256); each consumer warpgroup owns 64 rows."""

    bn: int = 256
    consumers: int = 2
    stages: int = 4
    raster: int = 8  # N-tiles per panel: consecutive blocks sweep down M within a panel (L2 reuse)
    setmaxnreg: bool = True
    persistent: bool = True  # one block per SM looping over tiles (loads of the next tile overlap the epilogue)
    # Swapped roles (few rows): the weight rows are wgmma's M, the activation rows its N (`bn`, which
    # bounds M), K split where N's tiles are few, up to about `ctas` blocks (see `splits`).
    swap: bool = False
    ctas: int = 132

    @property
    def bm(self) -> int:
        return 64 * self.consumers

    def smem_bytes(self) -> int:
        return 1024 + self.stages * (self.bm + self.bn) * BK * 2 + 2 * self.stages * 8


# Tiling for few rows: 128×128 tiles, 6 stages (the shared memory of 128×256 × 4 stages).
SMALL = WgmmaConfig(bn=128, stages=6)
SMS = 132  # multiprocessors of an H100 SXM (the sm_90a part this rule targets)
# The middle (9–128 rows, decode batches): weight-streaming kernels with swapped roles, one per row
# bucket (its `bn`), each taking M up to its bucket. 64 weight rows a block up to 64 activation rows
# (twice the tiles, so fewer splits; Llama's QKV at 16 rows: 81% of copy bandwidth against 69% with
# 128), 128 for the last bucket (gate/up at 128 rows: 91% against 80%); 10–12 stages where they fit
# in ~200 KB of shared memory (bench/RESULTS.md, "The middle"). Their few accumulators need no register
# re-balancing (ptxas ignores setmaxnreg in kernels this small).
MIDDLE = tuple(WgmmaConfig(bn=bn, consumers=consumers, stages=stages, swap=True, persistent=False,
                           setmaxnreg=False)
               for bn, consumers, stages in ((32, 1, 12), (64, 1, 10), (128, 2, 5)))
MIN_SPLIT_STEPS = 4  # k-steps of 64 each split keeps at least (its pipeline has to fill)


def splits(tiles: int, k_steps: int, ctas: int) -> int:
    """How many parts K is cut into: 1 unless the `tiles` fill less than a quarter of `ctas` blocks (the
    partial sums' round trip and second kernel cost more than the idle SMs: Llama's O at 16 rows, 64
    tiles, streams at 73% of copy bandwidth unsplit and 63% in two halves), else the largest divisor of
    `k_steps` that keeps tiles × parts within `ctas` and each part at least MIN_SPLIT_STEPS long."""
    if 4 * tiles > ctas:
        return 1
    return max(d for d in range(1, k_steps + 1)
               if k_steps % d == 0 and tiles * d <= ctas and (d == 1 or k_steps // d >= MIN_SPLIT_STEPS))


class _Decline(Exception):
    """The PrimFunc is not a form this rule handles."""


def _rebuild(expr, vmap, acc_buffer, acc_value, acc_vars):
    """`expr` with block variables replaced through `vmap` and loads of `acc_buffer` (at exactly
    `acc_vars`: elementwise) by `acc_value`."""
    if isinstance(expr, (E.IntImm, E.FloatImm)):
        return expr
    if isinstance(expr, ir.expr.Var):
        if expr in vmap:
            return vmap[expr]
        return expr
    if isinstance(expr, ir.expr.TensorLoad):
        if expr.source.same_as(acc_buffer):
            if len(expr.indices) != len(acc_vars) or not all(map(_is_var, expr.indices, acc_vars)):
                raise _Decline("epilogue reads the accumulator at another position")
            return acc_value
        return tirx.BufferLoad(expr.source, [_rebuild(i, vmap, acc_buffer, acc_value, acc_vars) for i in expr.indices])
    if isinstance(expr, E.Cast):
        return E.Cast(expr.ty.dtype, _rebuild(expr.value, vmap, acc_buffer, acc_value, acc_vars))
    for op in (E.Add, E.Sub, E.Mul, E.Div, E.Max, E.Min, E.FloorDiv, E.FloorMod):
        if isinstance(expr, op):
            return op(*(_rebuild(x, vmap, acc_buffer, acc_value, acc_vars) for x in (expr.a, expr.b)))
    raise _Decline(f"epilogue expression {type(expr).__name__}")


def _is_var(e, v) -> bool:
    return isinstance(e, ir.expr.Var) and e.same_as(v)


def analyze(func: tirx.PrimFunc):
    """(A, B, output, M, K, N, epilogue(row, col, acc) → value, out_index(row, col)) or _Decline."""
    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(get_root_block(sch))
    reduction = get_reduction_blocks(sch, blocks)
    if reduction is None or len(reduction) != 1:
        raise _Decline("no single reduction block")
    main = reduction[0]
    stmt = sch.get(main)
    if len(stmt.reads) != 2 or len(stmt.writes) != 1 or not isinstance(stmt.body, tirx.stmt.BufferStore):
        raise _Decline("not a two-operand reduction")
    ivs = [iv.var for iv in stmt.iter_vars]
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    if kinds[-1] != tirx.IterVar.CommReduce or any(k != tirx.IterVar.DataPar for k in kinds[:-1]):
        raise _Decline("iterators are not [spatial..., reduce]")
    lead, j, k = ivs[:-2], ivs[-2], ivs[-1]
    c_store = stmt.body
    c_buf = c_store.buffer
    if len(c_store.indices) != len(lead) + 1 or not all(_is_var(e, v) for e, v in zip(c_store.indices, [*lead, j])):
        raise _Decline("output index")
    a_buf, b_buf = (r.source for r in stmt.reads)
    if any(buf.same_as(t) for t in func.body.block.alloc_buffers for buf in (a_buf, b_buf)):
        raise _Decline("an operand is computed in the kernel (a fused dequantize), not loadable by TMA")
    a_idx, b_idx = ([*lead, k], [j, k])
    loads = []

    def collect(e):
        if isinstance(e, ir.expr.TensorLoad) and not e.source.same_as(c_buf):
            loads.append(e)

    value = c_store.value  # C + cast(A) * cast(B)
    if not isinstance(value, E.Add) or not isinstance(value.b, E.Mul):
        raise _Decline("reduction body")
    for side in (value.b.a, value.b.b):
        collect(side.value if isinstance(side, E.Cast) else side)
    if len(loads) != 2:
        raise _Decline("reduction operands")
    if loads[0].source.same_as(b_buf):
        loads.reverse()
        a_buf, b_buf = b_buf, a_buf
    if not all(_is_var(e, v) for e, v in zip(loads[0].indices, a_idx)) or len(loads[0].indices) != len(a_idx):
        raise _Decline("A index")
    if not all(_is_var(e, v) for e, v in zip(loads[1].indices, b_idx)) or len(loads[1].indices) != 2:
        raise _Decline("B index")
    if any(not (isinstance(x.elem_offset, E.IntImm) and int(x.elem_offset) == 0) for x in (a_buf, b_buf)):
        raise _Decline("TMA needs the operands at their buffer's start")
    dtype = str(a_buf.dtype)
    if dtype not in DTYPES or str(b_buf.dtype) != dtype or str(c_buf.dtype) != "float32":
        raise _Decline("dtypes")
    n_ext, k_ext = b_buf.shape
    if not isinstance(n_ext, E.IntImm) or not isinstance(k_ext, E.IntImm):
        raise _Decline("N and K must be static")
    n, kk = int(n_ext), int(k_ext)
    if kk % 8 or n % 8 or list(map(str, a_buf.shape[-1:])) != [str(k_ext)]:
        raise _Decline("K, N must be multiples of 8 (TMA strides)")
    lead_ext = list(c_buf.shape[:-1])
    if list(map(str, a_buf.shape[:-1])) != list(map(str, lead_ext)):
        raise _Decline("A's rows are not C's rows")  # TMA reads A as a dense [M, K] matrix
    rows = [i for i, d in enumerate(lead_ext) if not (isinstance(d, E.IntImm) and int(d) == 1)]
    if len(rows) > 1:
        raise _Decline("more than one row dimension")
    m_ext = lead_ext[rows[0]] if rows else tirx.IntImm("int64", 1)

    # The elementwise chain after the matmul, inlined into its last block.
    rest = [b for b in blocks if not sch.get(b).same_as(stmt)]
    try:
        for blk in rest[:-1]:
            sch.compute_inline(blk)
    except Exception as err:  # noqa: BLE001 (a schedule error means: not elementwise)
        raise _Decline(f"epilogue not inlinable: {err}") from err
    if rest:
        last = sch.get(rest[-1])
        store = last.body
        if not isinstance(store, tirx.stmt.BufferStore):
            raise _Decline("epilogue body")
        evs = [iv.var for iv in last.iter_vars]
        if any(iv.iter_type != tirx.IterVar.DataPar for iv in last.iter_vars) or len(evs) != len(lead) + 1:
            raise _Decline("epilogue iterators")
        if not all(_is_var(e, v) for e, v in zip(store.indices, evs)) or list(map(str, store.buffer.shape)) != list(map(str, c_buf.shape)):
            raise _Decline("epilogue index")
        out_buf, out_value, out_vars = store.buffer, store.value, evs
    else:
        out_buf, out_value, out_vars = c_buf, tirx.BufferLoad(c_buf, [*lead, j]), [*lead, j]

    def mapping(row, col):
        vm = {}
        for t, v in enumerate(out_vars[:-1]):
            vm[v] = tirx.Cast(v.ty.dtype, row) if t in rows else tirx.IntImm(v.ty.dtype, 0)
        vm[out_vars[-1]] = tirx.Cast(out_vars[-1].ty.dtype, col)
        return vm

    def epilogue(row, col, acc):
        return _rebuild(out_value, mapping(row, col), c_buf, acc, out_vars)

    def out_index(row, col):
        vm = mapping(row, col)
        return [vm[v] for v in out_vars]

    probe = tirx.Var("row", "int32")
    epilogue(probe, probe, tirx.FloatImm("float32", 0.0))  # declines unsupported epilogues here
    return SimpleNamespace(a=a_buf, b=b_buf, out=out_buf, m=m_ext, k=kk, n=n, dtype=dtype,
                           epilogue=epilogue, out_index=out_index)


def gemm_kernel(g, cfg: WgmmaConfig) -> tirx.PrimFunc:
    """The kernel for the analysed matmul `g` (see `analyze`): a PrimFunc without parameters whose
    body refers to `g`'s buffers; the rule puts that body under the original signature.

    With `cfg.swap` the wgmma's A operand (64 rows per consumer warpgroup) is the weight W[N, K] and
    its B operand the activation rows (at most `cfg.bn`, the TMA zero-fills the rest): a decode batch
    costs no padding to 64 rows, and the N / BM weight tiles times the K splits keep every SM
    streaming. Each split writes fp32 partial sums to a workspace; a second kernel adds them up and
    applies the epilogue (one split: the epilogue is applied in place)."""
    BM, BN, ST, NC = cfg.bm, cfg.bn, cfg.stages, cfg.consumers
    A_BYTES, B_BYTES = BM * BK * 2, BN * BK * 2
    STAGE = A_BYTES + B_BYTES
    BARS = ST * STAGE
    KT = -(-g.k // BK)
    n_tiles = 1 if cfg.swap else -(-g.n // BN)
    split = splits(-(-g.n // BM), KT, cfg.ctas) if cfg.swap else 1
    panel = next(p for p in (cfg.raster, 8, 4, 2, 1) if p and n_tiles % p == 0)
    regs = BN // 2
    m32 = T.Cast("int32", g.m)
    K = SimpleNamespace(
        BM=BM, BN=BN, ST=ST, NC=NC, A_BYTES=A_BYTES, STAGE=STAGE, BARS=BARS, KT=KT // split, NT=128 * (NC + 1),
        N_TILES=n_tiles, PANEL=panel, REGS=regs, N=g.n, K=g.k, dtype=g.dtype, n_guard=g.n % BN != 0,
        SMEM_HALVES=cfg.smem_bytes() // 2, M=g.m, M32=m32, epi=g.epilogue, setmaxnreg=cfg.setmaxnreg,
        swap=cfg.swap, SPLITS=split, m_guard=g.n % BM != 0,
        # the operands as TMA sees them: (data, rows, box rows); wgmma's M side first
        a_data=g.b.data if cfg.swap else g.a.data, b_data=g.a.data if cfg.swap else g.b.data,
        A_ROWS=T.int64(g.n) if cfg.swap else T.Cast("int64", g.m),
        B_ROWS=T.Cast("int64", g.m) if cfg.swap else T.int64(g.n),
        M_TILES=(g.n + BM - 1) // BM if cfg.swap else T.truncdiv(m32 + (BM - 1), BM),
        load_out=lambda row, col: tirx.BufferLoad(g.out, g.out_index(row, col)),
        store_out=lambda row, col, acc: T.buffer_store(g.out, g.epilogue(row, col, acc), g.out_index(row, col)),
        # blocks: one a tile (a static count when swapped: N's tiles times the splits), or persistent
        GRID=SMS if cfg.persistent else -(-g.n // BM) * split if cfg.swap else 1 << 30,
        PAIR=ptx.store_pair(str(g.out.dtype)),
        tma_a=tirx.Var("A_tensormap", ty=T.handle("tensormap").ty),
        tma_b=tirx.Var("B_tensormap", ty=T.handle("tensormap").ty))
    assert not cfg.persistent or split == 1, "split K needs one tile per block"
    ws = tirx.decl_buffer((split, BN, g.n), "float32", name="split_k_partials") if split > 1 else None
    K.ws_store = lambda s, row, col, v: T.buffer_store(ws, v, [s, row, col])
    K.ws_sum = lambda row, col: functools.reduce(
        lambda x, y: x + y, [tirx.BufferLoad(ws, [s, row, col]) for s in range(split)])
    K.PAD, K.INIT, K.INIT_FENCE, K.EXPECT, K.ARRIVE, K.WAIT = (
        ptx.SMEM_ALIGN_PAD, ptx.MBAR_INIT, ptx.MBAR_INIT_FENCE, ptx.MBAR_EXPECT_TX, ptx.MBAR_ARRIVE, ptx.MBAR_WAIT)
    K.TMA, K.FENCE, K.COMMIT, K.DESC = ptx.TMA_LOAD_2D, ptx.WGMMA_FENCE, ptx.WGMMA_COMMIT, ptx.DESC_SW128
    # wait_group 0 that also pins the accumulators (no reads before it, no writes moved after a wgmma)
    K.WAIT0_ACC, K.WAIT1 = ptx.wgmma_wait(0, regs), ptx.wgmma_wait(1)
    K.MMA = ptx.wgmma_ss(BN, g.dtype)
    K.DEC, K.INC = ptx.setmaxnreg(40, False), ptx.setmaxnreg(232, True)

    # pylint: disable=invalid-name,unused-variable
    @T.prim_func(s_tir=True, check_well_formed=False)
    def gemm():
        T.Bind(T.tvm_stack_alloca("tensormap", 1), var=K.tma_a)
        T.tensormap_encode_tiled(K.tma_a, K.a_data, T.int64(K.K), K.A_ROWS, T.int64(K.K * 2),
                                 T.int32(64), T.int32(K.BM), T.int32(1), T.int32(1),
                                 descriptor_dtype=K.dtype, rank=2, swizzle=3)
        T.Bind(T.tvm_stack_alloca("tensormap", 1), var=K.tma_b)
        T.tensormap_encode_tiled(K.tma_b, K.b_data, T.int64(K.K), K.B_ROWS, T.int64(K.K * 2),
                                 T.int32(64), T.int32(K.BN), T.int32(1), T.int32(1),
                                 descriptor_dtype=K.dtype, rank=2, swizzle=3)
        for bx in T.thread_binding(T.min(K.M_TILES * K.N_TILES * K.SPLITS, K.GRID), thread="blockIdx.x"):
            for tid in T.thread_binding(K.NT, thread="threadIdx.x"):
                with T.sblock("gemm"):
                    T.reads()
                    T.writes()
                    smem = T.sblock_alloc_buffer((K.SMEM_HALVES,), "uint16", scope="shared.dyn")
                    acc = T.sblock_alloc_buffer((K.REGS,), "float32", scope="local")
                    m_tiles: T.let[T.int32] = K.M_TILES
                    units: T.let[T.int32] = m_tiles * K.N_TILES * K.SPLITS
                    pad: T.let[T.int32] = T.cuda.func_call(K.PAD[0], smem.data, source_code=K.PAD[1], return_type="int32")
                    wg: T.let[T.int32] = tid // 128
                    if tid == 0:
                        for s in T.unroll(K.ST):
                            T.evaluate(T.cuda.func_call(K.INIT[0], smem.data, pad + K.BARS + s * 8, 1, source_code=K.INIT[1]))
                            T.evaluate(T.cuda.func_call(K.INIT[0], smem.data, pad + K.BARS + (K.ST + s) * 8, K.NC * 128, source_code=K.INIT[1]))
                    T.evaluate(T.cuda.func_call(K.INIT_FENCE[0], source_code=K.INIT_FENCE[1]))
                    if wg == K.NC:  # producer warpgroup
                        if K.setmaxnreg:
                            T.evaluate(T.cuda.func_call(K.DEC[0], source_code=K.DEC[1]))
                        if tid == K.NC * 128:
                            for t in T.serial(T.truncdiv(units - bx + K.GRID - 1, K.GRID)):
                                tile: T.let[T.int32] = T.truncmod(bx + t * K.GRID, m_tiles * K.N_TILES)
                                k0: T.let[T.int32] = T.truncdiv(bx + t * K.GRID, m_tiles * K.N_TILES) * K.KT
                                tile_m: T.let[T.int32] = T.truncdiv(T.truncmod(tile, K.PANEL * m_tiles), K.PANEL)
                                tile_n: T.let[T.int32] = T.truncdiv(tile, K.PANEL * m_tiles) * K.PANEL + T.truncmod(tile, K.PANEL)
                                for kt in T.serial(K.KT):
                                    it: T.let[T.int32] = t * K.KT + kt
                                    if it >= K.ST:
                                        T.evaluate(T.cuda.func_call(K.WAIT[0], smem.data, pad + K.BARS + (K.ST + it % K.ST) * 8, (it // K.ST + 1) % 2, source_code=K.WAIT[1]))
                                    T.evaluate(T.cuda.func_call(K.EXPECT[0], smem.data, pad + K.BARS + (it % K.ST) * 8, K.STAGE, source_code=K.EXPECT[1]))
                                    T.evaluate(T.cuda.func_call(K.TMA[0], smem.data, pad + (it % K.ST) * K.STAGE, T.address_of(K.tma_a), pad + K.BARS + (it % K.ST) * 8,
                                                                (k0 + kt) * 64, tile_m * K.BM, source_code=K.TMA[1]))
                                    T.evaluate(T.cuda.func_call(K.TMA[0], smem.data, pad + (it % K.ST) * K.STAGE + K.A_BYTES, T.address_of(K.tma_b), pad + K.BARS + (it % K.ST) * 8,
                                                                (k0 + kt) * 64, tile_n * K.BN, source_code=K.TMA[1]))
                    else:  # consumer warpgroups: 64 rows each
                        if K.setmaxnreg:
                            T.evaluate(T.cuda.func_call(K.INC[0], source_code=K.INC[1]))
                        for t in T.serial(T.truncdiv(units - bx + K.GRID - 1, K.GRID)):
                            tile: T.let[T.int32] = T.truncmod(bx + t * K.GRID, m_tiles * K.N_TILES)
                            part: T.let[T.int32] = T.truncdiv(bx + t * K.GRID, m_tiles * K.N_TILES)
                            tile_m: T.let[T.int32] = T.truncdiv(T.truncmod(tile, K.PANEL * m_tiles), K.PANEL)
                            tile_n: T.let[T.int32] = T.truncdiv(tile, K.PANEL * m_tiles) * K.PANEL + T.truncmod(tile, K.PANEL)
                            for i in T.unroll(K.REGS):
                                acc[i] = T.float32(0)
                            T.evaluate(T.cuda.func_call(K.WAIT0_ACC[0], T.tvm_access_ptr(T.type_annotation("float32"), acc.data, 0, K.REGS, 3), source_code=K.WAIT0_ACC[1]))
                            for kt in T.serial(K.KT):
                                it: T.let[T.int32] = t * K.KT + kt
                                T.evaluate(T.cuda.func_call(K.WAIT[0], smem.data, pad + K.BARS + (it % K.ST) * 8, (it // K.ST) % 2, source_code=K.WAIT[1]))
                                T.evaluate(T.cuda.func_call(K.FENCE[0], source_code=K.FENCE[1]))
                                for kk in T.unroll(4):
                                    T.evaluate(T.cuda.func_call(
                                        K.MMA[0], T.tvm_access_ptr(T.type_annotation("float32"), acc.data, 0, K.REGS, 3),
                                        T.cuda.func_call(K.DESC[0], smem.data, pad + (it % K.ST) * K.STAGE + wg * 8192 + kk * 32, 16, 1024,
                                                         source_code=K.DESC[1], return_type="uint64"),
                                        T.cuda.func_call(K.DESC[0], smem.data, pad + (it % K.ST) * K.STAGE + K.A_BYTES + kk * 32, 16, 1024,
                                                         source_code=K.DESC[1], return_type="uint64"),
                                        1, source_code=K.MMA[1]))
                                T.evaluate(T.cuda.func_call(K.COMMIT[0], source_code=K.COMMIT[1]))
                                T.evaluate(T.cuda.func_call(K.WAIT1[0], source_code=K.WAIT1[1]))
                                if kt > 0:  # the previous stage's wgmma group is done: release it
                                    T.evaluate(T.cuda.func_call(K.ARRIVE[0], smem.data, pad + K.BARS + (K.ST + (it + K.ST - 1) % K.ST) * 8, source_code=K.ARRIVE[1]))
                            T.evaluate(T.cuda.func_call(K.WAIT0_ACC[0], T.tvm_access_ptr(T.type_annotation("float32"), acc.data, 0, K.REGS, 3), source_code=K.WAIT0_ACC[1]))
                            T.evaluate(T.cuda.func_call(K.ARRIVE[0], smem.data, pad + K.BARS + (K.ST + (t * K.KT + K.KT - 1) % K.ST) * 8, source_code=K.ARRIVE[1]))
                            # accumulator i: row lane/4 (+8 for i % 4 >= 2) of the warp's 16, column pair 8·(i/4) + 2·(lane%4)
                            for i in T.unroll(K.REGS // 2):
                                row: T.let[T.int32] = tile_m * K.BM + wg * 64 + (tid % 128) // 32 * 16 + (tid % 32) // 4 + 8 * (i % 2)
                                col: T.let[T.int32] = tile_n * K.BN + 8 * (i // 2) + 2 * (tid % 4)
                                if K.swap:  # row: an output column; col, col + 1: two activation rows
                                    if K.SPLITS > 1:
                                        if col < K.M32 and (not K.m_guard or row < K.N):
                                            K.ws_store(part, col, row, acc[2 * i])
                                            K.ws_store(part, col + 1, row, acc[2 * i + 1])
                                    elif not K.m_guard or row < K.N:
                                        if col < K.M32:
                                            K.store_out(col, row, acc[2 * i])
                                        if col + 1 < K.M32:
                                            K.store_out(col + 1, row, acc[2 * i + 1])
                                elif row < K.M32 and (not K.n_guard or col < K.N):
                                    T.evaluate(T.cuda.func_call(K.PAIR[0], T.address_of(K.load_out(row, col)), K.epi(row, col, acc[2 * i]),
                                                                K.epi(row, col + 1, acc[2 * i + 1]), source_code=K.PAIR[1]))
        if K.SPLITS > 1:  # the splits' partial sums added up, two adjacent outputs a thread
            for bx in T.thread_binding(T.truncdiv(K.M32 * (K.N // 2) + 255, 256), thread="blockIdx.x"):
                for tx in T.thread_binding(256, thread="threadIdx.x"):
                    with T.sblock("split_k_sum"):
                        T.reads()
                        T.writes()
                        row: T.let[T.int32] = T.truncdiv(bx * 256 + tx, K.N // 2)
                        col: T.let[T.int32] = T.truncmod(bx * 256 + tx, K.N // 2) * 2
                        if row < K.M32:
                            T.evaluate(T.cuda.func_call(K.PAIR[0], T.address_of(K.load_out(row, col)), K.epi(row, col, K.ws_sum(row, col)),
                                                        K.epi(row, col + 1, K.ws_sum(row, col + 1)), source_code=K.PAIR[1]))

    if ws is None:
        return gemm
    root = gemm.body.block
    return gemm.with_body(s_tir.SBlockRealize([], True, s_tir.SBlock(
        [], [], [], root.name_hint, root.body, alloc_buffers=[*root.alloc_buffers, ws])))


class MatmulWgmma(RowDispatchGemmRule):
    """Schedules fp16/bf16 matmuls (fp32 accumulation) on sm_90a with TMA + wgmma (module docstring).

    Returns None (the next rule applies) for other targets and any form `analyze` declines. With a
    dynamic M, the row count picks the kernel at run time (`branch_on_rows`): `small` tiles while
    `large` tiles would fill at most half of the SMs, below that the `middle` kernels (swapped roles,
    each up to its `bn` rows); without them, StreamingGEMV for M ≤ `small_m` when even `small` has
    fewer than `few_tiles` column tiles (N = 1024: 8 blocks for 132 SMs).
    """

    def __init__(self, large: WgmmaConfig | None = None, small: WgmmaConfig | None = SMALL,
                 middle: tuple[WgmmaConfig, ...] = MIDDLE, min_m: int = 64, small_m: int = 32,
                 few_tiles: int = 16):
        super().__init__(min_m, small_m, few_tiles)
        self.large = large or WgmmaConfig()
        self.small = small
        self.middle = middle

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "cuda":
            return None
        if str(target.attrs.get("arch", "")) != "sm_90a":
            return None
        try:
            g = analyze(func)
        except _Decline:
            return None
        if isinstance(g.m, E.IntImm):
            if int(g.m) < self.min_m:
                return None
            return s_tir.Schedule(self._kernel(func, g, self.large))
        result = self._kernel(func, g, self.large)
        small = self.small or self.large
        if self.small is not None:
            # rows up to which `large` has at most half a wave of blocks (`small`: twice as many)
            limit = self.large.bm * (SMS // 2 // -(-g.n // self.large.bn))
            if limit >= self.small.bm:
                result = branch_on_rows(self._kernel(func, g, self.small), result, g.m, limit)
        for cfg in sorted(self.middle, key=lambda c: -c.bn):
            tiles = -(-g.n // cfg.bm)
            if splits(tiles, -(-g.k // BK), cfg.ctas) == 1 and tiles < SMS and tiles <= -(-g.n // small.bn):
                continue  # no more blocks than `small`'s tiles (QKV at 128 rows: 56% of copy against 63%)
            result = branch_on_rows(self._kernel(func, g, cfg), result, g.m, cfg.bn)
        if self.middle:  # they beat StreamingGEMV from 9 rows on, even at N = 1024 (1.4–2.2×)
            return s_tir.Schedule(result)
        return s_tir.Schedule(self.gemv_for_few_rows(func, target, result, g.m, -(-g.n // small.bn)))

    @staticmethod
    def _kernel(func, g, config):
        return func.with_body(gemm_kernel(g, config).body).with_attr("tirx.is_scheduled", True)
