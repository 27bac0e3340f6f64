"""RowReduction: lone non-sum reductions (max over the vocabulary) get a thread block per row.

Compile-only on CUDA (no GPU in CI; bench/sampling_kernels.py checks the results on a GPU): the rule
must take what dlight leaves to Fallback, decline what dlight's reduction rules schedule, and the
sampler's max must come out as a cross-thread reduction rather than one thread per row.
"""

from __future__ import annotations

import os
import sys

import pytest
import tvm
from tvm import te, tirx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from schedules.pipeline import gpu_rules  # noqa: E402
from schedules.row_reduction import RowReduction  # noqa: E402

H100 = tvm.target.Target("nvidia/nvidia-h100")


def row_reduce(combine) -> tirx.PrimFunc:
    """out[b, 1] = combine over v of x[b, v], with b and v dynamic (as the sampler's functions)."""
    b, v = tirx.Var("b", "int64"), tirx.Var("vocab", "int64")
    x = te.placeholder((b, v), "float32", name="x")
    r = te.reduce_axis((tirx.IntImm("int64", 0), v), "r")
    out = te.compute((b, tirx.IntImm("int64", 1)), lambda i, _: combine(x[i, r], axis=r), name="out")
    return te.create_prim_func([x, out])


def first_rule(func):
    with H100:
        for rule in gpu_rules(H100):
            if rule.apply(func, H100, False) is not None:
                return type(rule).__name__
    return None


@pytest.mark.parametrize("combine", [te.max, te.min])
def test_lone_max_and_min_get_row_reduction_not_fallback(combine):
    assert first_rule(row_reduce(combine)) == "RowReduction"


def test_sums_stay_with_dlight():
    assert first_rule(row_reduce(te.sum)) == "Reduction"


def test_max_compiles_to_a_cross_thread_reduction():
    sch = RowReduction().apply(row_reduce(te.max), H100, False)
    with H100:
        lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "row_max")}),
                          target=H100)
    src = lib.mod.imports[0].inspect_source()
    assert "blockIdx.x" in src and "__shfl_down_sync" in src and "__syncthreads" in src


def test_declines_elementwise_and_multi_block_functions():
    b = tirx.Var("b", "int64")
    x = te.placeholder((b, tirx.IntImm("int64", 8)), "float32", name="x")
    doubled = te.compute(x.shape, lambda i, j: x[i, j] * 2, name="doubled")
    r = te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", 8)), "r")
    top = te.compute((b,), lambda i: te.max(doubled[i, r], axis=r), name="top")
    assert RowReduction().apply(te.create_prim_func([x, doubled]), H100, False) is None
    assert RowReduction().apply(te.create_prim_func([x, top]), H100, False) is None
