"""ShardedModelRunner: ModelRunner's interface over a tensor-parallel artifact, one Disco worker per device.

Each call is broadcast to every worker (runtime/tp_worker.py), which runs it on its own ModelRunner:
its rank's weight shards, its share of the KV heads in its own paged KV cache; the compiled model's
all-reduces join the ranks. Sampling runs on rank 0; only rank 0's reply (token ids, logits when
asked for on the host, KV cache counts) comes back. The engine, scheduler and server above are unchanged.
"""

from __future__ import annotations

import atexit
import pickle
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np

from .artifact import Artifact, import_tvm
from formats.errors import KilnError

_CCL = {"cpu": "cpu", "cuda": "nccl"}


@dataclass(frozen=True)
class RemoteTensor:
    """A device tensor held by the workers (e.g. logits between `forward` and `sample`)."""
    key: int
    shape: tuple


class ShardedModelRunner:
    def __init__(self, artifact: str | Artifact, device_ids: list[int], max_batch: int = 64,
                 kv_tokens: int | None = None, prefill_chunk: int | None = None):
        self.artifact = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
        tp, kind = self.artifact.tensor_parallel, self.artifact.target
        if tp is None:
            raise KilnError(f"{self.artifact.path}: compiled for one device; recompile with --tp {len(device_ids)} "
                            "to shard it over several")
        if len(device_ids) != tp or len(set(device_ids)) != tp:
            raise KilnError(f"{self.artifact.path}: compiled with --tp {tp}, so it needs {tp} distinct devices; "
                            f"got --d {','.join(map(str, device_ids))}")
        if kind not in _CCL:
            raise KilnError(f"{self.artifact.path}: tensor parallelism runs on cpu and cuda, not {kind}")
        tvm = import_tvm(kind)
        from .disco import fetch, process_session

        self._socket_dir = tempfile.mkdtemp(prefix="kiln-tp-")
        if kind == "cuda":
            from . import ccl_nccl
            token, environ = ccl_nccl.unique_id(), ccl_nccl.ENVIRON
        else:
            token, environ = f"{self._socket_dir}/ccl.sock".encode(), {}
        self.session = process_session(tp, environ)
        atexit.register(self.close)
        self._call_f = self.session.get_global_func("kiln.tp.call")
        init = self.session.get_global_func("kiln.tp.init")
        kwargs = pickle.dumps(dict(max_batch=max_batch, kv_tokens=kv_tokens, prefill_chunk=prefill_chunk))
        replies = init(str(self.artifact.path), kind, tvm.runtime.ShapeTuple(device_ids), _CCL[kind], token, kwargs)
        self._fetch = fetch
        attributes = [self._unpack(fetch(replies, rank)) for rank in range(tp)][0]
        self.__dict__.update(attributes)  # page_size, max_context, prefill_chunk, vocab_size, max_batch, ...
        self.device_ids = list(device_ids)

    @staticmethod
    def _unpack(reply: bytes):
        status, value = pickle.loads(bytes(reply))
        if status == "error":
            raise value
        return value

    def _call(self, method: str, *args):
        """ModelRunner.`method`(*args) on every rank; rank 0's result (errors re-raised here)."""
        return self._unpack(self._fetch(self._call_f(method, pickle.dumps(args)), 0))

    # ---- ModelRunner's interface (DEVELOPERS.md)
    def add_sequence(self, seq_id: int) -> None:
        self._call("add_sequence", seq_id)

    def remove_sequence(self, seq_id: int) -> None:
        self._call("remove_sequence", seq_id)

    def fork_sequence(self, parent: int, child: int, pos: int = -1) -> None:
        self._call("fork_sequence", parent, child, pos)

    def popn(self, seq_id: int, n: int) -> None:
        self._call("popn", seq_id, n)

    def sequence_length(self, seq_id: int) -> int:
        return self._call("sequence_length", seq_id)

    def free_pages(self) -> int:
        return self._call("free_pages")

    def forward(self, seq_ids: list[int], token_lists: list[list[int]], on_device: bool = False):
        """As ModelRunner.forward; with `on_device` the logits stay on the workers (a RemoteTensor)."""
        return self._call("forward", seq_ids, token_lists, on_device)

    def sample(self, logits: RemoteTensor, rows: np.ndarray, temperature: np.ndarray, top_p: np.ndarray,
               top_k: np.ndarray, min_p: np.ndarray, uniform: np.ndarray) -> np.ndarray:
        return self._call("sample", logits, rows, temperature, top_p, top_k, min_p, uniform)

    def apply_penalties(self, logits: RemoteTensor, pairs: np.ndarray, counts: np.ndarray, repetition: np.ndarray,
                        frequency: np.ndarray, presence: np.ndarray) -> RemoteTensor:
        return self._call("apply_penalties", logits, pairs, counts, repetition, frequency, presence)

    def logprobs(self, logits: RemoteTensor, rows: np.ndarray, tokens: np.ndarray):
        return self._call("logprobs", logits, rows, tokens)

    def close(self) -> None:
        """Stop the workers (also at exit). The session shuts down when its last reference goes (each
        remote handle holds one): shutting it down by hand while a handle lives aborts when that one is freed."""
        if self.session is not None:
            self._call_f = self.session = None
            shutil.rmtree(self._socket_dir, ignore_errors=True)
