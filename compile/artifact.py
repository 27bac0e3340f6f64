"""The artifact folder: compiled library, converted weights, tokenizer files and kiln.yaml."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import tvm
import yaml

import model_defs

WEIGHTS_DIR = "weights"


def rank_dir(rank: int) -> str:
    """A tensor-parallel artifact's weights of one rank, under WEIGHTS_DIR (listed in kiln.yaml's rank_weights)."""
    return f"{WEIGHTS_DIR}/rank-{rank}"


_SAMPLES, _SAMPLE_BYTES = 64, 1 << 16


def content_hash(config: dict, dtype: str, target: str, arch: str | None, source, quant: dict | None = None) -> str:
    """Hash of everything the artifact is made of: config, dtype, target, TVM, model code, weights and
    which of them are quantized."""
    h = hashlib.sha256()
    h.update(json.dumps([config, dtype, target, arch, tvm.__version__] + ([quant] if quant else []),
                        sort_keys=True, default=str).encode())
    for f in sorted(Path(model_defs.__file__).parent.glob("*.py")):
        h.update(f.read_bytes())
    for path in source.files() if source is not None else []:
        h.update(f"{path.name}:{path.stat().st_size}".encode())
        with open(path, "rb") as f:  # samples across the file: hashing every byte of 16 GB takes minutes
            size = path.stat().st_size
            for offset in range(0, size, max(size // _SAMPLES, 1)):
                f.seek(offset)
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()[:16]


def write_params(out: Path, params: list[tuple[str, tuple, str]]) -> None:
    """params.json: every parameter the library expects, in argument order (written even without weights)."""
    (out / "params.json").write_text(json.dumps([{"name": n, "shape": list(s), "dtype": d} for n, s, d in params],
                                                indent=0))


def write_manifest(out: Path, manifest: dict) -> None:
    (out / "kiln.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
