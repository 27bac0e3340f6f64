"""HF-named tensors → Kiln's parameters, streamed into safetensors shards.

Kiln fuses Q/K/V into one `qkv_proj` and gate/up into one `gate_up_proj` (one matmul each instead of
three and two); every other parameter keeps its HF name. Tensors are read one at a time from the
memory-mapped source and written shard by shard, so peak memory is about one shard. A quantized weight
(compile/quant_plan.py) becomes its packed components: a GGUF's blocks repacked as they are, or float
weights quantized as ggml does, then repacked.

Tensor parallelism (Megatron): rank r of tp takes the r-th slice of each of q, k, v, gate and up by
output rows (so every rank keeps whole heads and its fused segments stay in order) and of o_proj and
down_proj by input columns; everything else is replicated.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import ml_dtypes  # registers bfloat16 with numpy
import numpy as np
from safetensors.numpy import save_file
from tqdm import tqdm

from formats.errors import KilnError
from formats.quant_layout import STORED_FLOATS

from .quantize import quantize
from .repack import repack

SHARD_BYTES = 1 << 30
_FLOAT_DTYPES = {"f16": np.float16, "bf16": ml_dtypes.bfloat16}

_SPLIT = re.compile(r"(.*)\.(?:qkv_proj|gate_up_proj)\.(\w+_proj)\.(weight|bias)$")  # a fused weight run per part
_FUSED = [
    (re.compile(r"(.*)\.self_attn\.qkv_proj\.(weight|bias)$"), ("q_proj", "k_proj", "v_proj"), "self_attn"),
    (re.compile(r"(.*)\.mlp\.gate_up_proj\.(weight)$"), ("gate_proj", "up_proj"), "mlp"),
]


_ROW_PARALLEL = re.compile(r".*\.(self_attn\.o_proj|mlp\.down_proj)\.weight$")  # split by input columns


def hf_names(kiln_name: str) -> list[str]:
    """The HF tensors a Kiln parameter is made of, in concatenation order."""
    if m := _SPLIT.match(kiln_name):
        return [f"{m.group(1)}.{m.group(2)}.{m.group(3)}"]
    for pattern, parts, block in _FUSED:
        m = pattern.match(kiln_name)
        if m:
            return [f"{m.group(1)}.{block}.{p}.{m.group(2)}" for p in parts]
    return [kiln_name]


def rank_slice(name: str, part: np.ndarray, fused: bool, rank: int, tp: int) -> np.ndarray:
    """Rank `rank`'s share of one HF tensor of Kiln parameter `name` (`fused`: a q/k/v or gate/up part)."""
    if fused:
        return np.split(part, tp, axis=0)[rank]
    if _ROW_PARALLEL.match(name):
        return np.split(part, tp, axis=1)[rank]
    return part


def build_param(source, name: str, shape: tuple, dtype: str, rank: int = 0, tp: int | None = None) -> np.ndarray:
    """Read, fuse, check and cast one Kiln parameter (with `tp`: rank `rank`'s shard of it)."""
    names = hf_names(name)
    parts = [source.tensor(n) for n in names]
    if tp is not None:
        parts = [rank_slice(name, p, len(names) > 1, rank, tp) for p in parts]
    array = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    if tuple(array.shape) != tuple(shape):
        of = f"rank {rank} of {tp} of " if tp is not None else ""
        raise KilnError(f"{source.path}: {of}tensor '{name}' has shape {tuple(array.shape)}, "
                        f"the config implies {tuple(shape)}")
    return np.ascontiguousarray(array.astype(np.dtype(dtype)))


def packed_components(source, name: str, qtype: str, shape: tuple) -> dict[str, np.ndarray]:
    """The components (docs/QUANT-LAYOUT.md) of Kiln weight `name` [N, K] in `qtype`: a GGUF's blocks
    of that type repacked unchanged, anything else quantized as ggml does, then repacked."""
    parts = hf_names(name)
    if qtype in STORED_FLOATS:  # a GGUF's F16/BF16 rows as they are
        return {"w": np.concatenate([source.blocks(p) for p in parts]).view(_FLOAT_DTYPES[qtype])}
    if all(getattr(source, "stored_type", lambda _: None)(p) == qtype for p in parts):
        blocks = [source.blocks(p) for p in parts]
    else:
        blocks = [quantize(qtype, source.tensor(p)) for p in parts]
    blocks = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=0)
    if blocks.shape[0] != shape[0]:
        raise KilnError(f"{source.path}: tensor '{name}' has {blocks.shape[0]} rows, the config implies {shape[0]}")
    return repack(qtype, blocks, shape[1])


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


def _arrays(source, params, packed: dict[str, tuple[str, tuple]], progress, rank: int, tp: int | None):
    """(name, array) of every parameter; a packed weight's components (`<weight>.q`, ...) come one after
    another, so each weight is repacked or quantized once."""
    current, components = None, {}
    for name, shape, dtype in params:
        weight, _, component = name.rpartition(".")
        if weight in packed:
            if weight != current:
                progress.set_postfix_str(f"{weight} ({packed[weight][0]})", refresh=False)
                current, components = weight, packed_components(source, weight, *packed[weight])
            yield name, components[component]
        else:
            yield name, build_param(source, name, shape, dtype, rank, tp)
        progress.update()


def convert(source, params: list[tuple[str, tuple, str]], out_dir: Path,
            packed: dict[str, tuple[str, tuple]] | None = None, rank: int = 0, tp: int | None = None) -> list[str]:
    """Write `params` [(name, shape, dtype)] from `source` into out_dir/*.safetensors; return file names.
    `packed` ({weight: (qtype, (N, K))}) names the weights whose parameters are packed components; with
    `tp`, rank `rank`'s shards (`params` holding the shard shapes; no packed weights)."""
    desc = "converting weights" + (f" (rank {rank} of {tp})" if tp is not None else "")
    with tqdm(total=len(params), desc=desc, unit="tensor", leave=False) as progress:
        return write_shards(_arrays(source, params, packed or {}, progress, rank, tp), out_dir)
