"""The serving engine: requests in, tokens out, continuous batching over the paged KV cache.

    from runtime import Engine, EngineConfig, SamplingParams, Message
    engine = Engine(EngineConfig(model_path="model.gguf", kvmem=4096, max_num_seqs=64), "bf16")
    prompt = engine.apply_chat_template([Message("user", "How are you?")], True)
    outs = engine.generate_sync(SamplingParams(temperature=0), [prompt, prompt])  # list[RequestOutput]
    for piece in engine.generate_stream(SamplingParams(), prompt): print(piece, end="")

The asyncio interface (what the HTTP server builds on):

    async for delta in engine.generate_async(params, prompt, request_id="r1"):
        delta.index, delta.text, delta.token_ids, delta.logprobs   # new since the last delta
        delta.finish_reason                                        # set when completion `index` ends
        delta.output                                               # RequestOutput, on the last delta only
    engine.abort("r1")        # from any thread; leaving the `async for` early aborts too
    engine.stats()            # EngineStats: requests running/waiting, KV pages (what /metrics shows)

`generate_async` (called inside the event loop) raises KilnError at once for a bad request (prompt
too long, bad sampling field, non-UTF-8 text); other requests are unaffected. The engine loop runs
on its own thread and owns the ModelRunner; callers only put commands on a queue and read their
requests' Deltas, so every public method is thread-safe. One step: Scheduler.schedule →
ModelRunner.forward → on the device: ModelRunner.apply_penalties (rows with penalties), .sample and
.logprobs (rows that ask), only token ids and log-probabilities back to the host → per sequence:
stop checks, detokenization, stop-string hold-back → Delta to the request's sink. With
EngineConfig.overlap (the default on CUDA; --no-overlap turns it off), decode steps are launched on the
previous step's tokens still on the device, and the host does that step's per-sequence work while the
next one runs (Engine.step).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import queue
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator

import numpy as np

from .artifact import Artifact
from formats.errors import KilnError
from .model_runner import ModelRunner, device_memory
from .request import Completion, Delta, Message, Request, RequestOutput, Sequence, TokenLogprob
from .sampling import SamplingParams
from .scheduler import Scheduler
from .sharded_runner import ShardedModelRunner
from .tokenizer import Tokenizer

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class EngineConfig:
    """Engine settings; None means: derived from the artifact."""

    model_path: str  # an artifact, a folder of artifacts, an HF folder or a .gguf (runtime/model_file.py)
    device_id: int = 0
    device_ids: list[int] | None = None  # a tensor-parallel artifact's devices (default: device_id onwards)
    dtype: str | None = None  # activations and KV cache (bf16, f16, f32): a model file is compiled to it
    quant: str | None = None  # a model file's weight quantization (passed to `python -m compile --quant`)
    kvmem: float | None = 4096  # KV cache size: MB if > 1, else a fraction of the device's memory
    kv_tokens: int | None = None  # KV cache size in tokens (overrides kvmem)
    max_num_seqs: int = 64
    max_model_len: int | None = None  # tokens per sequence (prompt + output); ≤ the artifact's context
    max_num_batched_tokens: int = 2048  # tokens per step (prefill chunks + decodes)
    prefix_caching: bool = True  # keep finished sequences' pages for later prompts (running ones are shared anyway)
    seed: int | None = None  # seeds requests that bring no seed of their own (None: fresh entropy)
    # launch decode step N+1 on step N's tokens before the host reads them (one-device artifacts); None: where
    # launches are asynchronous (CUDA). On the CPU a launch computes the step at once, so there is nothing to hide
    overlap: bool | None = None


@dataclass
class EngineStats:
    """What a server's /metrics shows; the engine thread refreshes it after every step."""

    running: int = 0  # requests with a sequence in the running batch
    waiting: int = 0  # requests none of whose sequences has started yet
    kv_pages_total: int = 0
    kv_pages_free: int = 0
    kv_pages_used: int = 0  # held by unfinished sequences (a page shared by forks counts for each)
    kv_pages_cached: int = 0  # held only by the prefix cache: reclaimed when needed
    preemptions: int = 0


def _kv_tokens(cfg: EngineConfig, artifact: Artifact) -> int | None:
    """KV cache capacity in tokens for `cfg.kvmem` (None: ModelRunner's default), never more than
    max_num_seqs full contexts: a small model must not take 4 GB of KV cache it cannot use."""
    if cfg.kv_tokens is not None or cfg.kvmem is None:
        return cfg.kv_tokens
    useful = cfg.max_num_seqs * artifact.manifest["context_length"]
    if not (cfg.kvmem > 0 and math.isfinite(cfg.kvmem)):
        raise KilnError(f"kvmem must be > 0 (MB, or a fraction of device memory ≤ 1), got {cfg.kvmem}")
    c = artifact.config
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    per_token = 2 * c["num_hidden_layers"] * c.get("num_key_value_heads", c["num_attention_heads"]) * head_dim \
        * _DTYPE_BYTES.get(artifact.manifest["dtype"], 2) // (artifact.tensor_parallel or 1)  # per device
    if cfg.kvmem > 1:
        tokens = int(cfg.kvmem * 2 ** 20 // per_token)
    else:
        total = device_memory(artifact.target, cfg.device_id)
        weights = sum(f.stat().st_size for f in artifact.weight_shards())
        tokens = int(max(cfg.kvmem * total - weights, 0) // per_token)
    if tokens < 2 * artifact.manifest["page_size"]:  # 0 tokens used to mean "the default cache"
        raise KilnError(f"kvmem {cfg.kvmem} holds {tokens} tokens of KV cache ({per_token} bytes each), too few "
                        f"to serve; raise it (MB if > 1, else a fraction of device memory)")
    return min(tokens, useful)


class TextStream:
    """Iterate for text pieces; afterwards `output` is the RequestOutput (token counts, timings)."""

    def __init__(self, engine: "Engine", request_id: str, deltas: queue.Queue):
        self.engine, self.request_id, self._deltas = engine, request_id, deltas
        self.output: RequestOutput | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            while self.output is None:
                delta = self._deltas.get()
                self.output = delta.output
                if delta.text and delta.index == 0:
                    yield delta.text
        finally:
            self.cancel()  # if the caller stopped early (break, Ctrl-C)

    def cancel(self) -> None:
        """Abort the request unless it has finished; `output` then holds what was generated."""
        if self.output is None:
            self.engine.abort(self.request_id)
            while self.output is None:
                self.output = self._deltas.get().output


class Engine:
    def __init__(self, cfg: EngineConfig, dtype: str | None = None):
        """`dtype` (the seed's `Engine(cfg, "bf16")`) overrides cfg.dtype."""
        self.cfg = cfg
        start = time.perf_counter()
        artifact = Artifact.open(cfg.model_path, dtype or cfg.dtype, cfg.quant)
        print(f"kiln: loading {artifact.path.name} ({artifact.target}, {artifact.manifest['dtype']})",
              file=sys.stderr, flush=True)
        device = f"{artifact.target}:{cfg.device_id}"
        if cfg.max_num_seqs < 1 or cfg.max_num_batched_tokens < 1:
            raise KilnError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if artifact.tensor_parallel is None and cfg.device_ids is not None and len(cfg.device_ids) > 1:
            raise KilnError(f"{artifact.path}: compiled for one device, {len(cfg.device_ids)} given; recompile it "
                            f"with --tp {len(cfg.device_ids)} (make compile ... TP={len(cfg.device_ids)})")
        if artifact.tensor_parallel is None:
            self.runner = ModelRunner(artifact, device=device, max_batch=cfg.max_num_seqs,
                                      kv_tokens=_kv_tokens(cfg, artifact))
        else:
            self.runner = ShardedModelRunner(
                artifact, cfg.device_ids or list(range(cfg.device_id, cfg.device_id + artifact.tensor_parallel)),
                max_batch=cfg.max_num_seqs, kv_tokens=_kv_tokens(cfg, artifact))
        if not self.runner.can_sample:
            raise KilnError(f"{artifact.path}: this artifact has no sampling functions (compiled by an older "
                            "Kiln); compile it again with `make compile`")
        self.tokenizer = Tokenizer(artifact.path)
        capacity = (self.runner.total_pages - 1) * self.runner.page_size
        limit = min(self.runner.max_context, capacity)
        # what bounds a sequence, and how to raise it (named when a prompt does not fit)
        self.limit_hint = (f"the model's context, {self.runner.max_context}" if capacity >= self.runner.max_context
                           else f"what the KV cache holds, {capacity} tokens; raise kvmem (MB)")
        if cfg.max_model_len is not None and cfg.max_model_len > limit:
            raise KilnError(f"max_model_len {cfg.max_model_len} exceeds {self.limit_hint}")
        self.max_model_len = cfg.max_model_len or limit
        if cfg.max_model_len is not None and cfg.max_model_len < limit:
            self.limit_hint = f"max_model_len, {cfg.max_model_len}"
        self.scheduler = Scheduler(self.runner, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.prefix_caching)
        self._rng = np.random.default_rng(cfg.seed)
        self._seq_ids = itertools.count()
        self._requests: dict[str, Request] = {}  # owned by the engine thread
        self._inbox: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._looping = threading.Event()  # set by the thread itself: it was started, whatever start() did
        self._lock = threading.Lock()
        # (sequences, DeviceTokens) of a step launched but not yet read (overlapped loop, see step)
        self._inflight: tuple[list[Sequence], object] | None = None
        overlap = cfg.overlap if cfg.overlap is not None else self.runner.artifact.target == "cuda"
        self._overlap = overlap and isinstance(self.runner, ModelRunner)
        print(f"kiln: loaded in {time.perf_counter() - start:.1f} s; sequences up to {self.max_model_len} tokens, "
              f"KV cache {capacity} tokens", file=sys.stderr, flush=True)

    # ---- chat
    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True,
                            **template_kwargs) -> str:
        """The prompt text for a conversation, through the model's chat template (runtime.chat_template);
        `template_kwargs` reach the template (e.g. enable_thinking=False for Qwen3)."""
        return self.tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                                  add_generation_prompt, **template_kwargs)

    # ---- submission (any thread)
    def add_request(self, prompt: str | bytes | list[int], params: SamplingParams, sink: Callable[[Delta], None],
                    request_id: str | None = None) -> str:
        """Queue a request; `sink` gets its Deltas on the engine thread. KilnError if it is malformed."""
        return self.add_requests([(prompt, params)], sink, [request_id])[0]

    def add_requests(self, requests: list[tuple[str | bytes | list[int], SamplingParams]],
                     sink: Callable[[Delta], None], request_ids: list[str | None] | None = None) -> list[str]:
        """Queue (prompt, params) pairs together: the engine admits them all before its next step, so the
        batches they run in do not depend on how fast the caller queues them (one by one, the engine may
        start on the first alone). KilnError, and nothing queued, if any is malformed."""
        reqs = [self._request(prompt, params, sink, request_id)
                for (prompt, params), request_id in zip(requests, request_ids or [None] * len(requests), strict=True)]
        self._start()
        self._inbox.put(("add", reqs))
        return [req.request_id for req in reqs]

    def _request(self, prompt, params: SamplingParams, sink: Callable[[Delta], None], request_id: str | None):
        req = Request(request_id or uuid.uuid4().hex, *self._prompt(prompt), params, sink,
                      self._stop_ids(params))
        params.check()
        params.stop_strings  # built here, on the caller's thread, not on the engine's
        if len(req.prompt_ids) >= self.max_model_len:
            raise KilnError(f"prompt has {len(req.prompt_ids)} tokens; a sequence (prompt + output) may have "
                            f"{self.max_model_len}: {self.limit_hint}")
        return req

    def abort(self, request_id: str) -> None:
        """Stop a request now; its last Delta has finish_reason "abort"."""
        self._inbox.put(("abort", request_id))

    def tokenize(self, prompt: str | bytes | list[int]) -> list[int]:
        """The token ids `prompt` runs as (checked as add_request checks them); KilnError if malformed."""
        return self._prompt(prompt)[1]

    def _prompt(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, list):
            bad = [t for t in prompt if not (isinstance(t, int) and 0 <= t < self.runner.vocab_size)]
            if bad:
                raise KilnError(f"prompt token {bad[0]!r} is not in the vocabulary (size {self.runner.vocab_size})")
            ids, text = list(prompt), None
        else:
            try:
                text = prompt.decode("utf-8") if isinstance(prompt, bytes) else prompt
                text.encode("utf-8")
            except UnicodeError:
                raise KilnError("prompt is not valid UTF-8 text") from None
            ids = self.tokenizer.encode(text)
            bos = self.tokenizer.bos_token_id
            if len(ids) > 1 and ids[0] == ids[1] == bos:  # a chat template wrote BOS and encode added one
                ids = ids[1:]
            if ids and max(ids) >= self.runner.vocab_size:  # else the step would fail every request in flight
                raise KilnError(f"the tokenizer gave token id {max(ids)}, beyond the model's vocabulary (size "
                                f"{self.runner.vocab_size}): the artifact's tokenizer and weights disagree")
        if not ids:
            raise KilnError("prompt is empty")
        return text, ids

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        bad = [t for t in params.stop_token_ids if not 0 <= t < self.runner.vocab_size]
        if bad:
            raise KilnError(f"stop_token_ids: {bad[0]} is not in the vocabulary (size {self.runner.vocab_size})")
        return set(params.stop_token_ids) | (set() if params.ignore_eos else self.tokenizer.eos_token_ids)

    # ---- the three ways to generate
    def generate_sync(self, params: SamplingParams, prompts: list[str | list[int]]) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order; a bad prompt gets finish_reason "error" and `error`."""
        done: queue.Queue = queue.Queue()
        outputs: list[RequestOutput | None] = [None] * len(prompts)
        ids = {}
        for i, prompt in enumerate(prompts):
            try:
                ids[self.add_request(prompt, params, done.put)] = i
            except KilnError as e:
                outputs[i] = RequestOutput(f"invalid-{i}", None, [], [Completion(0, finish_reason="error")],
                                           time.perf_counter(), error=str(e))
        while ids:
            delta = done.get()
            if delta.output is not None:
                outputs[ids.pop(delta.request_id)] = delta.output
        return outputs

    def generate_stream(self, params: SamplingParams, prompt: str | list[int],
                        request_id: str | None = None) -> TextStream:
        """Text pieces of completion 0 as they are decoded (stop strings never leak)."""
        deltas: queue.Queue = queue.Queue()
        return TextStream(self, self.add_request(prompt, params, deltas.put, request_id), deltas)

    def generate_async(self, params: SamplingParams, prompt: str | list[int],
                       request_id: str | None = None) -> AsyncIterator[Delta]:
        """Deltas of every completion as they come (call it inside the event loop); a bad request raises
        KilnError here, before any iteration. See the module docstring."""
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue = asyncio.Queue()
        def sink(delta: Delta) -> None:  # on the engine thread; a loop already closed has no reader left
            if not loop.is_closed():
                loop.call_soon_threadsafe(deltas.put_nowait, delta)

        rid = self.add_request(prompt, params, sink, request_id)
        return self._deltas(rid, deltas)

    async def _deltas(self, request_id: str, deltas: asyncio.Queue) -> AsyncIterator[Delta]:
        finished = False
        try:
            while not finished:
                delta = await deltas.get()
                finished = delta.output is not None
                yield delta
        finally:
            if not finished:
                self.abort(request_id)

    # ---- the engine thread
    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._looping.clear()
                self._thread = threading.Thread(target=self._loop, name="kiln-engine", daemon=True)
                self._thread.start()

    def close(self) -> None:
        """Stop the engine thread; requests still in flight end with finish_reason "abort"."""
        with self._lock:
            if self._thread is not None:
                self._inbox.put(None)
                # a Ctrl-C inside Thread.start() (while it waits for the new thread) leaves a running thread that
                # join() refuses ("cannot join thread before it is started"): wait for the thread's own signal
                if self._looping.wait(timeout=10):
                    self._thread.join()
                self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _loop(self) -> None:
        self._looping.set()
        while True:
            try:
                commands = [self._inbox.get(block=not (self.scheduler.has_work or self._inflight))]
                while not self._inbox.empty():
                    commands.append(self._inbox.get())
            except queue.Empty:
                commands = []
            for command in commands:
                if command is None:
                    for req in list(self._requests.values()):
                        self._end_request(req, "abort")
                    return
                kind, arg = command
                if kind == "add":
                    for req in arg:
                        self._admit(req)
                elif kind == "stats":
                    arg(self._snapshot())
                elif arg in self._requests:
                    self._end_request(self._requests[arg], "abort")
            if self.scheduler.has_work or self._inflight:
                try:
                    self.step()
                except Exception as e:  # a bug, not a user mistake: fail what is in flight, keep serving
                    traceback.print_exc(file=sys.stderr)
                    self._inflight = None
                    for req in list(self._requests.values()):
                        self._end_request(req, "error", f"internal error: {e}")

    def stats(self) -> EngineStats:
        """Requests running/waiting and KV pages, for /metrics: taken by the engine thread between steps
        (it owns the KV cache), so this waits for at most one step."""
        with self._lock:
            if self._thread is None:
                return self._snapshot()
            reply: queue.Queue = queue.Queue()
            self._inbox.put(("stats", reply.put))
        return reply.get()

    def _snapshot(self) -> EngineStats:
        sched, ps = self.scheduler, self.runner.page_size
        free, total = self.runner.free_pages(), self.runner.total_pages
        used = min(sum(-(-s.num_computed // ps) for s in sched.running), total - free)
        running = len({s.request.request_id for s in sched.running})
        return EngineStats(running, len(self._requests) - running, total, free, used, total - free - used,
                           sched.num_preemptions)

    def _admit(self, req: Request) -> None:
        if req.request_id in self._requests:
            self._emit(req, Delta(req.request_id, 0, finish_reason="error",
                                  output=req.output(f"request id {req.request_id} is already running")))
            return
        self._requests[req.request_id] = req
        self._new_sequence(req)

    def _new_sequence(self, req: Request) -> None:
        index = len(req.seqs)
        seed = req.params.seed
        rng = np.random.default_rng(self._rng.integers(2 ** 63) if seed is None else seed + index)
        seq = Sequence(next(self._seq_ids), req, index, req.prompt_ids, rng, self.tokenizer)
        req.seqs.append(seq)
        self.scheduler.add(seq, first=index > 0)

    def step(self) -> None:
        """One batch: schedule, forward, sample the sequences whose pending tokens are all computed.

        Overlapped (EngineConfig.overlap): a step whose rows all get a token, all greedy or all drawn
        (no penalties, no logprobs), is left running with its tokens on the device. The next step then,
        if the scheduler would repeat the batch (Scheduler.repeat), is launched on those tokens before
        the host reads them, so the host's work (stop checks, detokenization, streaming, the next step's
        page tables) runs while the GPU computes; a sequence found finished one step late drops its
        extra token. Otherwise the step's tokens are read and the synchronous step below runs."""
        if self._inflight is not None:
            seqs, tokens = self._inflight
            self._inflight = None
            if self.scheduler.repeat(seqs):
                logits = self.runner.decode_next([s.seq_id for s in seqs], tokens)
                for seq in seqs:
                    self.scheduler.computed(seq, 1)
                self._inflight = (seqs, self._device_tokens(logits, seqs))
            for seq, token in zip(seqs, tokens.host().tolist()):
                if seq.finish_reason is None:  # else it ended (stop, length, abort) after this step launched
                    self._append(seq, token, None)
            if self._inflight is not None or not self.scheduler.has_work:
                return
        batch = self.scheduler.schedule()
        if not batch:
            raise RuntimeError("the scheduler found nothing to run")  # would spin; fail loudly instead
        rows = [i for i, (seq, n) in enumerate(batch) if n == seq.pending]  # these get a token this step
        seqs = [batch[i][0] for i in rows]
        logits = self.runner.forward([s.seq_id for s, _ in batch],  # logits stay on the device for the sampler
                                     [s.token_ids[s.num_computed:s.num_computed + n] for s, n in batch], True)
        for seq, n in batch:
            self.scheduler.computed(seq, n)
        if self._overlap and len(rows) == len(batch) and _overlappable([s.request.params for s in seqs]):
            self._inflight = (seqs, self._device_tokens(logits, seqs))
        elif rows:
            tokens, logprobs = self._sample(logits, np.array(rows), seqs)
            for seq, token, logprob in zip(seqs, tokens.tolist(), logprobs):
                self._append(seq, token, logprob)

    def _sample(self, logits, rows: np.ndarray, seqs: list[Sequence]):
        """(token ids, TokenLogprob or None) for `seqs`, whose logits are `rows` of device `logits`, with
        the artifact's compiled sampling functions (ModelRunner.apply_penalties, .sample, .logprobs)."""
        params = [s.request.params for s in seqs]
        raw = logits
        penalties = _penalty_pairs(rows, seqs)
        if penalties:
            logits = self.runner.apply_penalties(logits, *penalties)
        tokens = self.runner.sample(logits, rows, *_sampling_arrays(seqs))
        if any(p.logprobs for p in params):
            lp, top_lp, top_ids = self.runner.logprobs(raw, rows, tokens)
        return tokens, [TokenLogprob(int(tokens[j]), float(lp[j]), dict(zip(top_ids[j, :p.top_logprobs].tolist(),
                                                                            top_lp[j, :p.top_logprobs].tolist())))
                        if p.logprobs else None for j, p in enumerate(params)]

    def _device_tokens(self, logits, seqs: list[Sequence]):
        """Every row's token left on the device (overlapped loop): all argmax, or all drawn."""
        if seqs[0].request.params.greedy:
            return self.runner.greedy(logits)
        return self.runner.draw(logits, *_sampling_arrays(seqs))

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        req, params = seq.request, seq.request.params
        if req.first_token_time is None:
            req.first_token_time = time.perf_counter()
        if seq.index == 0 and seq.num_output == 0:
            for _ in range(params.n - 1):  # siblings fork from this prompt's pages (prefix cache)
                self._new_sequence(req)
        delta = Delta(req.request_id, seq.index)
        flush = token in req.stop_ids  # ended by a token: release held-back text
        if flush:
            seq.finish_reason = "stop"
        else:
            seq.token_ids.append(token)
            delta.token_ids.append(token)
            if logprob is not None:
                delta.logprobs.append(logprob)
                seq.logprobs.append(logprob)
            delta.text = seq.add_text(seq.detok.add(token))
            flush = seq.finish_reason is None and (
                (params.max_tokens is not None and seq.num_output >= params.max_tokens)
                or len(seq.token_ids) >= self.max_model_len)
            if flush:
                seq.finish_reason = "length"
        if flush:
            delta.text += seq.add_text(seq.detok.flush(), final=True)
        if seq.finish_reason:
            self.scheduler.finish(seq)
            delta.finish_reason = seq.finish_reason
            if req.finished:
                del self._requests[req.request_id]
                delta.output = req.output()
        self._emit(req, delta)

    def _end_request(self, req: Request, reason: str, error: str | None = None) -> None:
        for seq in req.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = reason
                self.scheduler.finish(seq, keep=error is None)  # after an error its KV state is suspect
        self._requests.pop(req.request_id, None)
        self._emit(req, Delta(req.request_id, 0, finish_reason=reason, output=req.output(error)))

    @staticmethod
    def _emit(req: Request, delta: Delta) -> None:
        try:
            req.sink(delta)
        except Exception:  # a broken consumer must not stop the engine
            traceback.print_exc(file=sys.stderr)


def _sampling_arrays(seqs: list[Sequence]) -> tuple[np.ndarray, ...]:
    """ModelRunner.sample's per-row arguments for `seqs` (greedy rows: temperature 0, no random number)."""
    params = [s.request.params for s in seqs]
    return (np.array([0 if p.greedy else p.temperature for p in params], np.float32),
            np.array([p.top_p for p in params], np.float32), np.array([p.top_k for p in params]),
            np.array([p.min_p for p in params], np.float32),
            np.array([0 if p.greedy else s.rng.random() for s, p in zip(seqs, params)]))


def _overlappable(params: list[SamplingParams]) -> bool:
    """Whether a step's rows can leave their tokens on the device (an overlapped step): no penalties
    (they need the tokens on the host) or logprobs, and all greedy or all drawn (one kernel picks them)."""
    return (all(not p.penalized and not p.logprobs for p in params)
            and len({p.greedy for p in params}) == 1)


def _penalty_pairs(rows: np.ndarray, seqs: list[Sequence]) -> tuple[np.ndarray, ...]:
    """ModelRunner.apply_penalties' arguments: the distinct (row, token) pairs each penalized sequence
    has seen (prompt and output for repetition, output only otherwise) with output counts and penalties;
    () when there are none."""
    parts = []
    for row, seq in zip(rows, seqs):
        p = seq.request.params
        if not p.penalized:
            continue
        out_ids, counts = np.unique(np.asarray(seq.output_ids, np.int64), return_counts=True)
        seen = np.union1d(seq.prompt_unique, out_ids) if p.repetition_penalty != 1 else out_ids
        seen_counts = np.zeros(len(seen), np.float32)
        seen_counts[np.searchsorted(seen, out_ids)] = counts
        n = len(seen)
        if n:
            parts.append((np.stack([np.full(n, row, np.int64), seen], axis=1), seen_counts,
                          *(np.full(n, x) for x in (p.repetition_penalty, p.frequency_penalty, p.presence_penalty))))
    return tuple(np.concatenate(column) for column in zip(*parts))
