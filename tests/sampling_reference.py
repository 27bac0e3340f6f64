"""The numpy reference of Kiln's sampling (what the compiled functions in model_defs/sampling.py must do).

`sample` is vectorized over the batch: a fixed number of numpy passes over the [batch, vocab] logits
whatever the mix of greedy and sampled rows. Greedy (temperature 0) is an exact argmax of the
(penalized) logits. Randomness comes from one numpy Generator per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.sampling import SamplingParams


@dataclass
class Sampled:
    """One step's result for a batch: token ids, and their log-probabilities when asked for."""

    token_ids: np.ndarray  # int64[b]
    logprobs: np.ndarray | None = None  # float32[b]: log_softmax(raw logits)[token]
    top_ids: np.ndarray | None = None  # int64[b, k]: the k most likely tokens, best first
    top_logprobs: np.ndarray | None = None  # float32[b, k]


def apply_penalties(logits: np.ndarray, params: list[SamplingParams], prompts: list[list[int]],
                    outputs: list[list[int]]) -> np.ndarray:
    """Repetition (HF: prompt and output tokens), frequency and presence (OpenAI: output tokens)."""
    b, vocab = logits.shape
    rep = np.array([p.repetition_penalty for p in params], dtype=np.float32)
    freq = np.array([p.frequency_penalty for p in params], dtype=np.float32)
    pres = np.array([p.presence_penalty for p in params], dtype=np.float32)
    if (rep == 1).all() and (freq == 0).all() and (pres == 0).all():
        return logits

    def counts(histories):
        rows = np.repeat(np.arange(b), [len(h) for h in histories])
        flat = np.fromiter((t for h in histories for t in h), dtype=np.int64, count=len(rows))
        return np.bincount(rows * vocab + flat, minlength=b * vocab).reshape(b, vocab)

    logits = logits.copy()
    out_counts = counts(outputs)
    if (rep != 1).any():
        seen = (out_counts + counts(prompts)) > 0
        penalized = np.where(logits > 0, logits / rep[:, None], logits * rep[:, None])  # transformers' order
        logits = np.where(seen, penalized, logits)
    return logits - freq[:, None] * out_counts - pres[:, None] * (out_counts > 0)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def sample(logits: np.ndarray, params: list[SamplingParams], rngs: list[np.random.Generator],
           prompts: list[list[int]] | None = None, outputs: list[list[int]] | None = None) -> Sampled:
    """Pick one token per row of `logits` (float32 [b, vocab]) following each row's params."""
    b = logits.shape[0]
    raw = logits
    if prompts is not None:
        logits = apply_penalties(logits, params, prompts, outputs)
    tokens = np.argmax(logits, axis=-1)
    sampled_rows = np.array([not p.greedy for p in params], dtype=bool)
    if sampled_rows.any():
        rows = np.flatnonzero(sampled_rows)
        tokens[rows] = _sample_rows(logits[rows], [params[i] for i in rows],
                                    np.array([rngs[i].random() for i in rows]))
    out = Sampled(tokens)
    want = max((p.top_logprobs if p.logprobs else 0) for p in params)
    if any(p.logprobs for p in params):
        lp = log_softmax(raw)
        out.logprobs = lp[np.arange(b), tokens]
        if want:
            top = np.argpartition(-lp, want - 1, axis=-1)[:, :want]
            order = np.argsort(-np.take_along_axis(lp, top, axis=-1), axis=-1, kind="stable")
            out.top_ids = np.take_along_axis(top, order, axis=-1)
            out.top_logprobs = np.take_along_axis(lp, out.top_ids, axis=-1)
    return out


def _sample_rows(logits: np.ndarray, params: list[SamplingParams], uniform: np.ndarray) -> np.ndarray:
    """Temperature, then top-k, top-p and min-p masks, then inverse-CDF sampling with `uniform`."""
    vocab = logits.shape[1]
    temp = np.array([p.temperature for p in params], dtype=np.float32)[:, None]
    top_k = np.array([p.top_k if p.top_k > 0 else vocab for p in params])
    top_p = np.array([p.top_p for p in params], dtype=np.float32)
    min_p = np.array([p.min_p for p in params], dtype=np.float32)
    scaled = logits / temp
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    keep = probs >= (min_p * probs.max(axis=-1))[:, None]
    if (top_k < vocab).any() or (top_p < 1).any():
        sorted_probs = -np.sort(-probs, axis=-1)
        # top-k first; then the smallest prefix of those k whose renormalized mass reaches top_p
        rows = np.arange(len(params))
        cum = np.cumsum(sorted_probs, axis=-1)
        mass_k = cum[rows, top_k - 1]
        n_p = ((cum - sorted_probs) < (top_p * mass_k)[:, None]).sum(axis=-1)
        threshold = sorted_probs[rows, np.clip(n_p, 1, top_k) - 1]
        keep &= probs >= threshold[:, None]
    probs = np.where(keep, probs, 0)
    cdf = np.cumsum(probs, axis=-1)
    target = uniform[:, None] * cdf[:, -1:]
    last_kept = vocab - 1 - np.argmax(keep[:, ::-1], axis=-1)  # rounding must not land past it
    return np.minimum((cdf <= target).sum(axis=-1), last_kept)
