"""File formats both sides read: GGUF, safetensors checks, vocabulary conversion, and the error type (nothing heavy)."""
