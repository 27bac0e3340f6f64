"""On-device sampling on the GPU (model_defs/sampling.py through ModelRunner, RowReduction's min-p max):
distributions against transformers' processors, exact argmax and top-k/top-p kept sets (at the model's
vocabulary: argmax's width is static), min-p probabilities and log-probabilities against numpy float64 at
the presets' real vocabulary sizes."""

from __future__ import annotations

import numpy as np
import pytest

from test_sampling import COMPILED_DISTRIBUTIONS, check_distribution, check_top_p_top_k_kept

VOCABS = [151936, 128256, 32768]  # Qwen2/Qwen3, Llama-3, Mistral


@pytest.fixture(scope="module")
def runner(build_dir):
    from runtime.model_runner import ModelRunner

    return ModelRunner(build_dir / "models" / "art-qwen3", kv_tokens=1024)


def _logits(runner, b, vocab, seed=0):
    logits = (np.random.default_rng(seed).standard_normal((b, vocab)) * 3).astype(np.float32)
    return logits, runner._tvm.runtime.tensor(logits, runner.device)


@pytest.mark.parametrize("params, processors", COMPILED_DISTRIBUTIONS)
def test_sampled_frequencies_match_transformers(runner, params, processors):
    check_distribution(params, processors, runner)


def test_top_k_top_p_keep_exactly_the_reference_tokens(runner):
    check_top_p_top_k_kept(runner, runner.vocab_size)  # ModelRunner.sample runs argmax: the model's width


@pytest.mark.parametrize("b", [1, 7, 64])
def test_argmax_is_exact(runner, b):
    logits, dev = _logits(runner, b, runner.vocab_size, seed=b)  # argmax's width is static (the model's)
    np.testing.assert_array_equal(runner.vm["argmax"](dev).numpy().reshape(-1), logits.argmax(-1))


@pytest.mark.parametrize("vocab", VOCABS)
def test_temperature_and_min_p_probabilities(runner, vocab):
    """softmax(logits / t), zero below min_p x the row's max (the lone max reduction RowReduction schedules)."""
    b = 9
    logits, dev = _logits(runner, b, vocab, seed=1)
    temperature = np.linspace(0.3, 2.0, b).astype(np.float32)
    min_p = np.array([0, 0.01, 0.05, 0.1, 0.2, 0.5, 0.9, 1.0, 0.3], np.float32)
    tensor = runner._tvm.runtime.tensor
    got = runner.vm["sample_probs"](dev, tensor(temperature, runner.device), tensor(min_p, runner.device)).numpy()
    scaled = logits.astype(np.float64) / temperature[:, None]
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    kept = probs >= min_p[:, None] * probs.max(-1, keepdims=True)
    want = np.where(kept, probs, 0)
    want /= want.sum(-1, keepdims=True)
    border = np.abs(probs - min_p[:, None] * probs.max(-1, keepdims=True)) < 1e-6 * probs.max(-1, keepdims=True)
    assert ((got > 0) == kept)[~border].all()
    np.testing.assert_allclose(got / got.sum(-1, keepdims=True), want, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("vocab", VOCABS)
def test_logprobs_equal_log_softmax(runner, vocab):
    b = 5
    logits, dev = _logits(runner, b, vocab, seed=2)
    rows = np.arange(b)
    tokens = np.array([0, 7, vocab - 1, 12345 % vocab, 99], np.int64)
    lp, top_lp, top_ids = runner.logprobs(dev, rows, tokens)
    ref = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    ref -= np.log(np.exp(ref).sum(-1, keepdims=True))
    np.testing.assert_allclose(lp, ref[rows, tokens], atol=1e-4)
    np.testing.assert_array_equal(top_ids, np.argsort(-ref, axis=-1)[:, :top_ids.shape[1]])
    np.testing.assert_allclose(top_lp, np.take_along_axis(ref, top_ids, -1), atol=1e-4)
