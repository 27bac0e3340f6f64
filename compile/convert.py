"""HF-named tensors → Kiln's parameters, streamed into safetensors shards.

Kiln fuses Q/K/V into one `qkv_proj` and gate/up into one `gate_up_proj` (one matmul each instead of
three and two); every other parameter keeps its HF name. Tensors are read one at a time from the
memory-mapped source and written shard by shard, so peak memory is about one shard.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
from safetensors.numpy import save_file
from tqdm import tqdm

from formats.errors import KilnError

SHARD_BYTES = 1 << 30

_FUSED = [
    (re.compile(r"(.*)\.self_attn\.qkv_proj\.(weight|bias)$"), ("q_proj", "k_proj", "v_proj"), "self_attn"),
    (re.compile(r"(.*)\.mlp\.gate_up_proj\.(weight)$"), ("gate_proj", "up_proj"), "mlp"),
]


def hf_names(kiln_name: str) -> list[str]:
    """The HF tensors a Kiln parameter is made of, in concatenation order."""
    for pattern, parts, block in _FUSED:
        m = pattern.match(kiln_name)
        if m:
            return [f"{m.group(1)}.{block}.{p}.{m.group(2)}" for p in parts]
    return [kiln_name]


def build_param(source, name: str, shape: tuple, dtype: str) -> np.ndarray:
    """Read, fuse, check and cast one Kiln parameter."""
    parts = [source.tensor(n) for n in hf_names(name)]
    array = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    if tuple(array.shape) != tuple(shape):
        raise KilnError(f"{source.path}: tensor '{name}' has shape {tuple(array.shape)}, "
                        f"the config implies {tuple(shape)}")
    return np.ascontiguousarray(array.astype(np.dtype(dtype)))


def write_shards(arrays, out_dir: Path) -> list[str]:
    """Write (name, array) pairs, consumed one at a time, into out_dir/params-*.safetensors of about
    SHARD_BYTES each plus index.json; return the shard file names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0

    def flush():
        nonlocal current, size
        if current:
            file = f"params-{len(shards):05d}.safetensors"
            save_file(current, str(out_dir / file))
            shards.append(file)
            current, size = {}, 0

    for name, array in arrays:
        if size and size + array.nbytes > SHARD_BYTES:
            flush()
        current[name] = array
        size += array.nbytes
    flush()
    (out_dir / "index.json").write_text(json.dumps({"shards": shards}, indent=1))
    return shards


def convert(source, params: list[tuple[str, tuple, str]], out_dir: Path) -> list[str]:
    """Write `params` [(name, shape, dtype)] from `source` into out_dir/*.safetensors; return file names."""
    with tqdm(params, desc="converting weights", unit="tensor", leave=False) as progress:  # closed on errors too
        return write_shards(((name, build_param(source, name, shape, dtype)) for name, shape, dtype in progress),
                            out_dir)
