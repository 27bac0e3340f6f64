"""Find and load an artifact: kiln.yaml, the compiled library (runtime-only TVM) and the weights.

`--w artifacts/` may name one artifact or a folder of them (the newest is taken, and we say which).
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from formats.errors import KilnError

from . import artifact_checks as checks

MANIFEST = "kiln.yaml"


def find_artifact(path: str | Path) -> Path:
    """`path` itself if it is an artifact, else the newest artifact directly inside it."""
    path = Path(path).expanduser()
    if (path / MANIFEST).is_file():
        return path
    if not path.is_dir():
        raise KilnError(f"{path}: no such artifact folder; build one with `make compile MODEL=... TARGET=...`")
    found = sorted(path.glob(f"*/{MANIFEST}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise KilnError(f"{path}: no artifact here (no */{MANIFEST}); build one with `make compile MODEL=... TARGET=...`")
    chosen = found[-1].parent
    if len(found) > 1:
        print(f"kiln: {len(found)} artifacts in {path}; using the newest, {chosen.name} "
              f"(pass --w {chosen} to choose)", file=sys.stderr)
    return chosen


@dataclass
class Artifact:
    """An artifact folder, checked (runtime/artifact_checks.py) before anything of it is loaded."""

    path: Path
    manifest: dict
    _params: list[dict]
    _shards: list[list[Path]]  # per rank (one list for a one-device artifact)

    @classmethod
    def open(cls, path: str | Path) -> "Artifact":
        path = find_artifact(path)
        try:
            manifest = yaml.safe_load((path / MANIFEST).read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise KilnError(f"{path / MANIFEST}: malformed ({str(e).splitlines()[0]}); rebuild it with "
                            "`make compile`") from None
        if not isinstance(manifest, dict) or not (path / "params.json").is_file():
            raise KilnError(f"{path}: incomplete artifact (kiln.yaml or params.json unreadable); rebuild it with `make compile`")
        if not manifest.get("weights"):
            raise KilnError(f"{path}: this artifact has no weights yet; add them with: {manifest.get('weights_hint')}")
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
    """Import TVM (the runtime alone is enough) and the CUDA runtime library when needed."""
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
