"""The GPU suite: every kernel Kiln owns checked on an NVIDIA GPU (sm_90a) against torch / transformers.

    make test-gpu-build   # here: TVM compiler + nvcc → .gpu/test-gpu (tests/gpu/build.py)
    make test-gpu         # on the GPU machine, runtime-only TVM: pytest -m gpu tests/gpu

Without a CUDA GPU every test here is skipped (the suite's one allowed skip); with a GPU but no
build, the tests fail and say how to build.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

BUILD = Path(os.environ.get("KILN_GPU_BUILD", Path(__file__).resolve().parents[2] / ".gpu" / "test-gpu"))


def _have_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    gpu = _have_gpu()
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not gpu:
                item.add_marker(pytest.mark.skip(reason="no CUDA GPU: tests/gpu runs with `make test-gpu`"))


@pytest.fixture(scope="session")
def build_dir() -> Path:
    if not (BUILD / "built.json").is_file():
        pytest.fail(f"{BUILD}: the GPU suite is not built; run `make test-gpu-build` where nvcc is (or set "
                    "KILN_GPU_BUILD to a built folder)")
    return BUILD


def load_module(path: Path):
    """A library compiled by tests/gpu/build.py (CUDA binaries inside), on the runtime-only TVM."""
    from runtime.artifact import import_tvm

    return import_tvm("cuda").runtime.load_module(str(path))


def to_tvm(t):
    import tvm

    return tvm.runtime.from_dlpack(t)
