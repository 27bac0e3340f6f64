"""The stand-alone dequantize kernel of prefill: packed code words and scales → W[N, K] (bf16/fp16).

For many rows the quantized model dequantizes each weight into a temporary and runs the tensor-core
GEMM on it. That kernel writes 2 bytes per weight and reads ~0.5–1, so it is a copy: each thread
makes 8 consecutive outputs (one 16-byte store; a warp stores 512 contiguous bytes) from the code
words and scales they share, so that it runs near the card's copy bandwidth.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import get_root_block

from .quant_gemv import is_packed

PER_THREAD = 8  # outputs per thread: 16 bytes of bf16/fp16
THREADS = 256


class QuantDequantize:
    """A PrimFunc of spatial blocks only, reading packed uint32 words and writing one [N, K] output."""

    def kernel(self, func: tirx.PrimFunc) -> tirx.PrimFunc | None:
        """`func` scheduled, or None if not ours."""
        if not any(is_packed(p) for p in func.params if hasattr(p, "shape")):
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(get_root_block(sch))
        if any(iv.iter_type != tirx.IterVar.DataPar for b in blocks for iv in sch.get(b).iter_vars):
            return None
        try:
            for block in blocks[:-1]:
                sch.compute_inline(block)
        except s_tir.ScheduleError:
            return None
        out = blocks[-1]
        loops = sch.get_loops(out)
        stmt = sch.get(out)
        k_ext = stmt.iter_vars[-1].dom.extent if stmt.iter_vars else None
        if (len(loops) != 2 or len(stmt.iter_vars) != 2 or not isinstance(k_ext, tirx.IntImm)
                or int(k_ext) % PER_THREAD or stmt.writes[0].source.dtype.bits != 16):
            return None
        n, k = loops
        k_o, _ = sch.split(k, [None, PER_THREAD])
        bx, tx = sch.split(sch.fuse(n, k_o), [None, THREADS])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        local = sch.cache_write(out, 0, "local")
        sch.reverse_compute_at(local, tx, preserve_unit_loops=True)
        sch.unroll(sch.get_loops(out)[-1])
        sch.vectorize(sch.get_loops(local)[-1])
        return sch.mod["main"]
