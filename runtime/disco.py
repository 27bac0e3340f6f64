"""TVM Disco glue: import the Disco module, start a ProcessSession whose workers can import Kiln, and
name a worker's collective library.

Disco's compiled collectives (`ccl_allreduce` → `runtime.disco.allreduce`) look up
`runtime.disco.<ccl>.<op>` at each call, `<ccl>` being the calling worker's `ccl` field. TVM sets that
field only in its own C++ NCCL/RCCL initialisation, which this wheel lacks, so `set_worker_ccl` writes it
(and the worker's default device) through ctypes; the layout is checked against what Disco reports first.
`python -m runtime.disco ...` is the worker entry point: TVM's worker loop with Kiln's functions registered.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import os
from pathlib import Path

KILN_ROOT = Path(__file__).resolve().parent.parent
WORKER_MODULE = "runtime.tp_worker"  # the functions workers run (registered on import)


def import_disco():
    """tvm.runtime.disco, usable: `import tvm` binds its FFI functions before libtvm_runtime_extra.so
    (which holds Disco) is loaded, so they are bound again here (the module's Python functions stay)."""
    import tvm
    import tvm_ffi

    ctypes.CDLL(os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_extra.so"), mode=ctypes.RTLD_GLOBAL)
    api = importlib.import_module("tvm.runtime.disco._ffi_api")
    if not hasattr(api, "SessionProcess"):
        tvm_ffi.init_ffi_api("runtime.disco", api.__name__)
    return importlib.import_module("tvm.runtime.disco")


@functools.cache
def _get_from_remote():
    import_disco()
    return importlib.import_module("tvm.runtime.disco._ffi_api").DRefDebugGetFromRemote


def fetch(remote, worker: int):
    """The value a worker holds for a DRef (through the FFI function: in runtime-only TVM the DRef class
    was registered before Disco's library loaded, so returned DRefs lack the Python method)."""
    return _get_from_remote()(remote, worker)


def process_session(num_workers: int, environ: dict[str, str]):
    """A Disco ProcessSession of `num_workers` (worker 0 is a thread of this process, the others are
    child processes started with `environ` added, Kiln on their path) with Kiln's worker functions."""
    di = import_disco()
    os.environ.update(environ)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(KILN_ROOT), os.environ.get("PYTHONPATH")) if p)
    sess = di.ProcessSession(num_workers=num_workers, entrypoint="runtime.disco")
    sess.import_python_module(WORKER_MODULE)
    return sess


class _SmallString(ctypes.Structure):
    """tvm::ffi::String holding ≤ 7 bytes in place (a TVMFFIAny of type kTVMFFISmallStr)."""
    _fields_ = [("type_index", ctypes.c_int32), ("size", ctypes.c_uint32), ("data", ctypes.c_char * 8)]


class _WorkerHead(ctypes.Structure):
    """The leading fields of tvm::runtime::DiscoWorker (include/tvm/runtime/disco/disco_worker.h)."""
    _fields_ = [("worker_id", ctypes.c_int32), ("local_worker_id", ctypes.c_int32), ("num_workers", ctypes.c_int32),
                ("num_groups", ctypes.c_int32), ("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32),
                ("ccl", _SmallString)]


_SMALL_STR = 11  # TypeIndex::kTVMFFISmallStr


def set_worker_ccl(ccl: str, device_type: int, device_id: int) -> None:
    """Make the calling Disco worker use collectives `runtime.disco.<ccl>.*` and allocate on the given device."""
    import tvm

    lib = ctypes.CDLL(os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_extra.so"))
    thread_local = lib._ZN3tvm7runtime11DiscoWorker11ThreadLocalEv  # DiscoWorker::ThreadLocal()
    thread_local.restype = ctypes.c_void_p
    head = _WorkerHead.from_address(thread_local())
    rank, world = tvm.get_global_func("runtime.disco.worker_rank")(), tvm.get_global_func("runtime.disco.world_size")()
    if (head.worker_id, head.num_workers, head.ccl.type_index) != (rank, world, _SMALL_STR) or len(ccl) > 7:
        raise RuntimeError("this TVM's DiscoWorker layout differs from the one Kiln writes; "
                           "update runtime/disco.py for it")
    head.ccl.data, head.ccl.size = ccl.encode(), len(ccl)
    head.device_type, head.device_id = device_type, device_id


def main() -> None:
    """The worker process: TVM's Disco worker loop (argv: id, count, groups, read fd, write fd)."""
    import_disco()
    importlib.import_module(WORKER_MODULE)
    from tvm.exec.disco_worker import main as worker_main

    worker_main()


if __name__ == "__main__":
    main()
