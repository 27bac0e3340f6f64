"""The chat page at `/`: served, and driven in headless Chromium (skipped when /usr/bin/chromium is absent).

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe), so no browser
automation package is needed: type a prompt, press Enter, wait for the streamed answer, compare it
with the Python API's, and keep a screenshot (chat.png in the test's tmp dir).
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time

import httpx
import pytest
from test_server import serving

from runtime import Message, SamplingParams

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROMPT = "Tell me a story about a cat."


@pytest.fixture(scope="module")
def live(stories_artifact):
    with serving(stories_artifact, max_num_seqs=8) as server:
        yield server


def test_page_and_script_are_served(live):
    page = httpx.get(live.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/chat.js">' in page.text
    script = httpx.get(live.url + "/static/chat.js")
    assert script.status_code == 200 and "/v1/chat/completions" in script.text


class Chromium:
    """Headless Chromium; DevTools commands are NUL-terminated JSON on its fds 3 (in) and 4 (out)."""

    def __init__(self, profile: str, timeout: float = 60):
        self.proc = subprocess.Popen(
            ["sh", "-c", 'exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null', CHROMIUM, "--headless", "--no-sandbox",
             "--disable-gpu", "--no-first-run", "--remote-debugging-pipe", f"--user-data-dir={profile}",
             "--window-size=900,700"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.deadline = time.monotonic() + timeout
        self._id, self._buffer = 0, b""

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self.proc.stdin.write(json.dumps(message).encode() + b"\0")
        self.proc.stdin.flush()
        while True:
            reply = self._read()
            if reply.get("id") == self._id:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def _read(self) -> dict:
        fd = self.proc.stdout.fileno()
        while b"\0" not in self._buffer:
            remaining = self.deadline - time.monotonic()
            assert remaining > 0 and select.select([fd], [], [], remaining)[0], "chromium timed out"
            chunk = os.read(fd, 1 << 16)
            assert chunk, "chromium exited"
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def evaluate(self, session: str, expression: str):
        result = self.send("Runtime.evaluate", session, expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def close(self) -> None:
        try:
            self.send("Browser.close")
            self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def _until(condition: str) -> str:
    """A promise that resolves with `condition`'s value once it is truthy (polled every 50 ms)."""
    return f"new Promise(r => {{ const p = () => {{ const v = {condition}; v ? r(v) : setTimeout(p, 50); }}; p(); }})"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_chat_page_streams_an_answer_in_chromium(live, tmp_path):
    ref = live.engine.generate_sync(SamplingParams(temperature=0, max_tokens=40),
                                    [live.engine.apply_chat_template([Message("user", PROMPT)])])[0]
    browser = Chromium(str(tmp_path / "profile"))
    try:
        target = browser.send("Target.createTarget", url="about:blank")["targetId"]
        session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        browser.send("Page.navigate", session, url=f"{live.url}/?temperature=0&max_tokens=40")  # returns once committed
        model = "(t => t !== '…' && t)(document.getElementById('model')?.textContent)"  # set from /v1/models
        assert browser.evaluate(session, _until(model)) == "stories"
        browser.evaluate(session, "document.getElementById('prompt').focus()")
        browser.send("Input.insertText", session, text=PROMPT)
        for kind in ("keyDown", "keyUp"):
            browser.send("Input.dispatchKeyEvent", session, type=kind, key="Enter", code="Enter",
                         windowsVirtualKeyCode=13)
        answer = browser.evaluate(session, _until(
            "(a => a && a.dataset.done && {text: a.textContent, chunks: +a.dataset.chunks, "
            "error: a.classList.contains('error')})(document.querySelector('.msg.assistant'))"))
        (tmp_path / "chat.png").write_bytes(base64.b64decode(browser.send("Page.captureScreenshot", session)["data"]))
    finally:
        browser.close()
    assert answer["error"] is False and answer["text"] == ref.text
    assert answer["chunks"] > 1  # it arrived in pieces
    assert (tmp_path / "chat.png").stat().st_size > 1000


def _type_and_send(browser: Chromium, session: str, text: str) -> None:
    browser.evaluate(session, "document.getElementById('prompt').focus()")
    browser.send("Input.insertText", session, text=text)
    for kind in ("keyDown", "keyUp"):
        browser.send("Input.dispatchKeyEvent", session, type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_chat_page_keeps_a_stopped_turn_and_shows_speed(live, tmp_path):
    """Stop mid-answer: the partial answer stays, marked "stopped", and is sent back with the next turn;
    a finished answer shows its tokens/s; the waiting bubble shows the typing indicator until text comes."""
    browser = Chromium(str(tmp_path / "profile"))
    try:
        target = browser.send("Target.createTarget", url="about:blank")["targetId"]
        session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        browser.send("Page.navigate", session, url=f"{live.url}/?temperature=0&max_tokens=200")
        browser.evaluate(session, _until("(t => t !== '…' && t)(document.getElementById('model')?.textContent)"))
        browser.evaluate(session, "window.sent = []; const f = window.fetch; window.fetch = (u, o) => "
                                  "{ if (o && o.body) window.sent.push(JSON.parse(o.body)); return f(u, o); }; 1")
        _type_and_send(browser, session, PROMPT)
        typing = browser.evaluate(session, "document.querySelector('.msg.assistant').classList.contains('typing')"
                                            " || document.querySelector('.msg.assistant').dataset.chunks !== '0'")
        browser.evaluate(session, _until("+document.querySelector('.msg.assistant').dataset.chunks >= 2"))
        browser.evaluate(session, "document.getElementById('send').click(); 1")  # the button reads "Stop"
        stopped = browser.evaluate(session, _until(
            "(a => a.dataset.done && {text: a.textContent, stopped: a.classList.contains('stopped'), "
            "note: a.nextElementSibling.textContent})(document.querySelector('.msg.assistant'))"))
        _type_and_send(browser, session, "And then?")
        second = browser.evaluate(session, _until(
            "(a => a.length == 2 && a[1].dataset.done && {note: a[1].nextElementSibling.textContent, "
            "typing: a[1].classList.contains('typing')})(document.querySelectorAll('.msg.assistant'))"))
        sent = browser.evaluate(session, "window.sent")
    finally:
        browser.close()
    assert typing and stopped["stopped"] and stopped["note"] == "stopped" and stopped["text"]
    assert [m["role"] for m in sent[1]["messages"]] == ["user", "assistant", "user"]
    assert sent[1]["messages"][1]["content"] == stopped["text"]
    assert "tokens/s" in second["note"] and not second["typing"]
