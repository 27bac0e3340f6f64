"""OpenAI API shapes: request models (strict pydantic, so a wrong type or an unknown field is a 400
naming it), how a request becomes SamplingParams, and the JSON of responses, chunks and errors.

Fields are OpenAI's, plus vLLM's sampling extras (top_k, min_p, repetition_penalty, ...) that
OpenAI clients send through `extra_body`. Fields OpenAI defines that Kiln cannot honour (tools,
logit_bias, JSON response formats, ...) are accepted only when they ask for nothing, so a client
never silently gets something other than what it asked for.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .request import Completion, Message, RequestOutput, TokenLogprob
from .sampling import SamplingParams
from .tokenizer import Tokenizer


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    """What /v1/completions and /v1/chat/completions share."""

    model: str | None = None
    n: int = Field(1, ge=1)  # the server's --max-n caps it
    temperature: float | None = Field(None, ge=0, le=2)  # OpenAI's ranges
    top_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1)  # vLLM's ranges (SamplingParams.check narrows repetition_penalty)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def _sampling(self, max_tokens: int | None, logprobs: bool, top_logprobs: int) -> SamplingParams:
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream=true", "stream_options")
        given = {k: v for k, v in dict(
            temperature=self.temperature, top_p=self.top_p, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, stop_token_ids=self.stop_token_ids).items() if v is not None}
        return SamplingParams(**given, seed=self.seed, max_tokens=max_tokens, n=self.n, stop=self.stop,
                              ignore_eos=self.ignore_eos, logprobs=logprobs, top_logprobs=top_logprobs,
                              skip_special_tokens=self.skip_special_tokens)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def sampling_params(self) -> SamplingParams:
        for field, unsupported in (("echo", self.echo), ("suffix", self.suffix),
                                   ("best_of", self.best_of not in (None, self.n))):
            if unsupported:
                raise ApiError(400, f"{field} is not supported", field)
        return self._sampling(self.max_tokens, self.logprobs is not None, self.logprobs or 0)

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise ApiError(400, "prompt must not be empty", "prompt")
        return list(p)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict] | None = None
    refusal: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])

    def message(self) -> Message:
        return Message(self.role, self.text())


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    add_generation_prompt: bool = True  # vLLM's
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: reach the template, e.g. {"enable_thinking": false}

    def sampling_params(self) -> SamplingParams:
        if self.tools:
            raise ApiError(400, "tools are not supported", "tools")
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "top_logprobs requires logprobs=true", "top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling(max_tokens, self.logprobs, self.top_logprobs or 0)


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a prompt, or messages through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


# ---- responses


def usage(outputs: list[RequestOutput]) -> dict:
    prompt = sum(o.num_prompt_tokens for o in outputs)
    completion = sum(o.num_output_tokens for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Logprobs:
    """Token logprobs in the legacy completions shape or the chat shape."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        # decoded after a plain token, a token keeps its leading space (SentencePiece drops it at the start)
        self._anchor = tokenizer.encode("a", add_special_tokens=False)[-1:]
        self._skip = len(tokenizer.decode(self._anchor))
        self.token = functools.lru_cache(maxsize=1 << 16)(self._token)

    def _token(self, token_id: int) -> str:
        """A token's text as it appears in the output."""
        return self.tokenizer.decode(self._anchor + [token_id], skip_special_tokens=False)[self._skip:]

    def completion(self, lps: list[TokenLogprob], offset: int) -> dict:
        """{"tokens", "token_logprobs", "top_logprobs", "text_offset"} starting at text offset `offset`."""
        tokens = [self.token(lp.token_id) for lp in lps]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{self.token(t): v for t, v in lp.top.items()} for lp in lps],
                "text_offset": offsets}

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self.token(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def chat(self, lps: list[TokenLogprob]) -> dict:
        return {"content": [dict(self._entry(lp.token_id, lp.logprob),
                                 top_logprobs=[self._entry(t, v) for t, v in lp.top.items()]) for lp in lps],
                "refusal": None}


def completion_choice(index: int, c: Completion, logprobs: Logprobs) -> dict:
    lp = None if c.logprobs is None else logprobs.completion(c.logprobs, 0)
    return {"index": index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason}


def chat_choice(index: int, c: Completion, logprobs: Logprobs) -> dict:
    lp = None if c.logprobs is None else logprobs.chat(c.logprobs)
    return {"index": index, "message": {"role": "assistant", "content": c.text, "refusal": None},
            "logprobs": lp, "finish_reason": c.finish_reason}
