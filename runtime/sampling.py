"""SamplingParams: one request's sampling knobs (vLLM's names and defaults) and their checks.

Sampling itself runs on the device: model_defs/sampling.py's compiled functions, driven by
ModelRunner.apply_penalties, .sample and .logprobs (the engine turns each step's params into their
arguments). The numpy reference they are tested against lives in tests/sampling_reference.py.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from formats.errors import KilnError

from .stop_strings import StopStrings

MAX_TOP_LOGPROBS = 20  # OpenAI's cap; the compiled `logprobs` function returns this many
MIN_TEMPERATURE = 1e-2  # vLLM's floor: a smaller positive temperature overflows float32 logits (inf, NaN)


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
        if 0 < self.temperature < MIN_TEMPERATURE:  # as vLLM does: 1e-45 samples like 0.01, not like NaN
            self.temperature = MIN_TEMPERATURE

    @functools.cached_property
    def stop_strings(self) -> StopStrings | None:
        """The stop strings' automaton, built once for the request's sequences (None: no stops)."""
        return StopStrings(self.stop) if self.stop else None

    def check(self) -> None:
        """Raise KilnError naming the first field a request got wrong."""
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise KilnError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0:
            raise KilnError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise KilnError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise KilnError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 1e-2 <= self.repetition_penalty <= 1e2:  # beyond, float32 logits overflow or all collapse
            raise KilnError(f"repetition_penalty must be in [0.01, 100], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise KilnError(f"{name} must be in [-2, 2] (OpenAI's range), got {getattr(self, name)}")
        if self.top_k < -1:
            raise KilnError(f"top_k must be -1 or 0 (off) or >= 1, got {self.top_k}")
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
