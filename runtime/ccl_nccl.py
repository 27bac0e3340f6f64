"""NCCL through ctypes: the GPU collectives of tensor parallelism (TVM's wheel ships no NCCL).

libnccl.so.2 comes from the `nvidia-nccl-cu12/13` wheel (torch installs one): found on sys.path under
nvidia/nccl/lib, or named by $KILN_NCCL. Rank 0's process makes the unique id; every worker joins
the communicator with it. NVLink SHARP / multicast stays off (NCCL_NVLS_ENABLE=0): on the lent
multi-GPU hosts its cuMulticastCreate can take the GPUs out of service.
Registered as Disco's `runtime.disco.nccl.*` collectives by runtime/tp_worker.py.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

from formats.errors import KilnError
from .cudart import cudart

ENVIRON = {"NCCL_NVLS_ENABLE": "0"}  # set in every worker before the communicator exists
_UNIQUE_ID_BYTES = 128
_DTYPES = {"int8": 0, "uint8": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5, "float16": 6,
           "float32": 7, "float64": 8, "bfloat16": 9}
_OPS = {0: 0, 1: 1, 2: 3, 3: 2, 4: 4}  # Disco's ReduceKind (sum prod min max avg) → ncclRedOp_t


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * _UNIQUE_ID_BYTES)]


def find_nccl() -> str:
    """Path of libnccl.so.2: $KILN_NCCL, else the nvidia-nccl wheel's copy on sys.path."""
    if os.environ.get("KILN_NCCL"):
        return os.environ["KILN_NCCL"]
    for entry in sys.path:
        candidate = Path(entry or ".") / "nvidia" / "nccl" / "lib" / "libnccl.so.2"
        if candidate.is_file():
            return str(candidate)
    raise KilnError("libnccl.so.2 not found on sys.path (nvidia/nccl/lib); `pip install nvidia-nccl-cu13` "
                    "or set KILN_NCCL=/path/to/libnccl.so.2")


def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(find_nccl(), mode=ctypes.RTLD_GLOBAL)
    lib.ncclGetErrorString.restype = ctypes.c_char_p
    return lib


def _check(lib: ctypes.CDLL, result: int, what: str) -> None:
    if result != 0:
        raise RuntimeError(f"{what} failed: {lib.ncclGetErrorString(result).decode()} (ncclResult_t {result})")


def unique_id() -> bytes:
    """A new communicator id (made by rank 0's process, sent to every worker)."""
    lib, uid = _library(), _UniqueId()
    _check(lib, lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
    return bytes(uid.internal)


class NcclCollective:
    def __init__(self, uid: bytes, rank: int, world: int, device_id: int):
        os.environ.update(ENVIRON)
        import tvm_ffi

        self.lib, self.device_id = _library(), device_id
        self.device = tvm_ffi.device("cuda", device_id)
        self.cudart = cudart()
        self.cudart.cudaSetDevice(device_id)
        self.comm = ctypes.c_void_p()
        uid_struct = _UniqueId()
        uid_struct.internal = uid
        _check(self.lib, self.lib.ncclCommInitRank(ctypes.byref(self.comm), world, uid_struct, rank),
               f"ncclCommInitRank (rank {rank} of {world}, cuda:{device_id})")

    def _stream(self) -> ctypes.c_void_p:
        import tvm_ffi

        return ctypes.c_void_p(tvm_ffi.get_raw_stream(self.device))  # TVM's current stream (a graph capture's too)

    def allreduce(self, send, op: int, recv) -> None:
        self.cudart.cudaSetDevice(self.device_id)
        _check(self.lib, self.lib.ncclAllReduce(
            ctypes.c_void_p(send.data_ptr()), ctypes.c_void_p(recv.data_ptr()), ctypes.c_size_t(send.numel()),
            _DTYPES[str(send.dtype)], _OPS[op], self.comm, self._stream()), "ncclAllReduce")

    def sync(self) -> None:
        self.cudart.cudaStreamSynchronize(self._stream())
