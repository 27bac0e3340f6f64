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
from conftest import wait_until_healthy
from test_server import MODEL, serving

from runtime import Message, SamplingParams

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


def test_cli_serves_a_folder_of_artifacts_and_drains_on_sigterm(stories_artifact, tmp_path):
    folder = tmp_path / "artifacts"
    folder.mkdir()
    (folder / "stories").symlink_to(stories_artifact)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--w", str(folder), "--port", str(port),
                             "--max-num-seqs", "8", "--max-model-len", "256", "--kvmem", "1.5", "--d", "0",
                             "--served-model-name", "s",
                             "--log-level", "warning"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_healthy(proc, url, 60)
        card = httpx.get(url + "/v1/models").json()["data"][0]
        assert (card["id"], card["max_model_len"]) == ("s", 256)
        pages = re.search(r"^kiln_kv_pages_total (\S+)$", httpx.get(url + "/metrics").text, re.M)
        assert 256 // 16 < float(pages[1]) < 100  # 1.5 MB of KV cache (1280 bytes a token), not the default 513
        lines, started = [], threading.Event()

        def read_stream():
            with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
                    "model": "s", "prompt": "Once upon a time", "max_tokens": 240, "n": 4, "stream": True,
                    "ignore_eos": True}) as r:
                for line in r.iter_lines():
                    started.set()
                    lines.append(line)

        reader = threading.Thread(target=read_stream)
        reader.start()
        assert started.wait(30)
        proc.send_signal(signal.SIGTERM)  # mid-stream: the response still completes
        at_signal = len(lines)
        reader.join(60)
        assert at_signal < len(lines)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
        events = [line[6:] for line in lines if line]
        assert events[-1] == "[DONE]"
        finishes = [c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]]
        assert finishes == ["length"] * 4
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_bad_artifact_exits_1_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "runtime.serve", "--w", str(tmp_path / "missing")], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
