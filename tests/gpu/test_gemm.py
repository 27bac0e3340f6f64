"""The GEMMs on the GPU against float32 torch: the model's own Linear path at the presets' real shapes
(the relax pipeline's run-time row dispatch: LowBatchGEMV for few rows, the wgmma GEMM, its small-M
switch; cast, fused-residual and fp32-logits epilogues) and the mma.sync GEMM (sm_80's) at Llama's."""

from __future__ import annotations

import math

import pytest

from bench import gemm

from .conftest import load_module, to_tvm
from .shapes import LINEAR_ROWS, LINEAR_SHAPES, linear_name

TOL = 1e-2  # bf16 output rounding is ~4e-3 relative


def _rel(got, ref) -> float:
    return float((got.float() - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def linear(build_dir):
    import tvm
    from tvm.runtime.vm import VirtualMachine

    return VirtualMachine(load_module(build_dir / "linear.so"), tvm.cuda(0))


@pytest.mark.parametrize("k, n, epilogue", LINEAR_SHAPES, ids=lambda v: str(v))
def test_model_linear_at_every_row_count(linear, k, n, epilogue):
    import torch

    torch.manual_seed(k + n)
    w = (torch.randn(n, k, device="cuda") / math.sqrt(k)).bfloat16()
    f = linear[linear_name(k, n, epilogue)]
    for m in LINEAR_ROWS:
        x = torch.randn(m, k, device="cuda").bfloat16()
        ref = x.float() @ w.float().T
        args = [to_tvm(x), to_tvm(w)]
        if epilogue == "residual":
            r = torch.randn(m, n, device="cuda").bfloat16()
            args.append(to_tvm(r))
            ref = r.float() + ref.bfloat16().float()
        got = torch.from_dlpack(f(*args))
        assert got.shape == (m, n) and got.dtype == (torch.float32 if epilogue == "logits" else torch.bfloat16)
        assert bool(torch.isfinite(got).all()) and _rel(got, ref) <= TOL, (m, _rel(got, ref))


@pytest.fixture(scope="module")
def mma_sync(build_dir):
    lib, meta = gemm._load(str(build_dir / "gemm"))
    return lib, meta


def test_mma_sync_gemm_at_llama_shapes(mma_sync):
    import torch

    lib, meta = mma_sync
    assert meta["kernels"], "the gemm library is empty"
    for k, n in gemm._shapes_for("llama"):
        f = lib[gemm.kernel_name("mma_sync", k, n)]
        w = (torch.randn(n, k, device="cuda") / math.sqrt(k)).bfloat16()
        for m in (*gemm.RAGGED_MS, 64, 128, 1000):
            x = torch.randn(m, k, device="cuda").bfloat16()
            y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)  # unwritten → NaN
            f(to_tvm(x), to_tvm(w), to_tvm(y))
            err = _rel(y, x.float() @ w.float().T)
            assert bool(torch.isfinite(y).all()) and err <= TOL, (k, n, m, err)
