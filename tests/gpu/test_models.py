"""Tiny random models of every family compiled for CUDA in bf16 (bench/gpu_parity.py's build and checks):
logits and greedy tokens against transformers on the same GPU, batched decode no worse than alone; the
bundled trained model's story token for token in fp32; an artifact carrying CUDA source compiles once."""

from __future__ import annotations

import pytest

from bench import gpu_parity

from .shapes import GPU_MODELS


@pytest.mark.parametrize("name", GPU_MODELS)
def test_tiny_model_matches_transformers(build_dir, name):
    row = gpu_parity.model_row(build_dir / "models" / f"art-{name}")
    assert row["ok"], row


def test_stories260k_tells_the_expected_story(build_dir):
    row = gpu_parity.stories_row(build_dir / "models")
    assert row["ok"], row


def test_cuda_source_artifact_compiles_once_then_loads_from_the_cache(build_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))  # a cold cache, whatever ran before
    art = build_dir / "models" / "src-qwen3"
    first, second = gpu_parity.load_seconds(art), gpu_parity.load_seconds(art)
    assert second < 5 and second < first, (first, second)
