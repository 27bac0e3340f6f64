"""CPU speed of `--quant`'s numpy side: quantize (ggml-exact) and repack, in M weights/s per type.

    python bench/quantize_cpu.py [--rows 1024] [--k 4096] [--types q4_k,q6_k]
Prints wall-clock and CPU-time rates: on a shared machine the CPU-time rate is what one idle core gives.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compile.quantize import quantize  # noqa: E402
from compile.repack import repack  # noqa: E402
from formats.quant_layout import QUANT_TYPES  # noqa: E402


def rates(fn, n_weights: int) -> str:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return f"{n_weights / wall / 1e6:8.2f} wall {n_weights / cpu / 1e6:8.2f} cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--types", default=",".join(QUANT_TYPES))
    args = ap.parse_args()
    x = np.random.default_rng(0).standard_normal((args.rows, args.k)).astype(np.float32)
    print(f"{args.rows} x {args.k} float32, M weights/s")
    for qtype in args.types.split(","):
        blocks = quantize(qtype, x[:8])  # warm-up
        print(f"{qtype:5s} quantize {rates(lambda: quantize(qtype, x), x.size)}", flush=True)
        blocks = quantize(qtype, x)
        print(f"{qtype:5s} repack   {rates(lambda: repack(qtype, blocks, args.k), x.size)}", flush=True)


if __name__ == "__main__":
    main()
