"""CUDA source → fatbin with nvcc, cached by content hash.

TVM hands the whole CUDA source of a module to the global function `tvm_callback_cuda_compile`.
At build time (compile/cuda_aot.py) that makes the artifact carry a binary; an artifact built
without one is compiled here on first load and cached under ~/.cache/kiln/cuda, so a second
start never recompiles.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from formats.errors import KilnError

CACHE_DIR = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "cuda"


def nvcc_fatbin(code: str, arch: str) -> bytes:
    """Compile `code` for `arch` (e.g. "sm_90a") with nvcc; the result is a fatbin."""
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).exists():
        raise KilnError("nvcc not found: install the CUDA toolkit or compile the artifact where nvcc exists")
    compute = arch.replace("sm_", "compute_")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp, "kernels.cu"), Path(tmp, "kernels.fatbin")
        src.write_text(code)
        cmd = [nvcc, "--fatbin", "-O3", "-std=c++17", f"-gencode=arch={compute},code={arch}", "-o", str(out), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise KilnError(f"nvcc failed for {arch}: {proc.stderr.strip()[-2000:]}")
        return out.read_bytes()


def cached_fatbin(code: str, arch: str) -> bytes:
    """nvcc_fatbin, remembered on disk by (source, arch) hash."""
    key = hashlib.sha256(f"{arch}\n{code}".encode()).hexdigest()[:32]
    path = CACHE_DIR / f"{key}-{arch}.fatbin"
    if path.is_file():
        return path.read_bytes()
    print(f"kiln: compiling CUDA kernels for {arch} (first load only; cached in {CACHE_DIR})",
          file=sys.stderr, flush=True)
    binary = nvcc_fatbin(code, arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # two processes filling the cache at once never share it
    tmp.write_bytes(binary)
    tmp.replace(path)
    return binary


def register_compile_callback(arch: str, cache: bool) -> None:
    """Make TVM compile CUDA source with nvcc for `arch` (cached on disk when `cache`)."""
    import tvm_ffi

    compile_fn = cached_fatbin if cache else nvcc_fatbin

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _compile(code, *_target):
        return bytearray(compile_fn(code, arch))
