"""Sliding-window attention is not implemented: a model with a window shorter than its context is
capped at the window (where attention is exact), and a longer context asked for is refused."""

from __future__ import annotations

import pytest
import yaml

from conftest import make_tiny_hf
from compile.driver import compile_artifact
from formats.errors import KilnError


def _compile(model, out, context):
    return compile_artifact(model=str(model), target="cpu", dtype="float32", out=str(out), weights=None,
                            cuda_arch=None, context=context, page_size=16, prefill_chunk=64)


def test_a_sliding_window_caps_the_context_or_is_refused(tmp_path):
    model = make_tiny_hf("mistral", tmp_path / "mistral", sliding_window=32)
    with pytest.raises(KilnError, match="sliding_window is 32.*at most 32 tokens"):
        _compile(model, tmp_path / "refused", context=64)
    out = _compile(model, tmp_path / "capped", context=None)
    assert yaml.safe_load((out / "kiln.yaml").read_text())["context_length"] == 32


def test_qwen2_window_applies_only_when_switched_on(tmp_path):
    """Qwen2 configs carry sliding_window even when use_sliding_window is false (then it means nothing)."""
    model = make_tiny_hf("qwen2", tmp_path / "qwen2", sliding_window=32, use_sliding_window=False)
    out = _compile(model, tmp_path / "full", context=64)
    assert yaml.safe_load((out / "kiln.yaml").read_text())["context_length"] == 64
