"""A user's mistake gives a one-line error naming the file, tensor or field; nonzero exit; no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import DATA, REPO, STORIES_HF


def _run(*args):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture
def model_copy(tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(STORIES_HF, dst)
    return dst


def _compile(model, tmp_path, target="cpu"):
    return _run("-m", "compile", "--model", str(model), "--target", target, "--out", str(tmp_path / "out"))


def test_missing_config(model_copy, tmp_path):
    (model_copy / "config.json").unlink()
    assert "config.json" in _compile(model_copy, tmp_path)


def test_malformed_config(model_copy, tmp_path):
    (model_copy / "config.json").write_text("{ not json")
    assert "config.json: malformed JSON" in _compile(model_copy, tmp_path)


def test_missing_field(model_copy, tmp_path):
    cfg = json.loads((model_copy / "config.json").read_text())
    del cfg["hidden_size"]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    assert "'hidden_size'" in _compile(model_copy, tmp_path)


def test_unsupported_architecture(model_copy, tmp_path):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    assert "GPT2LMHeadModel" in _compile(model_copy, tmp_path)


def test_weight_of_wrong_shape(model_copy, tmp_path):
    weights = load_file(str(model_copy / "model.safetensors"))
    name = "model.layers.2.mlp.down_proj.weight"
    weights[name] = np.zeros((64, 100), np.float32)
    save_file(weights, str(model_copy / "model.safetensors"))
    msg = _compile(model_copy, tmp_path)
    assert name in msg and "(64, 100)" in msg


def test_unknown_target(tmp_path):
    assert "unknown target 'vulkan'" in _compile(STORIES_HF, tmp_path, target="vulkan")


def test_unknown_quant_lists_the_valid_ones(tmp_path):
    msg = _run("-m", "compile", "--model", str(STORIES_HF), "--quant", "q4", "--out", str(tmp_path / "out"))
    assert "--quant q4: unknown quantization" in msg
    assert all(name in msg for name in ("q4k", "q5k", "q6k", "q8_0", "q4_0", "q2k", "q3k"))


def test_quant_of_a_gguf(tmp_path):
    """A GGUF keeps its own types: --quant on one says so instead of requantizing."""
    gguf = DATA / "stories260K" / "gguf" / "stories260K-q8_0.gguf"
    msg = _run("-m", "compile", "--model", str(gguf), "--quant", "q4k", "--out", str(tmp_path / "out"))
    assert "stories260K-q8_0.gguf is a GGUF file" in msg and "--quant applies to safetensors models" in msg


def test_unknown_preset(tmp_path):
    assert "qwen9" in _compile("qwen9", tmp_path)


def test_runtime_refuses_artifact_without_weights(tmp_path):
    out = tmp_path / "lib-only"
    proc = subprocess.run([sys.executable, "-m", "compile", "--model", "qwen2", "--target", "metal",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model.tar").is_file()
    msg = _run("-m", "runtime.generate", "--w", str(out))
    assert "make compile MODEL=qwen2" in msg
