"""Sampling: SamplingParams (one request's knobs) and `sample`, which turns a batch of logits into tokens.

The engine samples on the device (model_defs/sampling.py through ModelRunner.apply_penalties,
.sample and .logprobs); this numpy path serves artifacts compiled without those functions and
EngineConfig(device_sampling=False), and is the reference the compiled functions are tested against.

`sample` is vectorized over the batch: every step does a fixed number of numpy passes over the
[batch, vocab] logits whatever the mix of greedy and sampled rows, so host cost grows with the
batch only through array sizes, not Python loops. Greedy (temperature 0) is an exact argmax of the
raw logits. Randomness comes from one numpy Generator per sequence (seeded by `seed`), so a seeded
request reproduces its text regardless of what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from formats.errors import KilnError

MAX_TOP_LOGPROBS = 20  # OpenAI's cap; the compiled `logprobs` function returns this many


@dataclass
class SamplingParams:
    """What to generate for one request (vLLM's names and defaults)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: the whole vocabulary
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 256  # None: up to the context limit
    n: int = 1
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    skip_special_tokens: bool = True

    def __post_init__(self):
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def check(self) -> None:
        """Raise KilnError naming the first field a request got wrong."""
        if self.temperature < 0:
            raise KilnError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise KilnError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise KilnError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise KilnError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise KilnError(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.n < 1:
            raise KilnError(f"n must be >= 1, got {self.n}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise KilnError(f"seed must be in [0, 2**63), got {self.seed}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise KilnError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if any(not s for s in self.stop):
            raise KilnError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0



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
