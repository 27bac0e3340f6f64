"""OpenAI-compatible HTTP server over the Engine.

    python -m runtime.serve --w artifacts/ --host 0.0.0.0 --port 8000 [--max-num-seqs 64 --kvmem 512 ...]

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (streamed as server-sent events with
`stream: true`), /health, /metrics (Prometheus), /tokenize, /detokenize, and a chat page at /.
The port is bound before the model loads (/health answers 503 "loading" meanwhile). Each call is
one Engine.generate_async stream per prompt; the engine decodes on its own thread, a handler only
checks the request against the Limits, tokenizes in a worker thread (the tokenizer releases the
GIL, so a huge prompt never stalls the event loop or the engine), and relays Deltas. A client that
goes away aborts its requests, which frees their KV pages at the next step. On SIGTERM or Ctrl-C
the server stops accepting, lets responses run for --graceful-timeout seconds, then aborts the rest:
every open stream ends with an error event and [DONE], every waiting call with a 503.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import secrets
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from formats.errors import KilnError

from . import openai_protocol as api
from .cli import add_engine_flags, engine_config, number, parser
from .engine import Engine
from .metrics import CONTENT_TYPE, Metrics
from .request import RequestOutput
from .sampling import SamplingParams

STATIC = Path(__file__).parent / "static"


@dataclass
class Limits:
    """What one HTTP request may ask for; each has a flag (README: "Server limits"). Checked before any
    work that grows with the request (parsing aside, which the body limit bounds)."""

    max_body_bytes: int = 8 << 20  # 413 beyond
    max_header_bytes: int = 16 << 10  # all header names and values together; 431 beyond
    max_prompt_chars: int = 1 << 20  # a prompt, or a conversation's contents, before tokenizing
    max_stops: int = 64  # stop strings per request (and stop_token_ids)
    max_stop_chars: int = 512  # characters per stop string (the stops' automaton: ≤ 32k states, ~30 ms to build)
    max_n: int = 128  # completions per prompt


# Routes open without the API key: liveness, and the chat page (/ and /static/*: files only; the page's own
# calls need the key). /docs and /openapi.json need it.
OPEN_ROUTES = ("/health", "/")
# A refused body up to this size is read and dropped before its 413 (_drain says why); a larger one is not
DRAIN_BYTES = 64 << 20


class _Call:
    """One API call: an Engine.generate_async stream per prompt, read as one stream of (prompt index,
    Delta). Every finished request, aborted ones too, is counted for /metrics as its last Delta comes."""

    def __init__(self, server: "Server", prompts: list[list[int]], params: SamplingParams):
        self.server = server
        self.outputs: list[RequestOutput | None] = [None] * len(prompts)
        self.size = len(prompts) * params.n  # sequences, as max_num_seqs counts them
        self._ids = [uuid.uuid4().hex for _ in prompts]
        self._queue: asyncio.Queue = asyncio.Queue()
        self._closed = False
        server.active += self.size
        server.calls.add(self)
        try:
            streams = [server.engine.generate_async(params, ids, rid) for ids, rid in zip(prompts, self._ids)]
        except KilnError:
            self.close()
            raise
        self._pumps = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(streams)]

    async def _pump(self, i: int, stream) -> None:
        async with contextlib.aclosing(stream):  # closed here, not by the GC on whatever thread collects it
            async for delta in stream:
                if delta.output is not None:
                    self.server.metrics.observe(delta.output)
                self._queue.put_nowait((i, delta))

    async def deltas(self):
        """Every Delta until all requests are done (aborted ones included)."""
        while None in self.outputs:
            i, delta = await self._queue.get()
            if delta.output is not None:
                self.outputs[i] = delta.output
            yield i, delta

    def close(self) -> None:
        """Abort the unfinished requests (their last Deltas still reach the pumps); idempotent."""
        if self._closed:
            return
        self._closed = True
        self.server.active -= self.size
        self.server.calls.discard(self)
        for rid, out in zip(self._ids, self.outputs):
            if out is None:
                self.server.engine.abort(rid)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


SHUTTING_DOWN = "the server is shutting down; this response was cut short"


class Server:
    """The FastAPI app over one Engine (attached once loaded); `max_queue` sequences may wait beyond
    max_num_seqs, more get 429."""

    def __init__(self, engine: Engine | None = None, model_name: str | None = None, max_queue: int = 256,
                 api_key: str | None = None, limits: Limits | None = None, open_metrics: bool = False):
        self.max_queue, self.limits = max_queue, limits or Limits()
        self.api_key = None if api_key is None else b"Bearer " + api_key.encode("utf-8", "surrogateescape")
        self.open_routes = OPEN_ROUTES + (("/metrics",) if open_metrics else ())
        self.engine: Engine | None = None
        self.closing = False  # set on SIGTERM: new calls get 503, open ones are aborted after the grace period
        self.active = 0  # sequences of the calls submitted and not yet closed
        self.calls: set[_Call] = set()
        self.created = int(time.time())
        self.app = self._routes(FastAPI(title="Kiln", version="0.1.0"))
        if engine is not None:
            self.attach(engine, model_name)

    def attach(self, engine: Engine, model_name: str | None = None) -> None:
        """Serve `engine` (until now the model routes answered 503 "loading")."""
        self.model_name = model_name or engine.runner.artifact.path.name
        self.max_in_flight = engine.cfg.max_num_seqs + self.max_queue
        self.metrics = Metrics(engine)
        self.logprobs = api.Logprobs(engine.tokenizer)
        self.engine = engine

    def uvicorn_config(self, **kwargs) -> uvicorn.Config:
        """uvicorn's settings for this app: h11 buffers a header block of up to 4x --max-header-kb (and at
        least 256 KiB) so that the app itself answers an oversized one with an OpenAI-shaped 431."""
        return uvicorn.Config(self.app, h11_max_incomplete_event_size=max(4 * self.limits.max_header_bytes,
                                                                          256 << 10), **kwargs)

    async def shut_down(self, grace: float) -> None:
        """Refuse new calls; after `grace` seconds abort the open ones (streams end with an error event)."""
        self.closing = True
        deadline = time.monotonic() + grace
        while self.calls and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for call in list(self.calls):
            call.close()

    # ---- checks
    def _ready(self) -> None:
        if self.closing:
            raise api.ApiError(503, SHUTTING_DOWN.split(";")[0], type="server_error", code="shutting_down")
        if self.engine is None:
            raise api.ApiError(503, "the model is still loading; retry in a moment (GET /health says when)",
                               type="server_error", code="loading")

    def _authorized(self, scope) -> bool:
        """Bytes compared in constant time: any header or key, ASCII or not, is a 401 at worst."""
        if self.api_key is None or scope["path"] in self.open_routes or scope["path"].startswith("/static/"):
            return True
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        return secrets.compare_digest(given, self.api_key)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise api.ApiError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                               "model", "model_not_found")

    def _check_text(self, text: str, param: str) -> None:
        if len(text) > self.limits.max_prompt_chars:
            raise api.ApiError(400, f"the {param} has {len(text)} characters; this server takes at most "
                               f"{self.limits.max_prompt_chars} (--max-prompt-chars)", param, "prompt_too_long")
        try:
            text.encode("utf-8")
        except UnicodeError:
            raise api.ApiError(400, f"the {param} is not valid UTF-8 text (a lone surrogate?)", param) from None

    async def _params(self, body) -> SamplingParams:
        """The request's SamplingParams, checked against the limits; the stop-string automaton is built
        here, off the event loop."""
        params = body.sampling_params()
        limits = self.limits
        if params.n > limits.max_n:
            raise api.ApiError(400, f"n is {params.n}; this server allows at most {limits.max_n} (--max-n)", "n")
        for field, stops in (("stop", params.stop), ("stop_token_ids", params.stop_token_ids)):
            if len(stops) > limits.max_stops:
                raise api.ApiError(400, f"{len(stops)} {field}; this server allows at most {limits.max_stops} "
                                   "(--max-stops)", field)
        if long := [s for s in params.stop if len(s) > limits.max_stop_chars]:
            raise api.ApiError(400, f"a stop string has {len(long[0])} characters; this server allows at most "
                               f"{limits.max_stop_chars} (--max-stop-chars)", "stop")
        for s in params.stop:
            self._check_text(s, "stop")
        params.check()
        if params.stop:
            await asyncio.to_thread(lambda: params.stop_strings)
        return params

    async def _encode(self, prompt: str | list[int], params: SamplingParams, param: str) -> list[int]:
        """Token ids of a prompt, checked against the context length (OpenAI's 400 and wording)."""
        limit, want = self.engine.max_model_len, params.max_tokens or 0
        if isinstance(prompt, str):
            self._check_text(prompt, param)
        if isinstance(prompt, list) and len(prompt) >= limit:
            ids = prompt  # too long whatever the ids are: no need to look at each
        else:
            ids = await asyncio.to_thread(self.engine.tokenize, prompt)
        if len(ids) >= limit or (want > 0 and len(ids) + want > limit):
            raise api.ApiError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                               f"{len(ids) + want} tokens ({len(ids)} in the {param}, {want} for the completion). "
                               f"Please reduce the length of the {param} or the completion.", param,
                               "context_length_exceeded")
        return ids

    async def _chat_text(self, body) -> str:
        """The conversation through the chat template (in a worker thread: templates can be slow)."""
        self._check_text("".join(m.text() for m in body.messages), "messages")
        kwargs = body.chat_template_kwargs or {}
        if taken := {"messages", "add_generation_prompt", "bos_token", "eos_token", "tools",
                     "documents"} & set(kwargs):
            raise api.ApiError(400, f"chat_template_kwargs may not set {sorted(taken)[0]}", "chat_template_kwargs")
        return await asyncio.to_thread(self.engine.apply_chat_template, [m.message() for m in body.messages],
                                       body.add_generation_prompt, **kwargs)

    def _submit(self, prompts: list[list[int]], params: SamplingParams) -> _Call:
        self._ready()
        if self.active + len(prompts) * params.n > self.max_in_flight:
            raise api.ApiError(429, f"server is full ({self.active} sequences in flight, limit {self.max_in_flight}); "
                               "retry later",
                               code="rate_limit_exceeded", type="rate_limit_error")
        return _Call(self, prompts, params)

    @staticmethod
    def _failed(outputs: list[RequestOutput]) -> str | None:
        return next((o.error for o in outputs if o is not None and o.error), None)

    # ---- generation
    async def _generate(self, request: Request, body, prompts: list[list[int]], params: SamplingParams, chat: bool):
        call = self._submit(prompts, params)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if body.stream:  # the background close covers a client that leaves before the first chunk
            return StreamingResponse(self._stream(call, body, rid, params, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(call.close))
        watcher = asyncio.create_task(self._abort_when_gone(request, call))
        try:
            async with contextlib.aclosing(call.deltas()) as deltas:
                async for _ in deltas:
                    pass
        finally:
            call.close()
            watcher.cancel()
        if watcher.done() and not watcher.cancelled():  # the client left: nobody reads this
            return Response(status_code=499)
        if error := self._failed(call.outputs):
            raise api.ApiError(500, error, type="server_error")
        if self.closing and any(c.finish_reason == "abort" for o in call.outputs for c in o.outputs):
            raise api.ApiError(503, SHUTTING_DOWN, type="server_error", code="shutting_down")
        choice = api.chat_choice if chat else api.completion_choice
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_name, "system_fingerprint": None,
                "choices": [choice(i * params.n + c.index, c, self.logprobs)
                            for i, out in enumerate(call.outputs) for c in out.outputs],
                "usage": api.usage(call.outputs)}

    @staticmethod
    async def _abort_when_gone(request: Request, call: _Call) -> None:
        """For a non-streaming call (a stream notices a departed client when it writes)."""
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
        call.close()

    async def _stream(self, call: _Call, body, rid: str, params: SamplingParams, chat: bool):
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name, "system_fingerprint": None}
        if body.include_usage:
            head["usage"] = None
        offsets = {}  # legacy logprobs' text_offset per choice
        try:
            if chat:
                yield _sse(dict(head, choices=[{"index": k, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}
                                               for k in range(len(call.outputs) * params.n)]))
            async with contextlib.aclosing(call.deltas()) as deltas:  # closed when the client leaves, not by the GC
                async for i, delta in deltas:
                    if delta.finish_reason == "error":
                        yield _sse(api.error_body(delta.output.error or "internal error", "server_error"))
                        break
                    if delta.finish_reason == "abort" and self.closing:
                        yield _sse(api.error_body(SHUTTING_DOWN, "server_error", code="shutting_down"))
                        break
                    if not (delta.text or delta.token_ids or delta.finish_reason):
                        continue
                    k = i * params.n + delta.index
                    lp = None
                    if params.logprobs and chat:
                        lp = self.logprobs.chat(delta.logprobs)
                    elif params.logprobs:
                        lp = self.logprobs.completion(delta.logprobs, offsets.get(k, 0))
                        offsets[k] = sum(map(len, lp["tokens"]), offsets.get(k, 0))
                    content = ({"content": delta.text} if delta.text else {}) if chat else {"text": delta.text}
                    choice = dict({"index": k}, **({"delta": content} if chat else content),
                                  logprobs=lp, finish_reason=delta.finish_reason)
                    yield _sse(dict(head, choices=[choice]))
                else:
                    if body.include_usage:
                        yield _sse(dict(head, choices=[], usage=api.usage(call.outputs)))
            yield "data: [DONE]\n\n"
        finally:
            call.close()

    # ---- the app
    def _routes(self, app: FastAPI) -> FastAPI:
        @app.exception_handler(api.ApiError)
        async def api_error(_, e: api.ApiError):
            return JSONResponse(e.body(), e.status)

        @app.exception_handler(KilnError)
        async def kiln_error(_, e: KilnError):
            return JSONResponse(api.error_body(str(e), "invalid_request_error"), 400)

        @app.exception_handler(RequestValidationError)
        async def bad_request(_, e: RequestValidationError):
            errors = e.errors()
            if errors and errors[0]["type"] == "json_invalid":
                detail = errors[0].get("ctx", {}).get("error", "")
                return JSONResponse(api.error_body(f"malformed JSON body: {detail}".rstrip(": "),
                                                   "invalid_request_error"), 400)
            where = [".".join(str(p) for p in err["loc"][1:]) for err in errors]
            if not where[0]:  # the body itself: not an object, or not sent as JSON
                message = "the request body must be a JSON object, sent with Content-Type: application/json"
            else:
                message = "; ".join(f"{w}: {err['msg']}" for w, err in zip(where, errors[:3]))
            return JSONResponse(api.error_body(message, "invalid_request_error", where[0] or None), 400)

        @app.exception_handler(HTTPException)
        async def http_error(_, e: HTTPException):
            kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
            return JSONResponse(api.error_body(str(e.detail), kind), e.status_code)

        @app.exception_handler(Exception)
        async def internal_error(_, e: Exception):  # a bug in Kiln; uvicorn logs the traceback
            return JSONResponse(api.error_body(f"internal error: {type(e).__name__}", "server_error"), 500)

        async def ready_check() -> None:  # async: FastAPI would run a plain function in its thread pool
            self._ready()

        ready = APIRouter(dependencies=[Depends(ready_check)])

        @app.get("/health")
        async def health():
            status = "shutting down" if self.closing else "loading" if self.engine is None else "ok"
            return JSONResponse({"status": status}, 200 if status == "ok" else 503)

        @ready.get("/metrics")
        async def metrics():
            return Response(await asyncio.to_thread(self.metrics.render), media_type=CONTENT_TYPE)  # waits a step

        @ready.get("/v1/models")
        async def models():
            return {"object": "list", "data": [model_card()]}

        @ready.get("/v1/models/{model:path}")
        async def model(model: str):
            self._check_model(model)
            return model_card()

        def model_card() -> dict:
            return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "kiln",
                    "max_model_len": self.engine.max_model_len}

        @ready.post("/v1/completions")
        async def completions(body: api.CompletionRequest, request: Request):
            self._check_model(body.model)
            params = await self._params(body)
            prompts = [await self._encode(p, params, "prompt") for p in body.prompts()]
            return await self._generate(request, body, prompts, params, chat=False)

        @ready.post("/v1/chat/completions")
        async def chat_completions(body: api.ChatRequest, request: Request):
            self._check_model(body.model)
            params = await self._params(body)
            text = await self._chat_text(body)
            return await self._generate(request, body, [await self._encode(text, params, "messages")], params,
                                        chat=True)

        @ready.post("/tokenize")
        async def tokenize(body: api.TokenizeRequest):
            self._check_model(body.model)
            if (body.prompt is None) == (body.messages is None):
                raise api.ApiError(400, "give exactly one of prompt and messages", "prompt")
            text = body.prompt if body.messages is None else await self._chat_text(body)
            self._check_text(text, "prompt")
            encode = self.engine.tokenize if body.add_special_tokens else functools.partial(
                self.engine.tokenizer.encode, add_special_tokens=False)
            ids = await asyncio.to_thread(encode, text)
            return {"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids}

        @ready.post("/detokenize")
        async def detokenize(body: api.DetokenizeRequest):
            self._check_model(body.model)
            vocab = self.engine.runner.vocab_size
            if bad := [t for t in body.tokens if not 0 <= t < vocab]:
                raise api.ApiError(400, f"token {bad[0]} is not in the vocabulary (size {vocab})", "tokens")
            return {"prompt": await asyncio.to_thread(self.engine.tokenizer.decode, body.tokens)}

        app.include_router(ready)

        @app.get("/", include_in_schema=False)
        async def chat_page():
            return FileResponse(STATIC / "index.html")

        app.mount("/static", StaticFiles(directory=STATIC), name="static")
        return _Gate(app, self)


class _Gate:
    """ASGI middleware in front of the app: header size (431), API key (401) and body size (413) are
    checked before FastAPI parses anything; the body is read here, up to the limit, and replayed."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limits = self.server.limits
        header_bytes = sum(len(k) + len(v) for k, v in scope["headers"])
        if header_bytes > limits.max_header_bytes:
            return await _reply(scope, receive, send, 431, f"request headers are {header_bytes} bytes; this server takes at most "
                                           f"{limits.max_header_bytes} (--max-header-kb)", code="headers_too_large")
        if not self.server._authorized(scope):
            return await _reply(scope, receive, send, 401, "invalid or missing API key (Authorization: Bearer ...)",
                                code="invalid_api_key")
        length = next((v for k, v in scope["headers"] if k == b"content-length"), b"0")
        too_big = f"the request body is over {limits.max_body_bytes} bytes, this server's limit (--max-body-mb)"
        if not length.isdigit() or int(length) > limits.max_body_bytes:
            if length.isdigit() and int(length) <= DRAIN_BYTES:
                await _drain(receive)
            return await _reply(scope, receive, send, 413, too_big if length.isdigit() else "malformed Content-Length",
                                code="body_too_large")
        body, more = [], True
        size = 0
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            body.append(message.get("body", b""))
            size += len(body[-1])
            more = message.get("more_body", False)
            if size > limits.max_body_bytes:
                if more:
                    await _drain(receive)
                return await _reply(scope, receive, send, 413, too_big, code="body_too_large")
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the client's disconnect
            replayed = True
            return {"type": "http.request", "body": b"".join(body), "more_body": False}

        return await self.app(scope, replay, send)


async def _drain(receive) -> None:
    """Read and drop the rest of a refused body, up to DRAIN_BYTES: the reply closes the connection, and a
    socket closed with unread bytes sends a TCP reset that can discard the reply before the client reads it."""
    seen = 0
    while seen <= DRAIN_BYTES:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        seen += len(message.get("body", b""))


async def _reply(scope, receive, send, status: int, message: str, code: str) -> None:
    await JSONResponse(api.error_body(message, "invalid_request_error", code=code), status,
                       headers={"Connection": "close"})(scope, receive, send)


class _Uvicorn(uvicorn.Server):
    """uvicorn, plus: the first SIGTERM/SIGINT also starts the Server's own shutdown (abort what is still
    running after the grace period), so no stream is cut without its last event."""

    def __init__(self, config: uvicorn.Config, server: Server, grace: float):
        super().__init__(config)
        self.kiln, self.grace = server, grace

    def handle_exit(self, sig, frame) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if first:
            loop = asyncio.get_running_loop()
            loop.call_soon_threadsafe(lambda: loop.create_task(self.kiln.shut_down(self.grace)))


# ---- the command line
def _parser() -> argparse.ArgumentParser:
    """runtime/cli.py's model and engine flags (--w --d --dtype --quant --kvmem ...), plus the server's own."""
    d = Limits()
    p = parser("python -m runtime.serve", "Serve a model over the OpenAI API. The port is bound at once; /health "
               "answers 503 {\"status\": \"loading\"} until the model is loaded (a model file is compiled first).")
    p.epilog = ("With an API key, every route needs `Authorization: Bearer KEY` except /health and the chat page's "
                "files (/ and /static/*), and /metrics with --open-metrics.")
    add_engine_flags(p)
    pos, count = number(int, 1), number(int, 0)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=number(int, 1, 65535), default=8000, help="TCP port")
    g.add_argument("--served-model-name", "--served_model_name", help="the model id clients use (default: "
                   "the artifact folder's name)")
    g.add_argument("--seed", type=number(int, 0, 2 ** 63 - 1), help="seed for requests that bring none")
    g.add_argument("--api-key", "--api_key", default=os.environ.get("KILN_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $KILN_API_KEY)")
    g.add_argument("--open-metrics", "--open_metrics", action="store_true",
                   help="serve /metrics without the API key")
    g.add_argument("--max-queue", "--max_queue", type=count, default=256,
                   help="sequences that may wait beyond --max-num-seqs; more are answered 429")
    g.add_argument("--max-body-mb", type=number(float, 0, 4096, low_open=True), default=d.max_body_bytes / 2 ** 20,
                   help="request body size limit in MB (413 beyond)")
    g.add_argument("--max-header-kb", type=number(float, 1, 1024), default=d.max_header_bytes / 2 ** 10,
                   help="request header size limit in KB (431 beyond)")
    g.add_argument("--max-prompt-chars", type=pos, default=d.max_prompt_chars,
                   help="characters of a prompt or conversation, checked before tokenizing")
    g.add_argument("--max-stops", type=count, default=d.max_stops, help="stop strings (and stop_token_ids) per request")
    g.add_argument("--max-stop-chars", type=pos, default=d.max_stop_chars, help="characters per stop string")
    g.add_argument("--max-n", type=pos, default=d.max_n, help="completions per prompt (n)")
    g.add_argument("--graceful-timeout", "--graceful_timeout", type=number(float, 0, 3600), default=1.0,
                   help="seconds responses may keep running after SIGTERM/Ctrl-C; then they end with an error "
                        "event (streams) or a 503")
    g.add_argument("--log-level", "--log_level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    return p


def main(argv: list[str] | None = None) -> None:
    try:
        args = _parser().parse_args(argv)
    except KilnError as e:  # refused before anything starts
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    server = Server(max_queue=args.max_queue, api_key=args.api_key, open_metrics=args.open_metrics,
                    limits=Limits(int(args.max_body_mb * 2 ** 20), int(args.max_header_kb * 2 ** 10),
                                  args.max_prompt_chars, args.max_stops, args.max_stop_chars, args.max_n))
    web = _Uvicorn(server.uvicorn_config(host=args.host, port=args.port, log_level=args.log_level,
                                         timeout_graceful_shutdown=args.graceful_timeout + 2),
                   server, args.graceful_timeout)
    failure: list[str] = []

    def load() -> None:  # while uvicorn already answers /health with "loading"
        try:
            engine = Engine(dataclasses.replace(engine_config(args), seed=args.seed))
            args.d.check(engine.runner.artifact.target)
        except (KilnError, ValueError) as e:
            failure.append(str(e))
            web.should_exit = True
            return
        server.attach(engine, args.served_model_name)
        print(f"kiln: serving {server.model_name} (max_model_len {engine.max_model_len}) on "
              f"http://{args.host}:{args.port}", file=sys.stderr)

    loader = threading.Thread(target=load, name="kiln-load", daemon=True)
    loader.start()
    try:
        web.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down
        pass
    except SystemExit:  # uvicorn could not bind the port
        failure.append(f"cannot listen on {args.host}:{args.port} (in use, or not permitted)")
    finally:
        if server.engine is not None:
            server.engine.close()
    if failure:
        print(f"error: {failure[0]}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
