"""An artifact is checked before any of it reaches a kernel: kiln.yaml's fields (types and sane
bounds), params.json, and the weight shards' real shapes and dtypes against both, so that a
hand-edited or damaged artifact is one KilnError naming the file and field, never a crash.

What these checks guard: the embedding's real row count bounds every token id the runtime accepts
(a vocab_size larger than the table let ids through to an out-of-bounds gather: SIGSEGV);
page_size 0 reached an integer division in the KV cache (SIGFPE); a shard whose shape or dtype
disagrees with params.json made the compiled functions read past a buffer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from formats.errors import KilnError
from formats.safetensors_checks import SafetensorsFile

TARGETS = ("cpu", "cuda", "metal")
DTYPES = ("float32", "float16", "bfloat16")
# params.json's dtypes (TVM's names) as safetensors spells them
_SAFETENSORS = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                "int32": "I32", "int16": "I16", "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16",
                "uint8": "U8", "bool": "BOOL"}
# (field, low, high): integers kiln.yaml must hold
_BOUNDS = (("page_size", 1, 1024), ("context_length", 1, 1 << 24), ("prefill_chunk", 1, 1 << 20),
           ("max_batch", 1, 1 << 16))
_CONFIG_BOUNDS = (("vocab_size", 1, 1 << 24), ("hidden_size", 1, 1 << 20), ("num_hidden_layers", 1, 4096),
                  ("num_attention_heads", 1, 4096), ("num_key_value_heads", 1, 4096), ("head_dim", 1, 1 << 16),
                  ("intermediate_size", 1, 1 << 22))


def rebuild_hint(manifest: dict) -> str:
    return (f"rebuild it with `make compile MODEL={manifest.get('name', '...')} "
            f"TARGET={manifest.get('target', '...')}`")


def _integer(where: str, field: str, value, low: int, high: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise KilnError(f"{where}: {field} is {value!r}; it must be an integer in [{low}, {high}]; {hint}")
    return value


def check_manifest(path: Path, manifest: dict) -> None:
    """kiln.yaml's fields: present, of the right type and within sane bounds."""
    where, hint = path / "kiln.yaml", rebuild_hint(manifest)
    for field, allowed in (("target", TARGETS), ("dtype", DTYPES)):
        if manifest.get(field) not in allowed:
            raise KilnError(f"{where}: {field} is {manifest.get(field)!r}; expected one of {', '.join(allowed)}; "
                            f"{hint}")
    for field in ("library", "weights"):
        value = manifest.get(field)
        if not isinstance(value, str) or not value or Path(value).is_absolute() or ".." in Path(value).parts:
            raise KilnError(f"{where}: {field} is {value!r}; expected a path inside the artifact; {hint}")
    for field, low, high in _BOUNDS:
        _integer(where, field, manifest.get(field), low, high, hint)
    if not re.fullmatch(r"[0-9a-f]{16}", str(manifest.get("content_hash"))):
        raise KilnError(f"{where}: content_hash is {manifest.get('content_hash')!r}, not 16 hex digits; {hint}")
    if not re.match(r"\d+\.\d+", str(manifest.get("tvm_version"))):
        raise KilnError(f"{where}: tvm_version is {manifest.get('tvm_version')!r}, not a version; {hint}")
    config = manifest.get("config")
    if not isinstance(config, dict):
        raise KilnError(f"{where}: config is {type(config).__name__}, not a mapping; {hint}")
    for field, low, high in _CONFIG_BOUNDS:
        if field in config or field not in ("head_dim", "num_key_value_heads", "intermediate_size"):
            _integer(where, f"config.{field}", config.get(field), low, high, hint)
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    if heads % kv:
        raise KilnError(f"{where}: config.num_attention_heads {heads} is not a multiple of num_key_value_heads "
                        f"{kv}; {hint}")
    if "head_dim" not in config and config["hidden_size"] % heads:
        raise KilnError(f"{where}: config.hidden_size {config['hidden_size']} is not a multiple of "
                        f"num_attention_heads {heads}; {hint}")


def check_tvm_version(path: Path, manifest: dict, running: str) -> None:
    """The compiled library's TVM (major.minor) must be the one loading it: another ABI can crash."""
    built = manifest["tvm_version"]
    if built.split(".")[:2] != running.split(".")[:2]:
        raise KilnError(f"{path / 'kiln.yaml'}: compiled with TVM {built}, but this is TVM {running}; "
                        f"{rebuild_hint(manifest)}")


def read_params(path: Path, manifest: dict) -> list[dict]:
    """params.json, checked: [{name, shape (positive integers), dtype}] with distinct names."""
    where, hint = path / "params.json", rebuild_hint(manifest)
    try:
        params = json.loads(where.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KilnError(f"{where}: unreadable ({e}); {hint}") from None
    if not isinstance(params, list) or not params:
        raise KilnError(f"{where}: expected a non-empty list of parameters; {hint}")
    seen = set()
    for i, p in enumerate(params):
        if not (isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("shape"), list)
                and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in p["shape"])
                and p.get("dtype") in _SAFETENSORS):
            raise KilnError(f"{where}: entry {i} ({str(p)[:80]}) is not {{name, shape of positive integers, "
                            f"dtype}}; {hint}")
        if p["name"] in seen:
            raise KilnError(f"{where}: {p['name']} is listed twice; {hint}")
        seen.add(p["name"])
    return params


def rank_folders(path: Path, manifest: dict) -> list[str]:
    """The weight folders: `weights`, or for a tensor-parallel artifact (tensor_parallel N) the N
    `rank_weights` folders, each a path inside the artifact."""
    tp = manifest.get("tensor_parallel")
    if tp is None:
        return [manifest["weights"]]
    folders, where = manifest.get("rank_weights"), path / "kiln.yaml"
    if not isinstance(tp, int) or tp < 1 or not isinstance(folders, list) or len(folders) != tp or not all(
            isinstance(f, str) and f and not Path(f).is_absolute() and ".." not in Path(f).parts for f in folders):
        raise KilnError(f"{where}: tensor_parallel {tp!r} needs rank_weights listing {tp} folders inside the "
                        f"artifact (got {folders!r}); {rebuild_hint(manifest)}")
    return folders


def weight_shards(path: Path, manifest: dict) -> list[Path]:
    """The shard files named by weights/index.json, each a plain file name inside the weights folder."""
    folder, hint = path / manifest["weights"], rebuild_hint(manifest)
    where = folder / "index.json"
    try:
        shards = json.loads(where.read_text())["shards"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError) as e:
        raise KilnError(f"{where}: unreadable or without a shard list ({type(e).__name__}); {hint}") from None
    if not isinstance(shards, list) or not shards or not all(
            isinstance(s, str) and s and Path(s).name == s and s not in (".", "..") for s in shards):
        raise KilnError(f"{where}: shards must be a non-empty list of file names; {hint}")
    return [folder / s for s in shards]


def check_weights(path: Path, manifest: dict, params: list[dict], shards: list[Path]) -> None:
    """Every parameter is in a shard with params.json's shape and dtype, and the model's sizes agree
    with kiln.yaml: the embedding has vocab_size rows of hidden_size, the layers number num_hidden_layers."""
    hint = rebuild_hint(manifest)
    stored = {}
    for shard in shards:
        for name, (dtype, shape, _, _) in SafetensorsFile(shard).entries.items():  # checks header vs file
            stored[name] = (shard, dtype, list(shape))
    for p in params:
        if p["name"] not in stored:
            raise KilnError(f"{path / manifest['weights']}: no tensor {p['name']} (params.json wants it); {hint}")
        shard, dtype, shape = stored[p["name"]]
        if (dtype, shape) != (_SAFETENSORS[p["dtype"]], p["shape"]):
            raise KilnError(f"{shard}: {p['name']} is {dtype} {shape}, but params.json says "
                            f"{_SAFETENSORS[p['dtype']]} {p['shape']}; {hint}")
    config, where = manifest["config"], path / "kiln.yaml"
    by_name = {p["name"]: p for p in params}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        name = name if name in by_name else f"{name}.q"  # a quantized table: its packed codes, a row per token
        if name in by_name and by_name[name]["shape"][0] != config["vocab_size"]:
            raise KilnError(f"{where}: config.vocab_size is {config['vocab_size']} but {name} has "
                            f"{by_name[name]['shape'][0]} rows; {hint}")
    embed = by_name.get("model.embed_tokens.weight")
    if embed is not None and embed["dtype"] in DTYPES and embed["shape"][1:] != [config["hidden_size"]]:
        raise KilnError(f"{where}: config.hidden_size is {config['hidden_size']} but the embedding is "
                        f"{embed['shape']}; {hint}")
    layers = {int(m[1]) for m in (re.match(r"model\.layers\.(\d+)\.", n) for n in by_name) if m}
    if layers and layers != set(range(config["num_hidden_layers"])):
        raise KilnError(f"{where}: config.num_hidden_layers is {config['num_hidden_layers']} but the weights hold "
                        f"layers {min(layers)}..{max(layers)} ({len(layers)}); {hint}")
