"""OpenAI-compatible HTTP server over the Engine.

    python -m runtime.serve --w artifacts/ --host 0.0.0.0 --port 8000 [--max-num-seqs 64 --kvmem 512 ...]

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (streamed as server-sent events with
`stream: true`), /health, /metrics (Prometheus), /tokenize, /detokenize, and a chat page at /.
The engine decodes on its own thread; a handler only tokenizes (in a worker thread, so a huge
prompt never blocks the event loop), submits, and relays Deltas. A client that goes away aborts
its requests, which frees their KV pages at the next step. SIGTERM stops accepting connections and
lets running responses finish (up to --graceful-timeout seconds) before the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import secrets
import sys
import time
import uuid
from pathlib import Path

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from . import openai_protocol as api
from .engine import Engine, EngineConfig, parse_devices
from formats.errors import KilnError
from .metrics import CONTENT_TYPE, Metrics
from .request import Delta, RequestOutput
from .sampling import SamplingParams

STATIC = Path(__file__).parent / "static"


class _Call:
    """One API call's engine requests (one per prompt), read as one stream of (prompt index, Delta).

    Built on Engine.add_request rather than generate_async: one queue serves all of a call's prompts,
    and the sink counts every finished request for /metrics, aborted ones too."""

    def __init__(self, server: "Server", prompts: list[list[int]], params: SamplingParams):
        loop = asyncio.get_running_loop()
        self.server = server
        self.outputs: list[RequestOutput | None] = [None] * len(prompts)
        self.size = len(prompts) * params.n  # sequences, as max_num_seqs counts them
        self._queue: asyncio.Queue = asyncio.Queue()
        self._ids: list[str] = []
        self._closed = False

        def sink(i: int, delta: Delta) -> None:  # on the engine thread
            if delta.output is not None:
                server.metrics.observe(delta.output)
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._queue.put_nowait, (i, delta))

        server.active += self.size
        try:
            for i, ids in enumerate(prompts):
                self._ids.append(server.engine.add_request(ids, params, functools.partial(sink, i)))
        except KilnError:
            self.close()
            raise

    async def deltas(self):
        """Every Delta until all requests are done (aborted ones included)."""
        while None in self.outputs:
            i, delta = await self._queue.get()
            if delta.output is not None:
                self.outputs[i] = delta.output
            yield i, delta

    def close(self) -> None:
        """Abort the unfinished requests; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.server.active -= self.size
        for rid, out in zip(self._ids, self.outputs):
            if out is None:
                self.server.engine.abort(rid)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


class Server:
    """The FastAPI app over one Engine; `max_queue` sequences may wait beyond max_num_seqs, more get 429."""

    def __init__(self, engine: Engine, model_name: str, max_queue: int = 256, api_key: str | None = None):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.max_in_flight = engine.cfg.max_num_seqs + max_queue
        self.metrics = Metrics(engine)
        self.logprobs = api.Logprobs(engine.tokenizer)
        self.active = 0  # sequences of the calls submitted and not yet closed
        self.created = int(time.time())
        self.app = self._routes(FastAPI(title="Kiln", version="0.1.0"))

    # ---- helpers
    async def _authorize(self, authorization: str | None = Header(None)) -> None:
        """With an API key set, the model endpoints want `Authorization: Bearer KEY` (as OpenAI's)."""
        if self.api_key and not secrets.compare_digest(authorization or "", f"Bearer {self.api_key}"):
            raise api.ApiError(401, "invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key")

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise api.ApiError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                               "model", "model_not_found")

    async def _encode(self, prompt: str | list[int], params: SamplingParams, param: str) -> list[int]:
        """Token ids of a prompt, checked against the context length (OpenAI's 400 and wording)."""
        ids = await asyncio.to_thread(self.engine.tokenize, prompt)
        limit, want = self.engine.max_model_len, params.max_tokens or 0
        if len(ids) >= limit or (want > 0 and len(ids) + want > limit):
            raise api.ApiError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                               f"{len(ids) + want} tokens ({len(ids)} in the {param}, {want} for the completion). "
                               f"Please reduce the length of the {param} or the completion.", param,
                               "context_length_exceeded")
        return ids

    def _submit(self, prompts: list[list[int]], params: SamplingParams) -> _Call:
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
            async for _ in call.deltas():
                pass
        finally:
            call.close()
            watcher.cancel()
        if watcher.done() and not watcher.cancelled():  # the client left: nobody reads this
            return Response(status_code=499)
        if error := self._failed(call.outputs):
            raise api.ApiError(500, error, type="server_error")
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
            async for i, delta in call.deltas():
                if delta.finish_reason == "error":
                    yield _sse(api.error_body(delta.output.error or "internal error", "server_error"))
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
        engine = self.engine

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

        guarded = APIRouter(dependencies=[Depends(self._authorize)])

        @app.get("/health")
        async def health():
            return {"status": "ok"}

        @app.get("/metrics")
        async def metrics():
            return Response(await asyncio.to_thread(self.metrics.render), media_type=CONTENT_TYPE)  # waits a step

        @guarded.get("/v1/models")
        async def models():
            return {"object": "list", "data": [model_card()]}

        @guarded.get("/v1/models/{model:path}")
        async def model(model: str):
            self._check_model(model)
            return model_card()

        def model_card() -> dict:
            return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "kiln",
                    "max_model_len": engine.max_model_len}

        @guarded.post("/v1/completions")
        async def completions(body: api.CompletionRequest, request: Request):
            self._check_model(body.model)
            params = body.sampling_params()
            params.check()
            prompts = [await self._encode(p, params, "prompt") for p in body.prompts()]
            return await self._generate(request, body, prompts, params, chat=False)

        @guarded.post("/v1/chat/completions")
        async def chat_completions(body: api.ChatRequest, request: Request):
            self._check_model(body.model)
            params = body.sampling_params()
            params.check()
            text = engine.apply_chat_template([m.message() for m in body.messages], body.add_generation_prompt)
            return await self._generate(request, body, [await self._encode(text, params, "messages")], params,
                                        chat=True)

        @guarded.post("/tokenize")
        async def tokenize(body: api.TokenizeRequest):
            self._check_model(body.model)
            if (body.prompt is None) == (body.messages is None):
                raise api.ApiError(400, "give exactly one of prompt and messages", "prompt")
            text = body.prompt if body.messages is None else engine.apply_chat_template(
                [m.message() for m in body.messages], body.add_generation_prompt)
            encode = engine.tokenize if body.add_special_tokens else functools.partial(
                engine.tokenizer.encode, add_special_tokens=False)
            ids = await asyncio.to_thread(encode, text)
            return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}

        @guarded.post("/detokenize")
        async def detokenize(body: api.DetokenizeRequest):
            self._check_model(body.model)
            vocab = engine.runner.vocab_size
            if bad := [t for t in body.tokens if not 0 <= t < vocab]:
                raise api.ApiError(400, f"token {bad[0]} is not in the vocabulary (size {vocab})", "tokens")
            return {"prompt": engine.tokenizer.decode(body.tokens)}

        app.include_router(guarded)

        @app.get("/", include_in_schema=False)
        async def chat_page():
            return FileResponse(STATIC / "index.html")

        app.mount("/static", StaticFiles(directory=STATIC), name="static")
        return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m runtime.serve", description="Serve an artifact over the OpenAI API.")
    p.add_argument("--w", default="artifacts/", help="artifact folder, or a folder of artifacts (the newest is "
                   "served)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--d", default="0", help="device index on the artifact's target (e.g. 0 or cuda:1; 0,1: "
                   "tensor-parallel over devices 0 and 1)")
    p.add_argument("--kvmem", type=float, help="KV cache: MB if > 1, else a fraction of device memory")
    p.add_argument("--max-num-seqs", "--max_num_seqs", type=int, default=64)
    p.add_argument("--max-model-len", "--max_model_len", type=int, help="tokens per sequence (prompt + output)")
    p.add_argument("--max-num-batched-tokens", "--max_num_batched_tokens", type=int, default=2048)
    p.add_argument("--served-model-name", "--served_model_name", help="the model id clients use (default: "
                   "the artifact folder's name)")
    p.add_argument("--seed", type=int, help="seed for requests that bring none")
    p.add_argument("--api-key", "--api_key", default=os.environ.get("KILN_API_KEY"),
                   help="require `Authorization: Bearer KEY` on the model endpoints (default: $KILN_API_KEY)")
    p.add_argument("--max-queue", "--max_queue", type=int, default=256,
                   help="sequences that may wait beyond --max-num-seqs; more are answered 429")
    p.add_argument("--graceful-timeout", "--graceful_timeout", type=float, default=30,
                   help="seconds to let running responses finish after SIGTERM")
    p.add_argument("--log-level", "--log_level", default="info")
    args = p.parse_args(argv)
    try:
        devices = parse_devices(args.d)
        engine = Engine(EngineConfig(model_path=args.w, device_id=devices[0],
                                     device_ids=devices if len(devices) > 1 else None, kvmem=args.kvmem,
                                     max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                                     max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed))
    except (KilnError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    name = args.served_model_name or engine.runner.artifact.path.name
    server = Server(engine, name, args.max_queue, args.api_key)
    print(f"kiln: serving {name} (max_model_len {engine.max_model_len}) on http://{args.host}:{args.port}",
          file=sys.stderr)
    try:
        uvicorn.run(server.app, host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=args.graceful_timeout)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
