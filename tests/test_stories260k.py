"""The bundled trained model against its float64 reference: prompt logits and the full 345-token story."""

from __future__ import annotations

import numpy as np

from conftest import STORIES_EXPECTED
from runtime.generate import generate_ids
from runtime.model_runner import ModelRunner
from runtime.tokenizer import Tokenizer


def test_prompt_tokens_and_logits(stories_artifact):
    ref, text = STORIES_EXPECTED["logits_once_upon_a_time"], STORIES_EXPECTED["greedy_once_upon_a_time"]
    assert Tokenizer(stories_artifact).encode(text["prompt"]) == ref["prompt_ids"]
    runner = ModelRunner(stories_artifact)
    runner.add_sequence(0)
    got = np.stack([runner.forward([0], [[t]])[0] for t in ref["prompt_ids"]])
    want = np.array(ref["logits"])
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    assert got.argmax(-1).tolist() == ref["argmax"]


def test_greedy_continuation_of_prompt(stories_artifact):
    ref = STORIES_EXPECTED["greedy_once_upon_a_time"]
    out = generate_ids(ModelRunner(stories_artifact), [ref["prompt_ids"]], ref["max_new_tokens"])[0]
    assert out == ref["generated_ids"]


def test_greedy_story_from_bos(stories_artifact):
    ref = STORIES_EXPECTED["greedy_from_bos"]
    runner = ModelRunner(stories_artifact)
    story = generate_ids(runner, [ref["prompt_ids"]], 400, stop_ids={1, 2})[0]
    assert len(ref["generated_ids"]) == 345
    assert story == ref["generated_ids"]
