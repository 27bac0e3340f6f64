"""Compile CUDA kernels at build time, so an artifact loads on a GPU without a compiler.

TVM emits device *binaries* only when its CUDA runtime library (libtvm_runtime_cuda.so) is loaded,
and that library needs libcudart and the driver's libcuda.so.1. A build machine without a GPU has
no driver, so we load a stub libcuda that exports the nine driver symbols TVM imports (they are never
called while building), then let our nvcc callback turn the generated source into a fatbin.
"""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import tvm

from .cuda_jit import CACHE_DIR, register_compile_callback

_DRIVER_SYMBOLS = ("cuDeviceGetName cuFuncSetAttribute cuGetErrorName cuGetErrorString cuLaunchKernelEx "
                   "cuModuleGetFunction cuModuleLoadData cuModuleUnload cuTensorMapEncodeTiled").split()


def _cuda_lib_dirs() -> list[str]:
    nvcc = shutil.which("nvcc")
    roots = [str(Path(os.path.realpath(nvcc)).parent.parent)] if nvcc else []
    roots += [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    return [d for r in roots if r for d in (f"{r}/lib64", f"{r}/lib", f"{r}/targets/x86_64-linux/lib")]


def _load_global(path: str) -> bool:
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        return True
    except OSError:
        return False


def _stub_libcuda() -> str:
    """Build (once) a libcuda.so.1 whose driver calls all fail: enough to load TVM's CUDA runtime."""
    path = CACHE_DIR / "stub" / "libcuda.so.1"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        src = "".join(f"int {s}(void) {{ return 100; }}\n" for s in _DRIVER_SYMBOLS)
        with tempfile.TemporaryDirectory() as tmp:
            c = Path(tmp, "stub.c")
            c.write_text(src)
            subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(path), str(c)],
                           check=True, capture_output=True)
    return str(path)


def nvcc_available() -> bool:
    return shutil.which("nvcc") is not None


def enable_cuda_binaries(arch: str) -> bool:
    """Make the following tvm.compile calls embed fatbins for `arch`. False if that is impossible here."""
    if not nvcc_available():
        return False
    if tvm.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        if not _load_global("libcuda.so.1"):  # a real driver if there is one, else the stub
            _load_global(_stub_libcuda())
        for d in _cuda_lib_dirs():
            hits = sorted(glob.glob(f"{d}/libcudart.so.*"))
            if hits and _load_global(hits[-1]):
                break
        _load_global(os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_cuda.so"))
    if tvm.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        return False
    register_compile_callback(arch, cache=False)
    return True
