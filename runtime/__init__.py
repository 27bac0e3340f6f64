"""Kiln runtime: load an artifact and serve it (Engine is the user-facing entry point).

The names below load on first use, so importing one runtime module (the tokenizer, say) does not
pull in the engine and TVM.
"""

import importlib

_EXPORTS = {"Engine": "engine", "EngineConfig": "engine", "KilnError": "formats.errors", "Completion": "request",
            "Delta": "request", "Message": "request", "RequestOutput": "request", "TokenLogprob": "request",
            "SamplingParams": "sampling"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    module = _EXPORTS[name]
    return getattr(importlib.import_module(module if "." in module else f"runtime.{module}"), name)
