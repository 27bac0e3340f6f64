"""The chat (through a pty) and complete CLIs end to end on stories260K."""

from __future__ import annotations

import re
import subprocess
import sys

import pexpect

from conftest import REPO, ctrl_c_reaches_child
from runtime.generate import generate_ids
from runtime.model_runner import ModelRunner
from runtime.tokenizer import Tokenizer

STATS = r"\[(\d+) tokens, [\d.]+ tokens/s, first token \d+ ms(, stopped)?\]"


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_complete_prints_each_greedy_output_and_a_summary(stories_artifact, tmp_path):
    prompts = ["Once upon a time", "Tom had a dog"]
    res = cli("runtime.complete", "--w", str(stories_artifact.parent), "--prompts", " | ".join(prompts),
              "--max", "24", "--temperature", "0")
    assert res.returncode == 0, res.stderr
    tok = Tokenizer(stories_artifact)
    runner = ModelRunner(stories_artifact)
    for prompt in prompts:
        want = tok.decode(generate_ids(runner, [tok.encode(prompt)], 24, tok.eos_token_ids)[0]).strip()
        assert want in res.stdout
    assert re.search(r"2 prompts, \d+ tokens in [\d.]+ s, [\d.]+ tokens/s", res.stdout)

    file = tmp_path / "prompts.txt"
    file.write_text("A bird sang\n\nThe sun was hot\n")
    res = cli("runtime.complete", "--w", str(stories_artifact), "--file", str(file), "--max", "8")
    assert res.returncode == 0 and "[1] The sun was hot" in res.stdout


def test_cli_mistakes_are_one_line_errors(stories_artifact):
    for args in (["--prompts", "hi", "--top-p", "1.5"], ["--prompts", "hi", "--max", "0"], ["--nonsense", "1"],
                 ["--file", "/no/such/file"]):
        res = cli("runtime.complete", "--w", str(stories_artifact), *args)
        assert res.returncode == 1 and "Traceback" not in res.stderr
        assert res.stderr.strip().startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
    res = cli("runtime.chat", "--w", "/no/such/artifact")
    assert res.returncode == 1 and res.stderr.startswith("error: ")


def test_chat_streams_keeps_history_resets_and_survives_ctrl_c(stories_artifact):
    chat = pexpect.spawn(sys.executable, ["-m", "runtime.chat", "--w", str(stories_artifact), "--temperature", "0",
                                          "--max", "40"], cwd=str(REPO), encoding="utf-8", timeout=60,
                         preexec_fn=ctrl_c_reaches_child)
    chat.expect("> ")
    chat.sendline("Once upon a time")
    chat.expect(STATS)
    assert int(chat.match.group(1)) > 0
    chat.expect("> ")
    chat.sendline("/reset")
    chat.expect("history cleared")
    chat.expect("> ")
    chat.close()

    chat = pexpect.spawn(sys.executable, ["-m", "runtime.chat", "--w", str(stories_artifact), "--max", "450",
                                          "--ignore-eos", "--temperature", "1"], cwd=str(REPO), encoding="utf-8",
                         timeout=60, preexec_fn=ctrl_c_reaches_child)
    chat.expect("> ")
    chat.sendline("Tell me a story")
    chat.expect("Tell me a story\r\n")  # the pty's echo; then the answer starts
    chat.expect(r"\w+ \w+")
    chat.sendintr()
    chat.expect(STATS)
    assert chat.match.group(2) == ", stopped" and int(chat.match.group(1)) < 450
    chat.expect("> ")
    chat.sendline("/quit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0
