"""The server under bounded load on 127.0.0.1, and the `python -m runtime.serve` CLI (SIGTERM, bad flags).

Load: 64 concurrent streaming clients (completions and chat, 3 requests each, a quarter of the
requests disconnect mid-stream): no 5xx, every finished stream equals the Python API's text, /health
answers throughout, and no KV page is held by a request at the end.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from test_server import MODEL, serving

from runtime import Message, SamplingParams, serve

REPO = Path(__file__).resolve().parent.parent
CLIENTS, REQUESTS_EACH = 64, 3
OPENINGS = ["Once upon a time", "Tom had a dog", "The sun was hot", "Lily went to the park"]


@pytest.fixture(scope="module")
def live(stories_artifact):
    with serving(stories_artifact) as server:
        yield server


def test_64_streaming_clients_with_disconnects(live):
    # (kind, prompt, max_tokens) → the Python API's greedy text
    jobs = [("completion", p, 16 + 8 * i) for i, p in enumerate(OPENINGS)] + \
           [("chat", p, 12 + 8 * i) for i, p in enumerate(OPENINGS)]
    expected = {job: live.engine.generate_sync(SamplingParams(temperature=0, max_tokens=job[2]), [
        job[1] if job[0] == "completion" else live.engine.apply_chat_template([Message("user", job[1])])])[0].text
        for job in jobs}
    rng = random.Random(0)
    plan = [[(rng.choice(jobs), rng.randint(1, 6) if rng.random() < 0.25 else None) for _ in range(REQUESTS_EACH)]
            for _ in range(CLIENTS)]
    results = {"done": 0, "aborted": 0}
    health_latency = []

    async def one(client: openai.AsyncOpenAI, job, cut: int | None) -> None:
        kind, prompt, max_tokens = job
        if kind == "completion":
            stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                                     temperature=0, stream=True)
        else:
            stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                          max_tokens=max_tokens, temperature=0, stream=True)
        text, finish, n = "", None, 0
        async for chunk in stream:
            n += 1
            if n == cut:
                await stream.close()
                results["aborted"] += 1
                return
            c = chunk.choices[0]
            text += (c.text if kind == "completion" else c.delta.content) or ""
            finish = c.finish_reason or finish
        assert (text, finish is not None) == (expected[job], True), job
        results["done"] += 1

    async def client_task(client, requests) -> None:
        for job, cut in requests:
            await one(client, job, cut)

    async def watch_health(stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=live.url) as http:
            while not stop.is_set():
                t = time.perf_counter()
                assert (await http.get("/health")).status_code == 200
                health_latency.append(time.perf_counter() - t)
                await asyncio.sleep(0.1)

    async def main() -> None:
        client = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=60)
        stop = asyncio.Event()
        health = asyncio.create_task(watch_health(stop))
        try:
            await asyncio.wait_for(asyncio.gather(*(client_task(client, p) for p in plan)), timeout=150)
        finally:
            stop.set()
            await health
            await client.close()

    asyncio.run(main())
    assert results["done"] + results["aborted"] == CLIENTS * REQUESTS_EACH and results["aborted"] > 10
    assert health_latency and max(health_latency) < 2.0
    m = live.wait_idle()
    assert m["kiln_kv_pages_used"] == 0 and m['kiln_request_success_total{finished_reason="abort"}'] > 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _events(lines: list[str]) -> list[dict | str]:
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines if line]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_a_folder_of_artifacts_and_ends_streams_on_shutdown(stories_artifact, tmp_path, sig):
    """Up with --w a folder of artifacts and the flags; on SIGTERM or Ctrl-C, a stream still running after
    --graceful-timeout ends with an OpenAI error event and [DONE] within a second or two, without a traceback."""
    folder = tmp_path / "artifacts"
    folder.mkdir()
    (folder / "stories").symlink_to(stories_artifact)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--w", str(folder), "--port", str(port),
                             "--max-num-seqs", "8", "--max-model-len", "256", "--kvmem", "1.5", "--d", "0",
                             "--served-model-name", "s", "--graceful-timeout", "0.5",
                             "--log-level", "warning"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
            try:
                health = httpx.get(url + "/health")
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            if health.status_code == 200:
                break
            assert (health.status_code, health.json()) == (503, {"status": "loading"})
            time.sleep(0.1)
        card = httpx.get(url + "/v1/models").json()["data"][0]
        assert (card["id"], card["max_model_len"]) == ("s", 256)
        pages = re.search(r"^kiln_kv_pages_total (\S+)$", httpx.get(url + "/metrics").text, re.M)
        assert 256 // 16 < float(pages[1]) < 100  # 1.5 MB of KV cache (1280 bytes a token), not the default 513
        lines, started = [], threading.Event()

        def read_stream():  # far longer than the grace period: 8 x 240 tokens
            with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
                    "model": "s", "prompt": "Once upon a time", "max_tokens": 240, "n": 8, "stream": True,
                    "ignore_eos": True}) as r:
                for line in r.iter_lines():
                    started.set()
                    lines.append(line)

        reader = threading.Thread(target=read_stream)
        reader.start()
        assert started.wait(30)
        proc.send_signal(sig)
        signalled = time.monotonic()
        reader.join(10)
        ended = time.monotonic() - signalled
        assert proc.wait(timeout=10) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM once drained
        events = _events(lines)
        assert events[-1] == "[DONE]" and ended < 0.5 + 2.5
        assert events[-2]["error"]["code"] == "shutting_down"
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


BAD_FLAGS = [["--port", "99999"], ["--port", "http"], ["--kvmem", "inf"], ["--kvmem", "0"], ["--kvmem", "nan"],
             ["--max-model-len", "0"], ["--max-model-len", "-5"], ["--max-queue", "-100"], ["--max-num-seqs", "0"],
             ["--graceful-timeout", "-1"], ["--max-body-mb", "0"], ["--max-stops", "-1"], ["--d", "cuda:x"],
             ["--seed", "-3"], ["--log-level", "loud"], ["--frobnicate"]]


@pytest.mark.parametrize("flags", BAD_FLAGS, ids=["=".join(f) for f in BAD_FLAGS])
def test_cli_bad_flags_are_one_line_errors(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        serve.main(["--w", str(tmp_path), *flags])  # refused before anything starts
    err = capsys.readouterr().err
    assert exit.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert flags[0] in err or flags[-1] in err


def test_cli_device_of_another_kind_is_refused(stories_artifact):
    r = subprocess.run([sys.executable, "-m", "runtime.serve", "--w", str(stories_artifact), "--d", "cuda:0",
                        "--port", str(_free_port())], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "runs on cpu, not cuda" in r.stderr and "Traceback" not in r.stderr


def test_cli_help_lists_limits_and_open_routes(capsys):
    with pytest.raises(SystemExit) as exit:
        serve.main(["--help"])
    assert exit.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for words in ("--max-body-mb", "--max-prompt-chars", "--max-stops", "--open-metrics", "/health",
                  "(default: 8.0)"):
        assert words in out, words


def test_cli_bad_artifact_exits_1_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "runtime.serve", "--w", str(tmp_path / "missing")], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.splitlines()[-1].startswith("error: ") and "Traceback" not in r.stderr
