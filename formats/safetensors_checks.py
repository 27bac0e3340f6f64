"""Safetensors files (single or sharded with model.safetensors.index.json), checked and memory-mapped.

The `safetensors` package trusts the header; a truncated download or a hand-edited header would
surface as a numpy error or wrong numbers deep in the converter. Here every header entry is checked
against the file (dtype known, byte range inside the file and equal to the shape's size, no
overlaps) and every shard named by the index must exist, so a bad file is one KilnError naming
the file and tensor. Tensors are numpy views of a memory map: a model streams through once.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import ml_dtypes
import numpy as np

from formats.errors import KilnError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100 << 20  # the safetensors format's own limit


def read_header(path: Path, buf) -> tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]]]:
    """(data start, {name: (dtype, shape, begin, end)}) of a safetensors file's bytes, every entry checked."""
    size = len(buf)
    if size < 8:
        raise KilnError(f"{path}: {size} bytes is too short for a safetensors file")
    n = int.from_bytes(buf[:8], "little")
    if n > min(size - 8, _MAX_HEADER):
        raise KilnError(f"{path}: header length {n} is larger than the file ({size} bytes): "
                        "truncated or not safetensors")
    try:
        header = json.loads(bytes(buf[8:8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KilnError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise KilnError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    entries, spans = {}, []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise KilnError(f"{where}: header entry {info!r:.100} lacks dtype/shape/data_offsets") from None
        if dtype not in DTYPES:
            raise KilnError(f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape + (begin, end)):
            raise KilnError(f"{where}: shape {list(shape)} / data_offsets [{begin}, {end}] "
                            "are not non-negative integers")
        expected = int(np.prod(shape, dtype=object)) * np.dtype(DTYPES[dtype]).itemsize
        if end - begin != expected:
            raise KilnError(f"{where}: header says {end - begin} bytes but {dtype} {list(shape)} needs {expected}")
        if end > data_size:
            raise KilnError(f"{where}: bytes [{begin}, {end}) lie past the end of the data ({data_size} bytes): "
                            "truncated file or a header that lies")
        entries[name] = (dtype, shape, begin, end)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, name), (nxt, _, other) in zip(spans, spans[1:]):
        if end > nxt:
            raise KilnError(f"{path}: tensors {name!r} and {other!r} overlap in the file: the header lies")
    return 8 + n, entries


class SafetensorsFile:
    """One checked, memory-mapped safetensors file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise KilnError(f"{self.path}: no such safetensors file")
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.path.stat().st_size else b""
        self._start, self.entries = read_header(self.path, self._map)

    def array(self, name: str) -> np.ndarray:
        """The tensor in its stored dtype (bf16 as ml_dtypes.bfloat16), a read-only view of the file."""
        if name not in self.entries:
            raise KilnError(f"{self.path}: no tensor {name!r}")
        dtype, shape, begin, end = self.entries[name]
        count = int(np.prod(shape, dtype=object))
        return np.frombuffer(self._map, DTYPES[dtype], count, self._start + begin).reshape(shape)


class SafetensorsModel:
    """The safetensors weights of an HF folder: sharded via model.safetensors.index.json, or the
    folder's *.safetensors files. `names()`, `array(name)` (stored dtype), `tensor(name)` (float32)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        self._files: dict[Path, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                weight_map = None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise KilnError(f"{index}: not a valid index (needs a \"weight_map\" of tensor name -> shard file)")
            for name, shard in weight_map.items():
                path = self.folder / shard
                if path not in self._files:
                    if not path.is_file():
                        raise KilnError(f"{index}: shard {shard} (holding tensor {name!r}) "
                                        f"is missing from {self.folder}")
                    self._files[path] = SafetensorsFile(path)
                if name not in self._files[path].entries:
                    raise KilnError(f"{index}: tensor {name!r} is not in its shard {shard}")
                self._where[name] = self._files[path]
        else:
            paths = sorted(self.folder.glob("*.safetensors"))
            if not paths:
                raise KilnError(f"{self.folder}: no *.safetensors files and no {INDEX}")
            for path in paths:
                f = self._files[path] = SafetensorsFile(path)
                for name in f.entries:
                    if name in self._where:
                        raise KilnError(f"{path}: tensor {name!r} is also in {self._where[name].path.name}")
                    self._where[name] = f

    def names(self) -> list[str]:
        return list(self._where)

    def files(self) -> list[Path]:
        return list(self._files)

    def array(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise KilnError(f"{self.folder}: no tensor {name!r} in the safetensors files")
        return self._where[name].array(name)

    def tensor(self, name: str) -> np.ndarray:
        """float32 (a view of the file when stored as F32, else converted)."""
        a = self.array(name)
        if a.dtype.kind not in "fV" and a.dtype != ml_dtypes.bfloat16:  # an integer "weight": a relabelled header
            raise KilnError(f"{self._where[name].path}: tensor {name!r} is stored as {a.dtype}; model weights are "
                            "floating point (F32, F16, BF16)")
        return a if a.dtype == np.float32 else a.astype(np.float32)
