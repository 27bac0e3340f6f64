"""Kiln vs transformers on tiny random models of every family (CPU, fp32): logits, greedy tokens, batching."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY_CONFIGS, hf_greedy, hf_logits, tiny_artifact
from runtime.generate import generate_ids
from runtime.model_runner import ModelRunner

PROMPTS = [[1, 17, 99, 3, 250, 42, 7], [1, 5], [1, 200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 11],
           [1, 64, 128]]


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request, tmp_path_factory):
    hf_dir, artifact = tiny_artifact(request.param, tmp_path_factory)
    return hf_dir, ModelRunner(artifact, kv_tokens=2048)


def test_prompt_logits_match_transformers(tiny):
    hf_dir, runner = tiny
    ids = PROMPTS[2]
    ref = hf_logits(hf_dir, ids)
    # Feed the prompt in three pieces so every position's logits are checked through the KV cache.
    runner.add_sequence(0)
    got = [runner.forward([0], [ids[:5]])[0]]
    got += [runner.forward([0], [[t]])[0] for t in ids[5:9]]
    got.append(runner.forward([0], [ids[9:]])[0])
    runner.remove_sequence(0)
    positions = [4, 5, 6, 7, 8, len(ids) - 1]
    for logits, pos in zip(got, positions):
        rel = np.linalg.norm(logits - ref[pos]) / np.linalg.norm(ref[pos])
        assert rel < 1e-4, f"position {pos}: relative error {rel:.2e}"


def test_greedy_tokens_match_transformers(tiny):
    hf_dir, runner = tiny
    ours = generate_ids(runner, [PROMPTS[0]], 32)[0]
    assert ours == hf_greedy(hf_dir, PROMPTS[0], 32)


def test_batch_equals_each_prompt_alone(tiny):
    _, runner = tiny
    alone = [generate_ids(runner, [p], 24)[0] for p in PROMPTS]
    assert generate_ids(runner, PROMPTS, 24) == alone
    assert runner.free_pages() == runner.total_pages
