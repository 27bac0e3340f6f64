"""Find and load an artifact: kiln.yaml, the compiled library (runtime-only TVM) and the weights.

`Artifact.open` takes whatever `--w` takes (runtime/model_file.py): an artifact, a folder of them, a model file.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from formats.errors import KilnError
from formats.torch_hidden import torch_hidden
from .model_file import read_manifest, resolve_model


@dataclass
class Artifact:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path, dtype: str | None = None, quant: str | None = None) -> "Artifact":
        """The artifact `path` stands for on this machine (a model file is compiled to `dtype`, `quant`)."""
        path = resolve_model(path, dtype, quant)
        if not (path / "params.json").is_file():
            raise KilnError(f"{path}: incomplete artifact (no params.json); rebuild it with `make compile`")
        return cls(path, read_manifest(path))

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def target(self) -> str:
        return self.manifest["target"]

    def params(self) -> list[dict]:
        """[{name, shape, dtype}] in the order the compiled functions take them."""
        return json.loads((self.path / "params.json").read_text())

    def weight_shards(self) -> list[Path]:
        index = json.loads((self.path / self.manifest["weights"] / "index.json").read_text())
        return [self.path / self.manifest["weights"] / s for s in index["shards"]]


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
    if device_type == "cuda" and not artifact.manifest.get("cuda_binary"):
        from compile.cuda_jit import register_compile_callback
        major, minor = tvm.cuda(0).compute_version.split(".")
        register_compile_callback(f"sm_{major}{minor}{'a' if major == '9' else ''}", cache=True)
    lib_path = artifact.path / artifact.manifest["library"]
    if not lib_path.is_file():
        raise KilnError(f"{lib_path}: compiled library missing; rebuild the artifact with `make compile`")
    return tvm.runtime.load_module(str(lib_path))
