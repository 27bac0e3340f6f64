"""What each tensor-parallel Disco worker runs: one ModelRunner over its rank's weight shards.

The controller (runtime/sharded_runner.py) broadcasts every ModelRunner call to all workers as
`kiln.tp.call(method, pickled args)`; each worker runs it on its own runner, so KV caches (sharded by
KV head) stay in step. The compiled model's all-reduces go through the collective registered here
under `runtime.disco.<ccl>.*`. Rank 0 alone runs the sampling calls and returns results; device
tensors stay on the workers and travel as `RemoteTensor` handles.
"""

from __future__ import annotations

import pickle

import tvm
import tvm_ffi

from .artifact import Artifact
from .model_runner import ModelRunner
from .sharded_runner import RemoteTensor

RANK0_ONLY = {"sample", "logprobs", "apply_penalties"}  # sampling: rank 0's logits are everyone's
_DEVICE_TYPES = {"cpu": 1, "cuda": 2}


class _Worker:
    def __init__(self):
        self.runner: ModelRunner | None = None
        self.collective = None  # ccl_cpu.CpuCollective or ccl_nccl.NcclCollective
        self.tensors = {}  # RemoteTensor.key → device tensor, emptied by each forward
        self.next_key = 0


_W = _Worker()


def _rank() -> int:
    return tvm_ffi.get_global_func("runtime.disco.worker_rank")()


@tvm_ffi.register_global_func("kiln.tp.init", override=True)
def _init(artifact: str, kind: str, device_ids: tvm_ffi.Shape, ccl: str, ccl_token: bytes,
          runner_kwargs: bytes) -> bytes:
    """Open this rank's runner and join the collective; returns a pickled ("ok", attributes) or ("error", e)."""
    def init():
        from .disco import set_worker_ccl

        rank, world = _rank(), len(device_ids)
        set_worker_ccl(ccl, _DEVICE_TYPES[kind], int(device_ids[rank]))
        _W.runner = ModelRunner(Artifact.open(artifact), device=f"{kind}:{int(device_ids[rank])}", rank=rank,
                                **pickle.loads(runner_kwargs))
        if ccl == "nccl":
            from .ccl_nccl import NcclCollective
            _W.collective = NcclCollective(ccl_token, rank, world, int(device_ids[rank]))
        else:
            from .ccl_cpu import CpuCollective
            _W.collective = CpuCollective(ccl_token.decode(), rank, world)
        r = _W.runner
        return {name: getattr(r, name) for name in ("page_size", "max_context", "prefill_chunk", "vocab_size",
                                                    "max_batch", "total_pages", "can_sample")}
    return _guarded(init, reply=True)  # every rank replies: a rank that failed to load must be reported


@tvm_ffi.register_global_func("kiln.tp.call", override=True)
def _call(method: str, args: bytes) -> bytes:
    """Run ModelRunner.`method`(*args) here; rank 0 returns its pickled ("ok", result) or ("error", e)."""
    if method in RANK0_ONLY and _rank() != 0:
        return b""
    values = [_W.tensors[a.key] if isinstance(a, RemoteTensor) else a for a in pickle.loads(args)]
    if method == "forward":
        _W.tensors.clear()
        if _rank() != 0:
            values[2:] = [True]  # on_device: no rank but 0 copies its logits to the host
    return _guarded(lambda: getattr(_W.runner, method)(*values), reply=_rank() == 0)


def _guarded(thunk, reply: bool) -> bytes:
    """Pickled ("ok", value) or ("error", exception) if `reply`, else b"" (results of ranks > 0 are
    rank 0's too). Exceptions are caught: one escaping a Disco worker aborts its process."""
    try:
        value = thunk()
        if isinstance(value, tvm.runtime.Tensor):  # stays here; its key names it in later calls
            _W.next_key += 1
            _W.tensors[_W.next_key] = value
            value = RemoteTensor(_W.next_key, tuple(value.shape))
        return pickle.dumps(("ok", value)) if reply else b""
    except Exception as e:  # pylint: disable=broad-except  (re-raised by the controller)
        try:
            return pickle.dumps(("error", e))
        except Exception:  # pylint: disable=broad-except
            return pickle.dumps(("error", RuntimeError(f"{type(e).__name__}: {e}")))


def _allreduce(send, reduce_kind: int, in_group: bool, recv) -> None:
    _W.collective.allreduce(send, int(reduce_kind), recv)


def _sync() -> None:
    if hasattr(_W.collective, "sync"):
        _W.collective.sync()


for _ccl in ("cpu", "nccl"):  # what Disco's runtime.disco.allreduce calls, per the worker's ccl field
    tvm_ffi.register_global_func(f"runtime.disco.{_ccl}.allreduce", _allreduce, override=True)
    tvm_ffi.register_global_func(f"runtime.disco.{_ccl}.sync_worker", _sync, override=True)
