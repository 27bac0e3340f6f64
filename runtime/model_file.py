"""What `--w` may name, turned into an artifact folder that can run on this machine.

`--w` takes an artifact folder, a folder of artifacts (the newest one that can run here), an HF model
folder or a GGUF file. A model file is compiled on first use for this machine's device into a cache
keyed by its content (`~/.cache/kiln/artifacts/`, or $KILN_CACHE); later starts reuse it. Compiling
runs `python -m compile` in a subprocess: the runtime never imports the compiler (compile/,
model_defs/, schedules/ pull in TVM's whole compiler stack), and a crash in it cannot take the
caller down with it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from formats.dtypes import DEFAULT_DTYPE, canonical_dtype
from formats.errors import KilnError

from .artifact_checks import check_manifest

MANIFEST = "kiln.yaml"
REPO = Path(__file__).resolve().parent.parent
_COMPILER_SOURCES = ("compile", "model_defs", "schedules")
_SAMPLES, _SAMPLE_BYTES = 64, 1 << 16


def this_device() -> str:
    """The device a model file is compiled for here: CUDA if an NVIDIA GPU is present, else Metal on a
    Mac, else the CPU. Decided from the driver's files, without importing TVM."""
    if sys.platform == "darwin":
        return "metal"
    if Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi"):
        return "cuda"
    return "cpu"


def cache_dir() -> Path:
    """Where compiled model files go: $KILN_CACHE, else $XDG_CACHE_HOME/kiln/artifacts (~/.cache/...)."""
    if os.environ.get("KILN_CACHE"):
        return Path(os.environ["KILN_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "kiln" / "artifacts"


def why_not_here(path: Path, manifest: dict, dtype: str | None = None) -> str | None:
    """The reason the artifact at `path` cannot run on this machine (None: it can); a kiln.yaml that is
    not sound is a KilnError (runtime/artifact_checks.py)."""
    target = manifest.get("target")
    if not manifest.get("weights"):
        return f"it has no weights yet (add them with: {manifest.get('weights_hint')})"
    check_manifest(path, manifest)
    if dtype is not None and manifest.get("dtype") != dtype:
        return f"it computes in {manifest.get('dtype')}, {dtype} was asked"
    if target == "metal" and sys.platform != "darwin":
        return "it was compiled for Metal, which needs a Mac"
    if target == "cuda" and this_device() != "cuda":
        return "it was compiled for CUDA and this machine has no NVIDIA GPU"
    library = path / str(manifest.get("library", ""))
    if target == "cpu" and library.is_file():
        with open(library, "rb") as f:
            elf = f.read(4) == b"\x7fELF"
        if elf != sys.platform.startswith("linux"):
            return f"its CPU library was built for another operating system than {sys.platform}"
    return None


def read_manifest(path: Path) -> dict:
    """The artifact's kiln.yaml as a dict (KilnError if unreadable)."""
    try:
        manifest = yaml.safe_load((path / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise KilnError(f"{path / MANIFEST}: unreadable ({str(e).splitlines()[0]}); rebuild the artifact with "
                        "`make compile`") from None
    if not isinstance(manifest, dict):
        raise KilnError(f"{path / MANIFEST}: not a Kiln manifest; rebuild the artifact with `make compile`")
    return manifest


def _runnable_artifact(path: Path, dtype: str | None) -> Path:
    reason = why_not_here(path, read_manifest(path), dtype)
    if reason:
        raise KilnError(f"{path} cannot run here: {reason}")
    return path


def _newest_runnable(folder: Path, dtype: str | None) -> Path:
    found = sorted((p.parent for p in folder.glob(f"*/{MANIFEST}")), key=lambda p: (p / MANIFEST).stat().st_mtime,
                   reverse=True)
    reasons = []
    for path in found:
        try:
            reason = why_not_here(path, read_manifest(path), dtype)
        except KilnError as e:  # a broken artifact beside good ones is skipped, and named
            reason = str(e)
        if reason is None:
            if len(found) > 1:
                print(f"kiln: {len(found)} artifacts in {folder}; using the newest that runs here, {path.name} "
                      f"(pass --w {path} to choose)", file=sys.stderr)
            return path
        reasons.append(f"{path.name}: {reason}")
    raise KilnError(f"{folder}: none of its {len(found)} artifacts can run here ({'; '.join(reasons)}); "
                    "compile one with `make compile MODEL=... TARGET=cpu|cuda|metal` or pass a model file to --w")


def _model_files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file())


def cache_key(model: Path, target: str, dtype: str, quant: str | None) -> str:
    """A hash of what the artifact would be made of: the model files (sampled: hashing every byte of
    16 GB takes minutes), the target, dtype and quantization, TVM's version and the compiler's sources."""
    try:
        tvm_version = importlib.metadata.version("apache-tvm")
    except importlib.metadata.PackageNotFoundError:  # a TVM built from source
        tvm_version = "source"
    h = hashlib.sha256(json.dumps([target, dtype, quant, tvm_version]).encode())
    for f in _model_files(model):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as stream:
            for offset in range(0, size, max(size // _SAMPLES, 1)):
                stream.seek(offset)
                h.update(stream.read(_SAMPLE_BYTES))
    for package in _COMPILER_SOURCES:
        for f in sorted((REPO / package).rglob("*")):
            if f.suffix in (".py", ".yaml") and "__pycache__" not in f.parts:
                h.update(f.relative_to(REPO).as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:16]


def compile_model_file(model: Path, dtype: str | None = None, quant: str | None = None,
                       cache: Path | None = None) -> Path:
    """The cached artifact of `model` (an HF folder or GGUF file) for this machine; compiled first if absent."""
    target = this_device()
    dtype = dtype or DEFAULT_DTYPE[target]
    name = (model.stem if model.is_file() else model.resolve().name) or "model"
    out = (cache or cache_dir()) / f"{name}-{dtype}{'-' + quant if quant else ''}-{target}-" \
                                   f"{cache_key(model, target, dtype, quant)}"
    if (out / MANIFEST).is_file():
        print(f"kiln: using the compiled {model.name} from {out}", file=sys.stderr)
        return out
    print(f"kiln: compiling {model} for {target} ({dtype}) on first use; the artifact goes to {out}",
          file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")  # an interrupted compile leaves no artifact
    command = [sys.executable, "-m", "compile", "--model", str(model), "--target", target, "--dtype", dtype,
               "--out", str(partial)] + (["--quant", quant] if quant else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(command, env=env, stdout=sys.stderr)  # stderr shows the compiler's progress bars
    except KeyboardInterrupt:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if done.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise KilnError(f"compiling {model} failed (its error is above); to retry by hand: {' '.join(command[1:])}")
    try:
        partial.rename(out)
    except OSError:  # another process finished the same artifact first: use theirs
        shutil.rmtree(partial, ignore_errors=True)
    print(f"kiln: the compiled {model.name} is in {out}; later starts reuse it", file=sys.stderr)
    return out


def resolve_model(w: str | Path, dtype: str | None = None, quant: str | None = None,
                  cache: str | Path | None = None) -> Path:
    """The artifact folder `--w` stands for on this machine (see the module docstring); `dtype` (any
    spelling) and `quant` select what a model file is compiled to and which artifacts fit."""
    path = Path(w).expanduser()
    dtype = canonical_dtype(dtype)
    if not path.exists():
        raise KilnError(f"--w {w}: no such file or folder (give an artifact folder, a folder of artifacts, "
                        "an HF model folder or a .gguf file)")
    if path.is_dir() and (path / MANIFEST).is_file():
        return _runnable_artifact(path, dtype)
    if path.is_file() and path.suffix.lower() == ".gguf" or path.is_dir() and (path / "config.json").is_file():
        return compile_model_file(path, dtype, quant, Path(cache).expanduser() if cache else None)
    if path.is_dir() and any(path.glob(f"*/{MANIFEST}")):
        return _newest_runnable(path, dtype)
    raise KilnError(f"--w {w}: not an artifact, a folder of artifacts, an HF model folder (config.json) or a "
                    "GGUF file; compile one with `make compile MODEL=... TARGET=...`")
