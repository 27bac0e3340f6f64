"""Kiln runtime: load an artifact and serve it (Engine is the user-facing entry point)."""

from .engine import Engine, EngineConfig
from formats.errors import KilnError
from .request import Completion, Delta, Message, RequestOutput, TokenLogprob
from .sampling import SamplingParams

__all__ = ["Completion", "Delta", "Engine", "EngineConfig", "KilnError", "Message", "RequestOutput",
           "SamplingParams", "TokenLogprob"]
