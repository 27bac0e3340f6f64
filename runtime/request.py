"""Requests and what comes back: a Request holds n Sequences (one per completion); outputs are
Deltas while streaming and one RequestOutput at the end.

A Sequence is the scheduler's unit: `token_ids` (prompt + generated so far) of which the first
`num_computed` are in the KV cache. Its text goes through the detokenizer and the stop-string
hold-back here, so the engine loop only says which token came next.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .sampling import SamplingParams
from .tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class Message:
    """One chat turn."""

    role: str
    content: str


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # the top_logprobs most likely tokens


@dataclass
class Completion:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    """A finished request: its completions (n of them), token counts and timings (seconds)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[Completion]
    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    error: str | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.outputs)

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def elapsed(self) -> float:
        return (self.finish_time or time.perf_counter()) - self.arrival_time


@dataclass
class Delta:
    """What one engine step added to one completion; `output` is set on the request's last Delta."""

    request_id: str
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    output: RequestOutput | None = None


class Sequence:
    def __init__(self, seq_id: int, request: "Request", index: int, token_ids: list[int],
                 rng: np.random.Generator, tokenizer: Tokenizer):
        self.seq_id, self.request, self.index = seq_id, request, index
        self.token_ids = list(token_ids)
        self.num_prompt = len(request.prompt_ids)
        self.num_computed = 0  # tokens in the KV cache
        self.rng = rng
        self.detok = IncrementalDetokenizer(tokenizer, request.params.skip_special_tokens)
        for t in request.prompt_ids[-4:]:  # context, so the first output token keeps its leading space
            self.detok.add(t)
        self.text = ""  # all decoded text so far (cut at a stop string)
        self.emitted = 0  # characters of `text` already streamed
        self.stop_state = 0  # in the request's StopStrings automaton
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprob] | None = [] if request.params.logprobs else None

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @functools.cached_property
    def prompt_unique(self) -> np.ndarray:
        """The prompt's distinct token ids, sorted (for the repetition penalty)."""
        return np.unique(np.asarray(self.token_ids[:self.num_prompt], np.int64))

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def pending(self) -> int:
        """Tokens still to be put through the model before the next one can be sampled."""
        return len(self.token_ids) - self.num_computed

    def add_text(self, piece: str, final: bool = False) -> str:
        """Append decoded text; return what may be streamed now. A stop string ends the sequence at
        its start; a suffix that could begin a stop string is held back until resolved (the
        request's StopStrings automaton: O(len(piece)) however many and long the stops are)."""
        stops = self.request.params.stop_strings
        if stops is None:  # the common case: nothing to hold back
            self.text += piece
            self.emitted = len(self.text)
            return piece
        self.stop_state, start = stops.feed(self.stop_state, piece)
        self.text += piece
        if start is not None:
            self.text = self.text[:len(self.text) - len(piece) + start]
            self.finish_reason = "stop"
        hold = 0 if final or start is not None else stops.depth[self.stop_state]
        out = self.text[self.emitted:len(self.text) - hold]
        self.emitted += len(out)
        return out

    def completion(self) -> Completion:
        return Completion(self.index, self.text, self.output_ids, self.finish_reason, self.logprobs)


class Request:
    """One submitted prompt; `sink` receives its Deltas on the engine thread."""

    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams,
                 sink: Callable[[Delta], None], stop_ids: set[int]):
        self.request_id, self.prompt, self.prompt_ids, self.params = request_id, prompt, prompt_ids, params
        self.sink = sink
        self.stop_ids = stop_ids  # EOS (unless ignore_eos) and the request's stop_token_ids
        self.seqs: list[Sequence] = []
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason for s in self.seqs) and len(self.seqs) == self.params.n

    def output(self, error: str | None = None) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, [s.completion() for s in self.seqs],
                             self.arrival_time, self.first_token_time, time.perf_counter(), error)
