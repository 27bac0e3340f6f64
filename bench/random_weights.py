"""Fill a library-only artifact (compiled from a preset without weights) with random weights.

Benchmarks run real model shapes on the GPU machine, where real weights can't travel:
    python bench/random_weights.py ARTIFACT_DIR [--tokenizer DIR]
Values ~ N(0, 1/sqrt(fan_in)) so activations stay in range; norms are ones.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import ml_dtypes  # noqa: F401
import numpy as np
import yaml
from safetensors.numpy import save_file


def fill(artifact: Path, tokenizer: Path | None, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    params = json.loads((artifact / "params.json").read_text())
    out = artifact / "weights"
    out.mkdir(exist_ok=True)
    shards, current, size = [], {}, 0
    for p in params:
        shape = tuple(p["shape"])
        if p["name"].endswith("norm.weight"):
            a = np.ones(shape, np.float32)
        else:
            a = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1])
        current[p["name"]] = a.astype(np.dtype(p["dtype"]))
        size += current[p["name"]].nbytes
        if size > 1 << 30:
            shards.append(f"params-{len(shards):05d}.safetensors")
            save_file(current, str(out / shards[-1]))
            current, size = {}, 0
    if current:
        shards.append(f"params-{len(shards):05d}.safetensors")
        save_file(current, str(out / shards[-1]))
    (out / "index.json").write_text(json.dumps({"shards": shards}))
    manifest = yaml.safe_load((artifact / "kiln.yaml").read_text())
    manifest["weights"] = "weights"
    (artifact / "kiln.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    if tokenizer:
        for f in tokenizer.iterdir():
            shutil.copyfile(f, artifact / f.name)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--tokenizer", type=Path)
    a = ap.parse_args()
    fill(a.artifact, a.tokenizer)
