"""StreamingGEMV (schedules/low_batch.py): the decode GEMV on CUDA, compile-only (no GPU here).

Every model shape, at each row bucket the dispatch uses, must get Kiln's schedule: 128-thread blocks,
16-byte weight loads, all of a step's weight loads issued before its multiplies, a warp-shuffle
reduction and no local-memory spill; what the schedule does not cover (Metal, K off the 16-byte
lane grid) must get dlight's LowBatchGEMV unchanged. bench/gemm.py checks the numbers on a GPU
(every M from 1 to 8 against torch) and times them against the copy bandwidth.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import tvm
import tvm_ffi
from tvm.s_tir import dlight as dl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from schedules.low_batch import LIMITS_AND_BUCKETS, ONE_COLUMN_MIN_K, ONE_COLUMN_N, UNROLL, StreamingGEMV  # noqa: E402
from schedules.matmul_tensorcore import TIR_PIPELINE  # noqa: E402
from tests.test_gemm_schedule import H100, MODEL_SHAPES, nt_matmul  # noqa: E402

BUCKETS = [bucket for _, bucket in LIMITS_AND_BUCKETS]


def kernel_source(funcs: dict) -> str:
    with H100:
        lib = tvm.tirx.build(tvm.IRModule(funcs), target=H100, pipeline=TIR_PIPELINE)
    return lib.imports[0].inspect_source()


def test_every_model_shape_streams_its_weights(tmp_path):
    funcs = {}
    for k, n in MODEL_SHAPES:
        for bucket in BUCKETS:
            sch = StreamingGEMV(bucket).apply(nt_matmul(k, n), H100, False)
            name = f"gemv_{k}_{n}_{bucket}"
            funcs[name] = sch.mod["main"].with_attr("global_symbol", name)
            blocks = re.search(r'thread_binding\(T.int64\((\d+)\), thread="blockIdx.x"', funcs[name].script())
            narrow = bucket <= 2 and n <= ONE_COLUMN_N and k >= ONE_COLUMN_MIN_K
            assert (n // int(blocks.group(1)) // 4 == 1) >= narrow, name  # a warp's output columns
    check_streaming_kernels(funcs, tmp_path)


def check_streaming_kernels(funcs: dict, tmp_path) -> None:
    """Each of `funcs` compiles to one 128-thread kernel that loads its weights before x and reduces with
    warp shuffles; nvcc (where present) builds them all without a spill."""
    src = kernel_source(funcs)
    kernels = re.split(r'extern "C" __global__ void ', src)[1:]
    bodies = {re.match(r"(?:__launch_bounds__\(\d+\) )?(\w+)", k).group(1): k for k in kernels if "{" in k}
    assert len(bodies) == len(funcs)
    for name, body in bodies.items():
        assert body.startswith("__launch_bounds__(128)"), name
        assert "__shfl_down_sync" in body, name
        assert 0 <= body.find("= *(uint4*)(w_ptr") < body.find("= *(uint4*)(x_ptr"), name  # weights first
    if shutil.which("nvcc"):
        cu = tmp_path / "gemv.cu"
        cu.write_text(src)
        ptxas = subprocess.run(["nvcc", "--cubin", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas=-v",
                                "-o", str(tmp_path / "gemv.cubin"), str(cu)], capture_output=True, text=True,
                               timeout=900)
        assert ptxas.returncode == 0, ptxas.stderr[-2000:]
        assert "spill" in ptxas.stderr and not re.search(r"[1-9]\d* bytes spill", ptxas.stderr)


@pytest.mark.parametrize("bucket, k, n, columns, steps", [(4, 14336, 4096, 2, UNROLL), (2, 4096, 28672, 2, UNROLL),
                                                         (2, 14336, 4096, 1, 2 * UNROLL)])
def test_long_k_weight_loads_in_flight_together(bucket, k, n, columns, steps):
    """Llama's down projection (K = 14336): `steps` K steps × `columns` columns of 16-byte loads before the first
    multiply; the 2-row bucket (N ≤ ONE_COLUMN_N, K ≥ ONE_COLUMN_MIN_K) takes one column and twice the steps."""
    sch = StreamingGEMV(bucket).apply(nt_matmul(k, n), H100, False)
    src = kernel_source({"down": sch.mod["main"].with_attr("global_symbol", "down")})
    step = src[src.index("for (int64_t"):]
    step = step[:step.index("condval")]  # a K step up to its first load of x
    assert len(re.findall(r"= \*\(uint4\*\)\(w_ptr", step)) == 1  # one vectorized statement ...
    assert re.search(rf"ax\d+ < {steps}; \+\+ax", step)  # ... in a loop over the steps ...
    assert (re.search(r"for \(int ax\d+ = 0; ax\d+ < 2; \+\+ax", step) is not None) == (columns == 2)  # ... and columns


@pytest.mark.parametrize("k, n, columns", [(1024, 6144, 1), (512, 4096, 2), (1024, 8192, 2)])
def test_one_column_only_where_measured(k, n, columns):
    """The 2-row bucket's one-column tiling stays within the measured shapes (K ≥ ONE_COLUMN_MIN_K, N ≤
    ONE_COLUMN_N); elsewhere (the tiny test models' K = 256–512, wide N) the default two columns."""
    script = StreamingGEMV(2).apply(nt_matmul(k, n), H100, False).mod["main"].script()
    blocks = int(re.search(r'thread_binding\(T.int64\((\d+)\), thread="blockIdx.x"', script).group(1))
    assert n // blocks // 4 == columns


@pytest.mark.parametrize("target, k", [(tvm.target.Target("apple/m2-gpu"), 4096), (H100, 1000)])
def test_declines_to_dlight_where_it_does_not_apply(target, k):
    ours = StreamingGEMV(4).apply(nt_matmul(k, 1024), target, False)
    theirs = dl.gpu.LowBatchGEMV(4).apply(nt_matmul(k, 1024), target, False)
    assert tvm_ffi.structural_equal(ours.mod, theirs.mod)
