"""Target names users type (cpu, cuda, metal) → TVM targets, and how each one's library is saved."""

from __future__ import annotations

import tvm

from formats.errors import KilnError

TARGETS = ("cpu", "cuda", "metal")
DEFAULT_CUDA_ARCH = "sm_90a"


def tvm_target(name: str, cuda_arch: str = DEFAULT_CUDA_ARCH) -> tvm.target.Target:
    if name == "cpu":
        return tvm.target.Target({"kind": "llvm"})
    if name == "cuda":
        if not cuda_arch.startswith("sm_"):
            raise KilnError(f"--cuda-arch '{cuda_arch}' is not a CUDA arch; use e.g. sm_90a, sm_89, sm_80")
        spec = dict(tvm.target.Target("nvidia/nvidia-h100").export())  # limits of a current NVIDIA GPU
        spec.update(arch=cuda_arch, tag="")
        spec.pop("keys", None)
        return tvm.target.Target(spec, host={"kind": "llvm"})
    if name == "metal":
        return tvm.target.Target("apple/m2-gpu")  # Metal device code + arm64 macOS host code
    raise KilnError(f"unknown target '{name}'; choose one of {', '.join(TARGETS)}")


def library_name(name: str) -> str:
    """Metal objects are Mach-O and only link on a Mac: ship them as a .tar, linked at first load."""
    return "model.tar" if name == "metal" else "model.so"
