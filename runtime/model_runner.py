"""ModelRunner: the compiled model's VM functions, its weights and the paged KV cache.

Everything above this file thinks in sequences and token ids; nothing above it touches TVM.
`forward` appends tokens to any mix of sequences (prefills, chunks of prefills, decodes) and
returns the logits of each sequence's last new token. For the engine's overlapped loop, `greedy` and
`draw` leave a step's tokens on the device (DeviceTokens) and `decode_next` feeds them to the next step,
so the host can read them while that next step runs.
"""

from __future__ import annotations

import os
import struct

import numpy as np
from safetensors import safe_open

from .artifact import Artifact, import_tvm, load_library
from .cudart import Event, HostReadback, is_nonblocking_stream
from formats.errors import KilnError

_TARGET_DEVICE = {"cpu": "cpu", "cuda": "cuda", "metal": "metal"}
FUSED_ROWS = 8  # decode/logits run their fused few-row GEMVs (dequantize, RMSNorm, SwiGLU) up to this many rows
_KDL_CUDA = 2  # DLPack's device type of a CUDA GPU
_KV_DEVICE_AT = 1768  # byte offset of the KV cache object's device_ field in TVM 0.27 (tests/test_overlap.py pins it)


def parse_device(device: str | None, target: str) -> tuple[str, int]:
    """"cuda:1" → ("cuda", 1); None → the artifact's own device kind, number 0."""
    kind, _, index = (device or _TARGET_DEVICE[target]).partition(":")
    if kind != _TARGET_DEVICE[target]:
        raise KilnError(f"this artifact was compiled for {target}; it cannot run on device '{device}' "
                        f"(compile it with TARGET={kind})")
    return kind, int(index or 0)


def device_memory(target: str, device_id: int) -> int:
    """Bytes of memory where an artifact for `target` keeps its KV cache (the host's RAM for the CPU)."""
    if target == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return import_tvm(_TARGET_DEVICE[target]).device(_TARGET_DEVICE[target], device_id).total_global_memory


class ModelRunner:
    def __init__(self, artifact: str | Artifact, device: str | None = None, max_batch: int = 64,
                 kv_tokens: int | None = None, prefill_chunk: int | None = None, rank: int | None = None):
        """`rank`: a tensor-parallel artifact's rank whose weight shards to load (only inside a Disco
        worker, runtime/tp_worker.py; the engine serves such artifacts with runtime/sharded_runner.py)."""
        self.artifact = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
        if (self.artifact.tensor_parallel is not None) != (rank is not None):
            raise KilnError(f"{self.artifact.path}: compiled with --tp {self.artifact.tensor_parallel}; serve it "
                            "through the Engine or the CLIs (--d 0,1,...), which start one worker per device"
                            if rank is None else f"{self.artifact.path}: not a tensor-parallel artifact")
        self.rank = rank or 0
        manifest, cfg = self.artifact.manifest, self.artifact.config
        kind, index = parse_device(device, self.artifact.target)
        tvm = import_tvm(kind)
        self._tvm = tvm
        from tvm.runtime.vm import VirtualMachine

        self.device = tvm.device(kind, index)
        if not self.device.exist:
            raise KilnError(f"device {kind}:{index} not found")
        self.vm = VirtualMachine(load_library(self.artifact, kind), self.device)
        self.params = self._load_params()
        self.vocab_size = cfg["vocab_size"]
        self.page_size = manifest["page_size"]
        self.max_context = manifest["context_length"]
        self.prefill_chunk = min(prefill_chunk or manifest["prefill_chunk"], manifest["prefill_chunk"])
        if max_batch > manifest["max_batch"]:
            raise KilnError(f"{self.artifact.path}: at most {manifest['max_batch']} sequences per step were "
                            f"compiled in, {max_batch} asked; lower max_num_seqs or recompile with --max_batch")
        self.max_batch = max_batch
        # the context now defaults to the model's own (128K for Llama 3.1): by default hold 8192 tokens, not
        # a full context, and let the engine's kvmem ask for more
        kv_tokens = kv_tokens or 8192
        shape = tvm.runtime.ShapeTuple
        self.kv = self.vm["create_paged_kv_cache"](shape([max_batch]), shape([kv_tokens]),
                                                   shape([self.prefill_chunk]), shape([self.page_size]),
                                                   shape([0]))
        self._f = {name: tvm.get_global_func("vm.builtin." + name) for name in (
            "kv_state_add_sequence", "kv_state_remove_sequence", "kv_state_fork_sequence",
            "kv_state_begin_forward", "kv_state_end_forward", "attention_kv_cache_get_num_available_pages")}
        self.total_pages = self.free_pages()
        # CUDA: host reads of sampled tokens that wait for their own step only; the point where the last
        # forward's KV-cache kernels are done, and the KV cache's copy stream with the point where it last
        # copied page tables (_run_chunk)
        self._readback = HostReadback(max_batch) if kind == "cuda" else None
        self._kv_done = Event() if kind == "cuda" else None
        self._copy_stream = kv_copy_stream(self.kv, index, self._stream()) if kind == "cuda" else None
        self._copied = Event() if self._copy_stream is not None else None
        self._decode_shapes: tuple[tuple, object, object] | None = None  # (seq_ids, as ShapeTuple, lengths 1)
        # artifacts compiled before model_defs/sampling.py (apply_penalties is its newest) lack these; the
        # engine refuses them (recompile)
        self.can_sample = self.vm.module.implements_function("apply_penalties")
        self._wide = {n for n in ("decode", "logits") if self.vm.module.implements_function(f"{n}_wide")}

    def _load_params(self):
        from tvm_ffi import convert

        names = [p["name"] for p in self.artifact.params()]
        arrays = {}
        for shard in self.artifact.weight_shards(self.rank):
            with safe_open(str(shard), framework="numpy") as f:
                for name in f.keys():
                    arrays[name] = self._tvm.runtime.tensor(f.get_tensor(name), self.device)
        missing = [n for n in names if n not in arrays]
        if missing:
            raise KilnError(f"{self.artifact.path}: weights lack {missing[0]} (and {len(missing) - 1} more); "
                            "recompile the artifact")
        return convert([arrays[n] for n in names])  # an Array once: a list would be converted at every call

    # ---- sequences in the KV cache
    def add_sequence(self, seq_id: int) -> None:
        self._f["kv_state_add_sequence"](self.kv, seq_id)

    def remove_sequence(self, seq_id: int) -> None:
        self._f["kv_state_remove_sequence"](self.kv, seq_id)

    def fork_sequence(self, parent: int, child: int, pos: int = -1) -> None:
        """`child` starts as the first `pos` tokens of `parent` (all of it for -1), sharing its pages."""
        self._f["kv_state_fork_sequence"](self.kv, parent, child, pos)

    def free_pages(self) -> int:
        return int(self._f["attention_kv_cache_get_num_available_pages"](self.kv))

    # ---- the forward pass
    def forward(self, seq_ids: list[int], token_lists: list[list[int]], on_device: bool = False):
        """Append each token list to its sequence; float32 logits [len(seq_ids), vocab] of the last tokens
        (a numpy array, or with `on_device` a device tensor for `sample`)."""
        if len(seq_ids) != len(token_lists) or len(set(seq_ids)) != len(seq_ids):
            raise ValueError("forward needs one token list per distinct sequence")
        if len(seq_ids) > self.max_batch:
            raise ValueError(f"forward got {len(seq_ids)} sequences; this runner takes at most {self.max_batch}")
        for tokens in token_lists:
            if not tokens:
                raise ValueError("forward needs at least one token per sequence")
            bad = [t for t in tokens if not 0 <= t < self.vocab_size]
            if bad:
                raise KilnError(f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        done = []  # (hidden rows of a forward, [(row, index into seq_ids)] whose last token it ran)
        for chunk in self._chunks(token_lists):
            flat = np.fromiter((t for _, ts, _ in chunk for t in ts), dtype="int32")
            rows = self._run_chunk([seq_ids[i] for i, _, _ in chunk], [len(t) for _, t, _ in chunk],
                                   self._tvm.runtime.tensor(flat, self.device))
            finished = [(row, i) for row, (i, _, last) in enumerate(chunk) if last]
            if finished:
                done.append((rows, finished))
        if len(done) == 1 and all(row == i for row, i in done[0][1]) and len(done[0][1]) == len(seq_ids):
            hidden = done[0][0]  # the common case: one forward, rows already in order
        else:
            host = {i: rows.numpy()[row] for rows, finished in done for row, i in finished}
            hidden = self._tvm.runtime.tensor(np.stack([host[i] for i in range(len(seq_ids))]), self.device)
        logits = self._for_rows("logits", len(seq_ids))(hidden, self.params)
        return logits if on_device else logits.numpy()

    # ---- the overlapped decode loop (runtime/engine.py): a step's tokens feed the next without a round trip
    def greedy(self, logits) -> DeviceTokens:
        """The argmax of every row of device `logits`, left on the device (DeviceTokens)."""
        return self._device_tokens(self.vm["argmax"](logits))

    def draw(self, logits, temperature: np.ndarray, top_p: np.ndarray, top_k: np.ndarray, min_p: np.ndarray,
             uniform: np.ndarray) -> DeviceTokens:
        """As sample() for every row of device `logits`, each drawn (temperature > 0), left on the device."""
        drawn = self._draw(logits, np.arange(logits.shape[0]), temperature, top_p, top_k, min_p, uniform)
        return self._device_tokens(drawn._create_view((logits.shape[0],), "int32"))  # [b, 1] → [b]

    def _device_tokens(self, tokens) -> DeviceTokens:
        """On CUDA the copy to the host is queued behind the kernels that make `tokens`, so
        DeviceTokens.host() waits for this step only."""
        if self._readback is None:
            return DeviceTokens(tokens, tokens.numpy)
        return DeviceTokens(tokens, self._readback.start(tokens.data_ptr(), tokens.shape[0], self._stream()))

    def decode_next(self, seq_ids: list[int], tokens: DeviceTokens):
        """A decode step whose new token per sequence is in `tokens` (the previous step's, still on the
        device); device logits, as forward(..., on_device=True)."""
        if len(seq_ids) != len(tokens) or len(set(seq_ids)) != len(seq_ids):
            raise ValueError("decode_next needs one token per distinct sequence")
        hidden = self._run_chunk(seq_ids, [1] * len(seq_ids), tokens.tensor)
        return self._for_rows("logits", len(seq_ids))(hidden, self.params)

    def _stream(self) -> int:
        import tvm_ffi

        return tvm_ffi.get_raw_stream(self.device) or 0

    def sample(self, logits, rows: np.ndarray, temperature: np.ndarray, top_p: np.ndarray, top_k: np.ndarray,
               min_p: np.ndarray, uniform: np.ndarray) -> np.ndarray:
        """One token id for each of `rows` of device `logits`, chosen on the device (only ids come back):
        temperature 0 is argmax, else softmax(logits / temperature) filtered by min_p, top_p and top_k
        (≤ 0: off), drawn with `uniform` (host random numbers in [0, 1)). Arrays are per entry of `rows`."""
        tokens = self.vm["argmax"](logits).numpy()[rows]
        draw = temperature > 0
        if draw.any():
            tokens[draw] = self._draw(logits, rows[draw], temperature[draw], top_p[draw], top_k[draw], min_p[draw],
                                      uniform[draw]).numpy()[:, 0]
        return tokens

    def _draw(self, logits, rows: np.ndarray, temperature: np.ndarray, top_p: np.ndarray, top_k: np.ndarray,
              min_p: np.ndarray, uniform: np.ndarray):
        """Device int32[len(rows), 1]: a token drawn for each of `rows` (temperature > 0; arrays per row)."""
        tensor, f32, i32 = self._tvm.runtime.tensor, np.float32, np.int32
        b = logits.shape[0]

        def per_row(values, fill, dtype):  # a [b] array: `values` at `rows`, `fill` elsewhere
            full = np.full(b, fill, dtype)
            full[rows] = values
            return full

        probs = self.vm["sample_probs"](logits, tensor(per_row(temperature, 1, f32), self.device),
                                        tensor(per_row(min_p, 0, f32), self.device))
        picks = tensor(rows.astype(i32)[:, None], self.device)
        u = tensor(uniform.astype(f32)[:, None], self.device)
        if (top_p < 1).any() or (top_k > 0).any():
            tp = per_row(top_p, 1, f32)[:, None]
            width = logits.shape[1]  # top_k ≤ 0 or beyond the row: the whole row
            tk = per_row(np.where((top_k > 0) & (top_k < width), top_k, width), width, i32)[:, None]
            return self.vm["sample_top_p_top_k"](probs, tensor(tp, self.device), tensor(tk, self.device), u, picks)
        return self.vm["sample_multinomial"](probs, u, picks)

    def apply_penalties(self, logits, pairs: np.ndarray, counts: np.ndarray, repetition: np.ndarray,
                        frequency: np.ndarray, presence: np.ndarray):
        """Device `logits` with penalties at (row, token) `pairs`, one value per pair (model_defs/sampling.py)."""
        def tensor(a, dtype):
            return self._tvm.runtime.tensor(np.ascontiguousarray(a, dtype), self.device)

        return self.vm["apply_penalties"](logits, tensor(pairs, np.int64), tensor(counts, np.float32),
                                          tensor(repetition, np.float32), tensor(frequency, np.float32),
                                          tensor(presence, np.float32))

    def logprobs(self, logits, rows: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For `rows` of device `logits`: log_softmax at `tokens`, and the top 20 (log-probabilities, ids)."""
        chosen = np.zeros((logits.shape[0], 1), np.int32)
        chosen[rows, 0] = tokens
        lp, top_lp, top_ids = self.vm["logprobs"](logits, self._tvm.runtime.tensor(chosen, self.device))
        return lp.numpy()[rows, 0], top_lp.numpy()[rows], top_ids.numpy()[rows]

    def _for_rows(self, name: str, rows: int):
        """VM function `name` ("decode" or "logits") for `rows` sequences: the artifact's unfused
        `<name>_wide` (the tensor-core GEMM) above FUSED_ROWS, where the fused GEMV's per-row work (a
        quantized weight's dequantizing, the RMSNorm prologue's re-reads per 8 rows, the SwiGLU pairs) costs more."""
        return self.vm[f"{name}_wide" if rows > FUSED_ROWS and name in self._wide else name]

    def _chunks(self, token_lists):
        """Pack (sequence index, tokens, is_last_piece) into forwards of ≤ prefill_chunk tokens."""
        chunk, room = [], self.prefill_chunk
        for i, tokens in enumerate(token_lists):
            start = 0
            while start < len(tokens):
                take = min(room, len(tokens) - start)
                chunk.append((i, tokens[start:start + take], start + take == len(tokens)))
                start += take
                room -= take
                if room == 0:
                    yield chunk
                    chunk, room = [], self.prefill_chunk
        if chunk:
            yield chunk

    def _run_chunk(self, seq_ids: list[int], lengths: list[int], ids):
        """Hidden states of one forward: `ids` (int32 device tensor) are the sequences' new tokens, `lengths` each."""
        tvm = self._tvm
        # TVM's KV cache copies each forward's page tables (from one pinned host buffer into one device buffer)
        # on its own non-blocking copy stream, which does not wait for kernels already queued: the last
        # forward's attention must be done reading them (a step may still be running when the overlapped loop
        # launches the next one; the chunks of a long prompt come back to back)
        if self._copy_stream is not None:
            self._copied.synchronize()  # the last copy has read the pinned buffer this forward rewrites
            self._kv_done.wait_in(self._copy_stream)  # this forward's copy waits, on the GPU, for the last forward
        elif self._kv_done is not None:
            self._kv_done.synchronize()  # copy stream not found: wait on the host
        decode = all(n == 1 for n in lengths)
        ids_shape, lengths_shape = self._shapes(seq_ids) if decode else (tvm.runtime.ShapeTuple(seq_ids),
                                                                       tvm.runtime.ShapeTuple(lengths))
        self._f["kv_state_begin_forward"](self.kv, ids_shape, lengths_shape)
        try:
            embeds = self.vm["embed"](ids, self.params)
            if decode:
                hidden = self._for_rows("decode", len(seq_ids))(embeds, self.kv, self.params)
            else:
                logit_pos = tvm.runtime.tensor(np.cumsum(lengths).astype("int32") - 1, self.device)
                hidden = self.vm["prefill"](embeds, logit_pos, self.kv, self.params)
            if self._kv_done is not None:
                self._kv_done.record(self._stream())
            if self._copy_stream is not None:
                self._copied.record(self._copy_stream)  # behind the copy this forward's first attention queued
            return hidden
        finally:
            self._f["kv_state_end_forward"](self.kv)

    def _shapes(self, seq_ids: list[int]) -> tuple:
        """begin_forward's (seq_ids, lengths) for a decode step, kept while the batch repeats (the overlapped
        loop's steady state)."""
        key = tuple(seq_ids)
        if self._decode_shapes is None or self._decode_shapes[0] != key:
            shape = self._tvm.runtime.ShapeTuple
            self._decode_shapes = (key, shape(seq_ids), shape([1] * len(seq_ids)))
        return self._decode_shapes[1:]


def kv_copy_stream(kv, device_id: int, compute_stream: int) -> int | None:
    """The stream on which TVM's paged KV cache copies each forward's page tables, private in TVM 0.27: the
    cache object holds `Device device_; compute_stream_; copy_stream_; kv_transfer_stream_` in this order
    (src/runtime/vm/paged_kv_cache.cc) at _KV_DEVICE_AT, the last two streams created cudaStreamNonBlocking
    by the cache. Read there, and asked to the CUDA runtime only if the device and compute stream match and
    both handles look like user-space pointers; None otherwise (then the runner waits on the host). Not a
    search of the object: a false match elsewhere (e.g. {2, 0, 0} with the default stream) handed arbitrary
    words to cudaStreamGetFlags, which dereferences them (a segfault on an H100, 2026-12-06)."""
    data = object_bytes(kv, _KV_DEVICE_AT + 32)
    if data[_KV_DEVICE_AT:_KV_DEVICE_AT + 16] != struct.pack("<iiQ", _KDL_CUDA, device_id, compute_stream):
        return None
    copy, transfer = struct.unpack_from("<QQ", data, _KV_DEVICE_AT + 16)
    pointers = all(p % 8 == 0 and 1 << 16 < p < 1 << 47 for p in (copy, transfer))  # user-space, aligned
    if pointers and copy != transfer and is_nonblocking_stream(copy) and is_nonblocking_stream(transfer):
        return copy
    return None


def object_bytes(obj, size: int) -> bytes:
    """Up to `size` bytes of a TVM object's memory from its address, read through /proc/self/mem (which
    refuses unmapped addresses instead of crashing) page by page: fewer if a page is not readable."""
    address, data = obj.__chandle__(), b""
    try:
        with open("/proc/self/mem", "rb", buffering=0) as mem:
            while len(data) < size:
                mem.seek(address + len(data))
                page = mem.read(min(4096 - (address + len(data)) % 4096, size - len(data)))
                if not page:
                    break
                data += page
    except OSError:
        pass
    return data


class DeviceTokens:
    """Token ids one step chose, still on the device: `tensor` (int32[b]) feeds the next decode
    (ModelRunner.decode_next) with no device→host→device trip; host() gives them as numpy, waiting for
    their own step only (on CUDA; elsewhere steps run to completion when launched)."""

    def __init__(self, tensor, host):
        self.tensor, self.host = tensor, host

    def __len__(self) -> int:
        return self.tensor.shape[0]
