"""The seed's own commands, as its README writes them (program names adapted), on the bundled
stories260K HF folder and its GGUF: `--w` names a model file, compiled on first use and cached."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pexpect
import pytest

from conftest import DATA, REPO, STORIES_HF, ctrl_c_reaches_child, wait_until_healthy
from runtime.generate import generate_ids
from runtime.model_file import resolve_model
from runtime.model_runner import ModelRunner
from runtime.tokenizer import Tokenizer

MODEL_FILES = {"hf": STORIES_HF, "gguf": DATA / "stories260K" / "gguf" / "stories260K-f32.gguf"}
SUMMARY = r"2 prompts, (\d+) tokens in [\d.]+ s, [\d.]+ tokens/s"
STATS = r"\[(\d+) tokens, [\d.]+ tokens/s, first token \d+ ms(, stopped)?\]"


def cli(cache, module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "KILN_CACHE": str(cache)})


def cached(cache) -> dict[str, float]:
    """Each cached artifact's name and when its library was written."""
    return {p.name: (p / "model.so").stat().st_mtime_ns for p in cache.iterdir() if (p / "kiln.yaml").is_file()}


@pytest.mark.parametrize("form", MODEL_FILES)
def test_complete_compiles_a_model_file_once_and_reuses_it(form, model_cache):
    """The seed's complete command twice: the second start compiles nothing; greedy answers are the
    reference loop's on the same artifact."""
    prompts = ["How are you?", "How to make money?"]
    args = ("--w", str(MODEL_FILES[form]), "--prompts", "How are you? | How to make money?", "--max", "64",
            "--dtype", "f32")
    first = cli(model_cache, "runtime.complete", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert re.search(SUMMARY, first.stdout) and "[1] How to make money?" in first.stdout
    before = cached(model_cache)

    again = cli(model_cache, "runtime.complete", *args, "--temperature", "0")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "compiling" not in again.stderr and "using the compiled" in again.stderr
    assert cached(model_cache) == before
    assert int(re.search(SUMMARY, again.stdout).group(1)) <= 2 * 64

    os.environ["KILN_CACHE"] = str(model_cache)
    try:
        artifact = resolve_model(MODEL_FILES[form], "f32")
    finally:
        del os.environ["KILN_CACHE"]
    assert artifact.parent == model_cache
    tok, runner = Tokenizer(artifact), ModelRunner(artifact)
    for prompt in prompts:
        want = tok.decode(generate_ids(runner, [tok.encode(prompt)], 64, tok.eos_token_ids)[0]).strip()
        assert want in again.stdout


@pytest.mark.parametrize("form", MODEL_FILES)
def test_interactive_chat_on_a_model_file(form, model_cache):
    """`chat --i --w FILE` through a pty: an answer with its stats line, /help, /think, a backslash
    continuation sent as one turn, Ctrl-C at the prompt, Ctrl-D to leave."""
    chat = pexpect.spawn(sys.executable, ["-m", "runtime.chat", "--i", "--w", str(MODEL_FILES[form]), "--max", "32"],
                         cwd=str(REPO), encoding="utf-8", timeout=300,
                         env={**os.environ, "KILN_CACHE": str(model_cache)}, preexec_fn=ctrl_c_reaches_child)
    chat.expect("> ")
    chat.sendline("/help")
    chat.expect("/reset")
    chat.expect("> ")
    chat.sendline("/think")
    chat.expect(r"\(thinking off\)")
    chat.expect("> ")
    chat.sendline("Once upon a time\\")
    chat.expect(r"\.\.\. ")
    chat.sendline("there was a dog")
    chat.expect(STATS)
    assert 0 < int(chat.match.group(1)) <= 32
    chat.expect("> ")
    assert "> " not in chat.before  # one turn, one answer
    chat.sendintr()
    chat.expect("> ")
    chat.sendeof()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0 and "Traceback" not in chat.before


SEED_EXAMPLE = """
from runtime import Engine, EngineConfig, SamplingParams, Message
cfg = EngineConfig(model_path=MODEL_PATH)
engine = Engine(cfg, "f32")
params = SamplingParams(temperature=0.6, max_tokens=256)
prompt = engine.apply_chat_template([Message("user", "How are you?")], True)

# Synchronous generation for batched input
outputs = engine.generate_sync(params, [prompt, prompt])
print(outputs)

# Streaming generation for single request
stream = engine.generate_stream(params, prompt)
for token in stream:
    print(token)
"""


def test_the_seed_python_example_verbatim(model_cache):
    """The seed README's Python example, with `Engine(cfg, "f32")` and a GGUF path."""
    script = f"MODEL_PATH = {str(MODEL_FILES['gguf'])!r}\n" + SEED_EXAMPLE + """
assert len(outputs) == 2 and all(o.error is None and o.num_output_tokens > 0 for o in outputs)
assert engine.runner.artifact.manifest["dtype"] == "float32"
assert stream.output.num_output_tokens > 0
engine.close()
"""
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "KILN_CACHE": str(model_cache)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "RequestOutput(" in res.stdout


@pytest.mark.parametrize("module", ["runtime.chat", "runtime.complete", "runtime.generate", "runtime.tokenize",
                                    "runtime.serve", "compile"])
def test_help_exits_0_and_shows_defaults(module, tmp_path):
    res = cli(tmp_path, module, "--help")
    assert res.returncode == 0, res.stderr
    assert "default" in (res.stdout + res.stderr).lower() and "Traceback" not in res.stderr  # fire: stderr


@pytest.mark.parametrize("args, says", [
    (["--max", "abc"], "--max"), (["--kvmem", "-5"], "--kvmem"), (["--dtype", "f8"], "dtype 'f8'"),
    (["--d", "x"], "device number"), (["--top-p", "0"], "--top-p"), (["--temperature", "nan"], "not a number"), (["--w", "/no/such/model.gguf"], "no such file"),
    (["--nonsense", "1"], "unrecognized"),
])
def test_bad_values_are_one_line_errors(args, says, tmp_path):
    res = cli(tmp_path, "runtime.complete", "--prompts", "hi", *args)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1 and says in res.stderr


def test_prompts_stay_verbatim_and_max_is_capped_by_the_context(stories_artifact, tmp_path):
    res = cli(tmp_path, "runtime.complete", "--w", str(stories_artifact), "--prompts", "1, 2, 3 | 1e5", "--max",
              "4096", "--temperature", "0")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[0] 1, 2, 3\n" in res.stdout and "[1] 1e5\n" in res.stdout
    assert "--max 4096 capped at 512 tokens (the model's context, 512)" in res.stderr


def test_a_folder_with_only_tokenizer_model_compiles_and_runs(tmp_path, monkeypatch):
    """A Llama-2-style folder (tokenizer.model, no tokenizer.json): the compile converts it, and the
    engine on `--w FOLDER` tokenizes as the reference vectors say and generates."""
    from conftest import make_tiny_hf
    from runtime import Engine, EngineConfig, SamplingParams
    from test_tokenizer import jsonl_rows

    folder = make_tiny_hf("llama3", tmp_path / "llama2-like", vocab_size=32000)
    shutil.copyfile(DATA / "tokenizers" / "llama2" / "tokenizer.model", folder / "tokenizer.model")
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    engine = Engine(EngineConfig(model_path=str(folder), max_num_seqs=2), "f32")
    try:
        assert (engine.runner.artifact.path / "tokenizer.json").is_file()
        for text, ids in jsonl_rows(DATA / "tokenizers" / "llama2" / "vectors.jsonl"):
            assert engine.tokenizer.encode(text, add_special_tokens=False) == ids, text
        out = engine.generate_sync(SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), ["Hello"])[0]
        assert out.error is None and out.num_output_tokens == 8
    finally:
        engine.close()


def test_serve_a_gguf_for_the_openai_client(model_cache):
    """`python -m runtime.serve --w FILE.gguf` (compiled on first use, or from the shared cache) answers
    the `openai` client."""
    import openai
    from test_server_load import _free_port

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--w", str(MODEL_FILES["gguf"]), "--port",
                             str(port), "--log-level", "warning"], cwd=REPO, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "KILN_CACHE": str(model_cache)})
    try:
        wait_until_healthy(proc, url, 300)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(model=model, max_tokens=16,
                                               messages=[{"role": "user", "content": "How are you?"}])
        assert reply.usage.completion_tokens > 0 and reply.choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_ctrl_c_during_complete_ends_cleanly(stories_artifact):
    """SIGINT mid-generation: the engine thread stops between steps, exit status 130, no traceback (and no
    C++ abort from a thread still inside TVM at exit)."""
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "runtime.complete", "--w", str(stories_artifact), "--prompts",
                             " | ".join("abcdefghijklmnop"), "--ignore-eos", "--temperature", "1", "--max-num-seqs", "2"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ctrl_c_reaches_child)
    while "loaded in" not in (line := proc.stderr.readline()):
        assert line, "complete ended before loading"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err and "terminate called" not in err, err
