"""Sampling against transformers' logits processors (the reference distributions) and numpy: the numpy
reference (tests/sampling_reference.py) and the compiled functions (ModelRunner.sample on the CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from conftest import top_k_top_p_kept
from formats.errors import KilnError
from runtime.model_runner import ModelRunner
from runtime.sampling import SamplingParams
from sampling_reference import apply_penalties, sample

LOGITS = np.array([2.0, 1.5, 1.2, 0.9, 0.5, 0.1, -0.4, -1.0, -2.0, -3.0], dtype=np.float32)
DRAWS = 40_000


def reference_probs(processors) -> np.ndarray:
    scores = torch.tensor(LOGITS, dtype=torch.float64)[None]
    for p in processors:
        scores = p(None, scores)
    return torch.softmax(scores, -1)[0].numpy()


def frequencies(params: SamplingParams, runner=None) -> np.ndarray:
    """Token frequencies of DRAWS samples from LOGITS: numpy on the host, or the artifact's compiled
    sampling functions when a ModelRunner is given."""
    logits = np.repeat(LOGITS[None], DRAWS, axis=0)
    rng = np.random.default_rng(0)
    if runner is not None:  # the compiled argmax takes rows of the model's width: pad with impossible tokens
        logits = np.pad(logits, ((0, 0), (0, runner.vocab_size - len(LOGITS))), constant_values=-1e30)
    if runner is None:
        tokens = sample(logits, [params] * DRAWS, [rng] * DRAWS).token_ids
    else:
        def col(value, dtype=np.float32):
            return np.full(DRAWS, value, dtype)

        tokens = runner.sample(runner._tvm.runtime.tensor(logits, runner.device), np.arange(DRAWS),
                               col(0 if params.greedy else params.temperature), col(params.top_p),
                               col(params.top_k, np.int64), col(params.min_p), rng.random(DRAWS))
    return np.bincount(tokens, minlength=len(LOGITS)) / DRAWS


@pytest.fixture(scope="module")
def runner(stories_artifact):
    return ModelRunner(stories_artifact)


@pytest.mark.parametrize("params, processors", [
    (SamplingParams(temperature=1.0), []),
    (SamplingParams(temperature=0.7), [transformers.TemperatureLogitsWarper(0.7)]),
    (SamplingParams(temperature=1.3, top_k=3), [transformers.TemperatureLogitsWarper(1.3),
                                                transformers.TopKLogitsWarper(3)]),
    (SamplingParams(top_p=0.8), [transformers.TopPLogitsWarper(0.8)]),
    (SamplingParams(top_k=5, top_p=0.7), [transformers.TopKLogitsWarper(5), transformers.TopPLogitsWarper(0.7)]),
    (SamplingParams(min_p=0.2), [transformers.MinPLogitsWarper(0.2)]),
])
def test_sampled_frequencies_match_the_target_distribution(params, processors):
    check_distribution(params, processors)


def check_distribution(params: SamplingParams, processors, runner=None) -> None:
    """DRAWS samples (numpy, or `runner`'s compiled functions) follow transformers' distribution."""
    want = reference_probs(processors)
    got = frequencies(params, runner)
    assert (got[want == 0] == 0).all()
    assert np.abs(got - want).max() < 0.015, (got, want)


COMPILED_DISTRIBUTIONS = [  # (params, transformers' processors of the same distribution); also tests/gpu
    (SamplingParams(temperature=0.7), [transformers.TemperatureLogitsWarper(0.7)]),
    (SamplingParams(temperature=1.3, top_k=3), [transformers.TemperatureLogitsWarper(1.3),
                                                transformers.TopKLogitsWarper(3)]),
    (SamplingParams(top_p=0.8), [transformers.TopPLogitsWarper(0.8)]),
    (SamplingParams(min_p=0.2), [transformers.MinPLogitsWarper(0.2)]),
    (SamplingParams(top_k=5, top_p=0.7), [transformers.TopKLogitsWarper(5), transformers.TopPLogitsWarper(0.7)]),
    (SamplingParams(temperature=0), [transformers.TopKLogitsWarper(1)]),
]


@pytest.mark.parametrize("params, processors", COMPILED_DISTRIBUTIONS)
def test_compiled_sampling_matches_the_target_distribution(runner, params, processors):
    check_distribution(params, processors, runner)


def test_compiled_top_p_top_k_keep_exactly_the_reference_tokens(runner):
    check_top_p_top_k_kept(runner, runner.vocab_size)  # the compiled argmax's static width


def check_top_p_top_k_kept(runner, vocab: int) -> None:
    """Over a `vocab`-token vocabulary with a long tail: every token the compiled top-p/top-k draws is in
    the reference kept set, and every kept token of visible probability is drawn."""
    rng = np.random.default_rng(4)
    draws = 400
    settings = [(k, p) for k in (0, 1, 7, 60) for p in (1.0, 0.9, 0.5)]
    settings.remove((0, 1.0))
    logits = (rng.standard_normal((len(settings), vocab)) * 3).astype(np.float32)
    rows = np.repeat(np.arange(len(settings)), draws)
    uniform = np.tile((np.arange(draws) + 0.5) / draws, len(settings))

    def col(i):
        return np.array([settings[r][i] for r in rows])

    tokens = runner.sample(runner._tvm.runtime.tensor(logits, runner.device), rows, np.ones(len(rows)),
                           col(1).astype(np.float32), col(0), np.zeros(len(rows), np.float32), uniform)
    for r, (k, p) in enumerate(settings):
        probs = np.exp(logits[r] - logits[r].max())
        probs /= probs.sum()
        kept = top_k_top_p_kept(probs, k, p)
        drawn = set(tokens[rows == r].tolist())
        assert drawn <= kept, (k, p, sorted(drawn - kept))
        visible = {t for t in kept if probs[t] / probs[list(kept)].sum() > 2 / draws}
        assert visible <= drawn, (k, p, sorted(visible - drawn))


def test_greedy_and_top_k_1_are_exact_argmax():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(16, 50)).astype(np.float32)
    want = logits.argmax(-1)
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=2.0, top_k=1)):
        assert (sample(logits, [params] * 16, [rng] * 16).token_ids == want).all()


def test_mixed_batch_rows_follow_their_own_params():
    logits = np.repeat(LOGITS[None], 4, axis=0)
    params = [SamplingParams(temperature=0), SamplingParams(top_k=1, seed=3),
              SamplingParams(temperature=5.0), SamplingParams(temperature=0)]
    rngs = [np.random.default_rng(i) for i in range(4)]
    out = sample(logits, params, rngs).token_ids
    assert out[0] == out[1] == out[3] == 0


def test_logprobs_equal_log_softmax_of_the_logits():
    rng = np.random.default_rng(2)
    logits = rng.normal(scale=3, size=(8, 40)).astype(np.float32)
    params = [SamplingParams(temperature=0.9, logprobs=True, top_logprobs=5)] * 8
    out = sample(logits, params, [rng] * 8)
    ref = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1).numpy()
    np.testing.assert_allclose(out.logprobs, ref[np.arange(8), out.token_ids], atol=1e-5)
    np.testing.assert_array_equal(out.top_ids, np.argsort(-ref, axis=-1)[:, :5])
    np.testing.assert_allclose(out.top_logprobs, np.sort(ref, axis=-1)[:, ::-1][:, :5], atol=1e-5)


def test_penalties_match_transformers_and_openai_definitions():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 12)).astype(np.float32)
    prompts, outputs = [[1, 2], [3]], [[4, 4, 5], []]
    rep = SamplingParams(repetition_penalty=1.3)
    got = apply_penalties(logits, [rep, rep], prompts, outputs)
    proc = transformers.RepetitionPenaltyLogitsProcessor(1.3)
    for row in range(2):
        ids = torch.tensor([prompts[row] + outputs[row]])
        want = proc(ids, torch.tensor(logits[row:row + 1])).numpy()[0]
        np.testing.assert_allclose(got[row], want, rtol=1e-6)
    fp = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    got = apply_penalties(logits, [fp, fp], prompts, outputs)
    want = logits.copy()
    want[0, 4] -= 2 * 0.5 + 0.25
    want[0, 5] -= 0.5 + 0.25
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_same_seed_same_draws_different_seed_differs():
    logits = np.repeat(LOGITS[None], 1, axis=0)
    params = [SamplingParams(temperature=1.5)]

    def draws(seed):
        rng = np.random.default_rng(seed)
        return [int(sample(logits, params, [rng]).token_ids[0]) for _ in range(50)]

    assert draws(11) == draws(11)
    assert draws(11) != draws(12)


@pytest.mark.parametrize("field, value", [("top_p", 0.0), ("top_p", 1.5), ("max_tokens", 0), ("max_tokens", -3),
                                          ("temperature", -1.0), ("n", 0), ("min_p", 2.0)])
def test_bad_params_name_the_field(field, value):
    with pytest.raises(KilnError, match=field):
        SamplingParams(**{field: value}).check()
