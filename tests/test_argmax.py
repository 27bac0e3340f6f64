"""The compiled greedy argmax (model_defs/sampling.py) equals numpy's, ties included, on the CPU.

Rows are split into slices when the vocabulary allows (two passes: per-slice argmax, then the best
slice), so the cases cover a sliced vocabulary with maxima tied across and within slices, and one
that cannot be sliced (the one-pass fallback). Its speed is bench/sampling_kernels.py's business.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.frontend import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model_defs.sampling import ARGMAX_CHUNKS, SamplingFunctions  # noqa: E402


class Greedy(SamplingFunctions, nn.Module):
    pass


def compiled_argmax(vocab: int):
    spec = {"argmax": {"logits": nn.spec.Tensor(["b", vocab], "float32"),
                       "$": {"param_mode": "none", "effect_mode": "none"}}}
    mod, _ = Greedy().export_tvm(spec=spec)
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
    return lambda x: vm["argmax"](tvm.runtime.tensor(x)).numpy()


@pytest.mark.parametrize("vocab", [ARGMAX_CHUNKS * 37, 1000, 151936])
def test_argmax_equals_numpy_first_maximum(vocab):
    rng = np.random.default_rng(vocab)
    x = rng.normal(size=(6, vocab)).astype(np.float32)
    width = vocab // ARGMAX_CHUNKS
    x[1, [5, vocab - 1]] = 9.0  # tie across slices: the first wins
    x[2, [width + 1, width + 2]] = 9.0  # tie inside one slice
    x[3, :] = -1.0  # all equal: token 0
    x[4, vocab - 1] = 9.0  # the last token
    got = compiled_argmax(vocab)(x)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, x.argmax(-1))
