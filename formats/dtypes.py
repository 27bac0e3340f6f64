"""The dtypes a model computes in (activations and KV cache), under every spelling users type."""

from __future__ import annotations

from .errors import KilnError

DTYPES = ("float32", "float16", "bfloat16")
_SPELLINGS = {"bf16": "bfloat16", "f16": "float16", "fp16": "float16", "f32": "float32", "fp32": "float32",
              **{d: d for d in DTYPES}}
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16", "metal": "float16"}  # what each target computes well


def canonical_dtype(dtype: str | None) -> str | None:
    """'bf16' / 'bfloat16' → 'bfloat16' (and f16, f32); None stays None; anything else is a KilnError."""
    if dtype is None:
        return None
    found = _SPELLINGS.get(str(dtype).lower())
    if found is None:
        raise KilnError(f"dtype '{dtype}' is not one of bf16, f16, f32 (or bfloat16, float16, float32)")
    return found
