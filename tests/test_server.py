"""The OpenAI server on stories260K, driven with the official `openai` client on 127.0.0.1.

Reference: the Python API (Engine.generate_sync) with the same SamplingParams on the same engine.
Also: OpenAI-shaped 4xx for bad requests, 429 when full, aborts on disconnect, /metrics, /tokenize.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from runtime import Engine, EngineConfig, Message, SamplingParams
from runtime.serve import Server

MODEL = "stories"
PROMPTS = ["Once upon a time", "Tom had a dog", "Lily went to the park and"]


class LiveServer:
    """A Server on a free 127.0.0.1 port; uvicorn runs on a thread, the engine on its own."""

    def __init__(self, engine: Engine, **kwargs):
        self.engine = engine
        self.server = Server(engine, MODEL, **kwargs)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.uvicorn = uvicorn.Server(self.server.uvicorn_config(log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, **kwargs)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics").text
        return {m[1]: float(m[2]) for m in re.finditer(r"^(\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}

    def wait_idle(self, timeout: float = 10) -> dict[str, float]:
        """/metrics once no request runs or waits, no KV page is held by one and no call is open."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["kiln_num_requests_running"] == m["kiln_num_requests_waiting"] == m["kiln_kv_pages_used"] == \
                    self.server.active == 0:
                return m
            assert time.monotonic() < deadline, f"still busy: {m}"
            time.sleep(0.05)

    def close(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)


@contextlib.contextmanager
def serving(artifact, max_num_seqs: int = 64):
    """A live server over a fresh engine on `artifact`, shut down afterwards."""
    with Engine(EngineConfig(model_path=str(artifact), max_num_seqs=max_num_seqs)) as engine:
        server = LiveServer(engine)
        try:
            yield server
        finally:
            server.close()


@pytest.fixture(scope="module")
def live(stories_artifact):
    with serving(stories_artifact) as server:
        yield server


def reference(live, prompt: str, **params):
    """What the Python API returns for the same request."""
    return live.engine.generate_sync(SamplingParams(**params), [prompt])[0]


def chat_prompt(live, content: str) -> str:
    return live.engine.apply_chat_template([Message("user", content)])


def test_models_and_health(live):
    assert [m.id for m in live.client().models.list().data] == [MODEL]
    assert httpx.get(live.url + "/health").status_code == 200
    assert live.client().models.retrieve(MODEL).id == MODEL


@pytest.mark.parametrize("stream", [False, True])
def test_completions_match_python_api(live, stream):
    client = live.client()
    for prompt in PROMPTS:
        ref = reference(live, prompt, temperature=0, max_tokens=24)
        if stream:
            chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}))
            assert len(chunks) > 2
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            usage = chunks[-1].usage
        else:
            out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
            text, finish, usage = out.choices[0].text, [out.choices[0].finish_reason], out.usage
        assert text == ref.text
        assert finish == [ref.finish_reason] == ["length"]
        assert (usage.prompt_tokens, usage.completion_tokens) == (ref.num_prompt_tokens, 24)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_matches_python_api(live, stream):
    client = live.client()
    ref = reference(live, chat_prompt(live, "Tell me a story."), temperature=0, max_tokens=30)
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}], temperature=0)
    if stream:
        chunks = list(client.chat.completions.create(**kwargs, max_completion_tokens=30, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        out = client.chat.completions.create(**kwargs, max_tokens=30)
        text, finish = out.choices[0].message.content, out.choices[0].finish_reason
        assert out.usage.prompt_tokens == ref.num_prompt_tokens
    assert (text, finish) == (ref.text, ref.finish_reason)


SAMPLED = dict(temperature=0.9, top_p=0.9, seed=1234, presence_penalty=0.5, frequency_penalty=0.3, max_tokens=20)
EXTRA = dict(top_k=40, min_p=0.05, repetition_penalty=1.1)  # vLLM's, through extra_body


def test_n2_and_seed_reproduce_python_api(live):
    client = live.client()
    ref = live.engine.generate_sync(SamplingParams(n=2, **SAMPLED, **EXTRA), [PROMPTS[0]])[0]
    first = client.completions.create(model=MODEL, prompt=PROMPTS[0], n=2, extra_body=EXTRA, **SAMPLED)
    again = client.completions.create(model=MODEL, prompt=PROMPTS[0], n=2, extra_body=EXTRA, **SAMPLED)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)] == [c.text for c in ref.outputs]
    assert texts[0] != texts[1]
    streamed = ["", ""]
    for chunk in client.completions.create(model=MODEL, prompt=PROMPTS[0], n=2, extra_body=EXTRA, stream=True,
                                           **SAMPLED):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == texts
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2,
                                          extra_body=EXTRA, **SAMPLED)
    chat_ref = live.engine.generate_sync(SamplingParams(n=2, **SAMPLED, **EXTRA), [chat_prompt(live, "Hi")])[0]
    assert [c.message.content for c in chat.choices] == [c.text for c in chat_ref.outputs]


def test_several_prompts_times_n_streamed(live):
    client = live.client()
    kwargs = dict(model=MODEL, prompt=PROMPTS[:2], n=2, max_tokens=10, temperature=0)
    whole = client.completions.create(**kwargs)
    streamed = [""] * 4
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    refs = [o.text for o in live.engine.generate_sync(SamplingParams(temperature=0, max_tokens=10), PROMPTS[:2])]
    assert [c.text for c in sorted(whole.choices, key=lambda c: c.index)] == streamed == [refs[0]] * 2 + [refs[1]] * 2
    assert whole.usage.completion_tokens == 40


def test_stop_strings_and_token_ids(live):
    client = live.client()
    ref = reference(live, PROMPTS[0], temperature=0, max_tokens=40, stop=["Lily", "park"])
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=40,
                                    stop=["Lily", "park"])
    assert (out.choices[0].text, out.choices[0].finish_reason) == (ref.text, "stop")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=40, stop=["Lily", "park"], stream=True))
    assert streamed == ref.text and "Lily" not in streamed
    token = ref.token_ids[3]
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=40,
                                    extra_body={"stop_token_ids": [token]})
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "stop"


def test_logprobs_match_python_api(live):
    client = live.client()
    ref = reference(live, PROMPTS[1], temperature=0, max_tokens=8, logprobs=True, top_logprobs=3).outputs[0]
    out = client.completions.create(model=MODEL, prompt=PROMPTS[1], temperature=0, max_tokens=8, logprobs=3)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([t.logprob for t in ref.logprobs], abs=1e-4)
    assert "".join(lp.tokens) == out.choices[0].text == ref.text
    assert [list(top.values()) for top in lp.top_logprobs] == \
        [pytest.approx(list(t.top.values()), abs=1e-4) for t in ref.logprobs]
    assert lp.text_offset[0] == 0 and lp.text_offset[-1] == len(ref.text) - len(lp.tokens[-1])

    chat_ref = reference(live, chat_prompt(live, "Hi"), temperature=0, max_tokens=8, logprobs=True,
                         top_logprobs=2).outputs[0]
    for stream in (False, True):
        kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0, max_tokens=8,
                      logprobs=True, top_logprobs=2)
        if stream:
            content = [t for c in client.chat.completions.create(**kwargs, stream=True)
                       if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
        else:
            content = client.chat.completions.create(**kwargs).choices[0].logprobs.content
        assert [t.logprob for t in content] == pytest.approx([t.logprob for t in chat_ref.logprobs], abs=1e-4)
        assert [len(t.top_logprobs) for t in content] == [2] * 8
        assert "".join(t.token for t in content) == chat_ref.text


def test_tokenize_detokenize(live):
    r = httpx.post(live.url + "/tokenize", json={"prompt": "Once upon a time"}).json()
    assert r["tokens"] == live.engine.tokenizer.encode("Once upon a time") and r["count"] == len(r["tokens"])
    assert httpx.post(live.url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "Once upon a time"
    chat = httpx.post(live.url + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["tokens"] == live.engine.tokenize(chat_prompt(live, "Hi"))
    assert httpx.post(live.url + "/detokenize", json={"tokens": [10 ** 6]}).status_code == 400


def test_metrics(live):
    before = live.metrics()
    live.client().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0)
    m = live.wait_idle()
    assert m["kiln_generation_tokens_total"] - before["kiln_generation_tokens_total"] == 5
    assert m["kiln_prompt_tokens_total"] > before["kiln_prompt_tokens_total"]
    assert m["kiln_time_to_first_token_seconds_count"] == before["kiln_time_to_first_token_seconds_count"] + 1
    assert m["kiln_time_per_output_token_seconds_count"] > 0
    assert m["kiln_kv_pages_free"] + m["kiln_kv_pages_cached"] == m["kiln_kv_pages_total"]


def _aborts(live) -> float:
    return live.metrics().get('kiln_request_success_total{finished_reason="abort"}', 0)


def test_disconnect_aborts_and_frees_pages(live):
    aborted = _aborts(live)
    long = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=400, temperature=0.8, extra_body={"ignore_eos": True})
    stream = live.client().completions.create(**long, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    with pytest.raises(openai.APITimeoutError):  # a non-streaming client that gives up
        live.client(timeout=0.3).completions.create(**dict(long, max_tokens=500, n=16))
    live.wait_idle()
    deadline = time.monotonic() + 5
    while _aborts(live) < aborted + 2:
        assert time.monotonic() < deadline, "requests of departed clients were not aborted"
        time.sleep(0.05)


BAD = [  # (path, body: dict or raw str, status, words of the message)
    ("/v1/completions", "{not json", 400, "malformed JSON"),
    ("/v1/completions", "[1, 2]", 400, "JSON object"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": -1}, 400, "seed"),
    ("/v1/completions", "{\"model\": \"stories\", \"prompt\": \"hi\", \"temperature\": NaN}", 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "frobnicate": True}, 400, "frobnicate"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"5": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": [5, 10 ** 7]}, 400, "vocabulary"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "empty"),
    ("/v1/completions", '{"model": "stories", "prompt": "bad \\ud800 text"}', 400, "UTF-8"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "Once upon a time " * 60_000}, 400, "maximum context length"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 100_000}, 400, "maximum context length"),
    ("/v1/completions", {"model": "gpt-4o", "prompt": "hi"}, 404, "gpt-4o"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "stop": ["ok", ""]}, 400, "stop"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "nope"),
    ("/v1/nothing", {}, 404, "Not Found"),
]


@pytest.mark.parametrize("path, body, status, words", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors(live, path, body, status, words):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) \
        else {"json": body}
    r = httpx.post(live.url + path, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and words in error["message"]


def test_openai_client_sees_errors_and_server_keeps_serving(live):
    client = live.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-1)
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert out.choices[0].text == reference(live, PROMPTS[0], temperature=0, max_tokens=4).text
    live.wait_idle()


def test_full_server_answers_429(live):
    live.server.max_in_flight = 0  # as if max_num_seqs + max_queue requests were in flight
    try:
        r = httpx.post(live.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            live.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    finally:
        live.server.max_in_flight = 64
    assert live.client().completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens >= 1


def test_stream_events_are_openai_sse(live):
    """Raw wire format: `data: ` lines, chunk objects, a usage chunk, then [DONE]."""
    with httpx.stream("POST", live.url + "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 5


def test_a_bug_is_a_500_in_openai_shape(live, monkeypatch):
    monkeypatch.setattr(live.server.metrics, "render", lambda: 1 / 0)
    r = httpx.get(live.url + "/metrics")
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    monkeypatch.undo()
    assert httpx.get(live.url + "/metrics").status_code == 200


def test_api_key(live):
    guarded = LiveServer(live.engine, api_key="sk-kiln")
    try:
        with pytest.raises(openai.AuthenticationError):
            guarded.client().models.list()
        client = openai.OpenAI(base_url=guarded.url + "/v1", api_key="sk-kiln", max_retries=0)
        assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens >= 1
        r = httpx.post(guarded.url + "/v1/completions", json={"model": MODEL, "max_tokens": -1})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(guarded.url + "/health").status_code == 200
    finally:
        guarded.close()


def test_an_engine_failure_is_a_500_or_an_error_event(live, monkeypatch):
    live.wait_idle()

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(live.engine.runner, "forward", broken)
    body = {"model": MODEL, "prompt": "Lily and Tom", "max_tokens": 3}
    r = httpx.post(live.url + "/v1/completions", json=body)
    assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
    with httpx.stream("POST", live.url + "/v1/completions", json=dict(body, stream=True)) as s:
        events = [line for line in s.iter_lines() if line]
    assert json.loads(events[-2][6:])["error"]["type"] == "server_error" and events[-1] == "data: [DONE]"
    monkeypatch.undo()
    out = live.client().completions.create(model=MODEL, prompt="Lily and Tom", max_tokens=3, temperature=0)
    assert out.choices[0].text == reference(live, "Lily and Tom", temperature=0, max_tokens=3).text
    live.wait_idle()
