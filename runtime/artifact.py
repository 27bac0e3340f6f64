"""Find and load an artifact: kiln.yaml, the compiled library (runtime-only TVM) and the weights.

`Artifact.open` takes whatever `--w` takes (runtime/model_file.py): an artifact, a folder of them, a model file.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from formats.errors import KilnError
from formats.torch_hidden import torch_hidden

from . import artifact_checks as checks
from .model_file import read_manifest, resolve_model


@dataclass
class Artifact:
    """An artifact folder, checked (runtime/artifact_checks.py) before anything of it is loaded."""

    path: Path
    manifest: dict
    _params: list[dict]
    _shards: list[list[Path]]  # per rank (one list for a one-device artifact)

    @classmethod
    def open(cls, path: str | Path, dtype: str | None = None, quant: str | None = None) -> "Artifact":
        """The artifact `path` stands for on this machine (a model file is compiled to `dtype`, `quant`),
        checked before anything of it is loaded."""
        path = resolve_model(path, dtype, quant)
        manifest = read_manifest(path)
        if not (path / "params.json").is_file():
            raise KilnError(f"{path}: incomplete artifact (no params.json); rebuild it with `make compile`")
        checks.check_manifest(path, manifest)
        params = checks.read_params(path, manifest)
        shards = []
        for folder in checks.rank_folders(path, manifest):  # weights/, or weights/rank-R/ of a --tp artifact
            shards.append(checks.weight_shards(path, {**manifest, "weights": folder}))
            checks.check_weights(path, {**manifest, "weights": folder}, params, shards[-1])
        return cls(path, manifest, params, shards)

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def target(self) -> str:
        return self.manifest["target"]

    def params(self) -> list[dict]:
        """[{name, shape, dtype}] in the order the compiled functions take them."""
        return self._params

    @property
    def tensor_parallel(self) -> int | None:
        """The rank count of a tensor-parallel artifact (compile --tp N), None for a one-device one."""
        return self.manifest.get("tensor_parallel")

    def weight_shards(self, rank: int = 0) -> list[Path]:
        """The safetensors files of the weights (of rank `rank`'s shards for a tensor-parallel artifact)."""
        return self._shards[rank]


def import_tvm(device_type: str):
    """Import TVM (the runtime alone is enough; without torch, formats/torch_hidden.py) and the CUDA
    runtime library when needed."""
    with torch_hidden():
        import tvm

    if device_type == "cuda" and tvm.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None:
        lib = os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_cuda.so")
        try:
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise KilnError(f"cannot load TVM's CUDA runtime ({e}); is the NVIDIA driver installed?") from None
    return tvm


def load_library(artifact: Artifact, device_type: str):
    """The compiled module; CUDA source (an artifact built without nvcc) is compiled once and cached."""
    tvm = import_tvm(device_type)
    checks.check_tvm_version(artifact.path, artifact.manifest, tvm.__version__)
    if device_type == "cuda" and not artifact.manifest.get("cuda_binary"):
        from compile.cuda_jit import register_compile_callback
        major, minor = tvm.cuda(0).compute_version.split(".")
        register_compile_callback(f"sm_{major}{minor}{'a' if major == '9' else ''}", cache=True)
    lib_path = artifact.path / artifact.manifest["library"]
    if not lib_path.is_file():
        raise KilnError(f"{lib_path}: compiled library missing; rebuild the artifact with `make compile`")
    return tvm.runtime.load_module(str(lib_path))
