"""Fill a library-only artifact (compiled from a preset without weights) with random weights.

Benchmarks run real model shapes on the GPU machine, where real weights can't travel:
    python bench/random_weights.py ARTIFACT_DIR [--tokenizer DIR]
Values ~ N(0, 1/sqrt(fan_in)) so activations stay in range; norms are ones. A quantized artifact's packed
components (`W.q`, `W.sc`, `W.d`, ... of any mix of types, formats/quant_layout.py) get random bits for
their integer code words and sub-scales and small positive fp16 super-scales (`d`, `dmin`), so every
dequantized weight is a finite, non-zero value. Tensors of one shape share their values (layer 2
repeats layer 1): an 8B model then takes seconds, not minutes, to fill, and the speed of a kernel does
not depend on which random numbers it multiplies.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import ml_dtypes  # noqa: F401
import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compile.artifact import WEIGHTS_DIR, rank_dir, write_manifest  # noqa: E402
from compile.convert import write_shards  # noqa: E402


def fill(artifact: Path, tokenizer: Path | None, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    drawn: dict[tuple, np.ndarray] = {}

    def random(kind, shape, dtype):
        key = (kind, shape, dtype)
        if key not in drawn:
            if kind == "bits":
                info = np.iinfo(dtype)
                drawn[key] = rng.integers(info.min, info.max, shape, dtype, endpoint=True)
            elif kind == "scale":  # |d * sub-scale * code| < 1 for every type
                drawn[key] = rng.uniform(2 ** -14, 2 ** -13, shape).astype(dtype)
            else:
                drawn[key] = (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1])).astype(dtype)
        return drawn[key]

    def arrays():
        for p in json.loads((artifact / "params.json").read_text()):
            shape, dtype = tuple(p["shape"]), np.dtype(p["dtype"])
            stem, _, component = p["name"].rpartition(".")
            if p["name"].endswith("norm.weight"):
                yield p["name"], np.ones(shape, dtype)
            elif stem.endswith(".weight") and dtype.kind in "ui":  # a packed weight's code words, sub-scales
                yield p["name"], random("bits", shape, dtype)
            elif stem.endswith(".weight") and component in ("d", "dmin"):
                yield p["name"], random("scale", shape, dtype)
            else:
                yield p["name"], random("normal", shape, dtype)

    manifest = yaml.safe_load((artifact / "kiln.yaml").read_text())
    tp = manifest.get("tensor_parallel")
    for folder in [rank_dir(r) for r in range(tp)] if tp else [WEIGHTS_DIR]:  # each rank: same shapes, same values
        write_shards(arrays(), artifact / folder)
    write_manifest(artifact, {**manifest, "weights": WEIGHTS_DIR,
                              **({"rank_weights": [rank_dir(r) for r in range(tp)]} if tp else {})})
    if tokenizer:
        for f in tokenizer.iterdir():
            shutil.copyfile(f, artifact / f.name)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--tokenizer", type=Path)
    a = ap.parse_args()
    fill(a.artifact, a.tokenizer)
