"""Kiln runtime: load an artifact and serve it (Engine is the user-facing entry point)."""

from .engine import Engine, EngineConfig
from .errors import KilnError
from .request import Message, RequestOutput
from .sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "KilnError", "Message", "RequestOutput", "SamplingParams"]
