"""python -m compile --model PATH_OR_PRESET --target cpu|cuda|metal [--dtype ...] [--quant q4k] [--out DIR] [--tp N]

A model file (HF folder or GGUF) or a preset becomes an artifact folder that `runtime` serves.
"""

from __future__ import annotations

import sys

import fire

from formats.errors import KilnError

DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16", "metal": "float16"}


def build(model: str = "stories260k", target: str = "cpu", dtype: str | None = None, out: str | None = None,
          weights: str | None = None, cuda_arch: str | None = None, context: int = 4096,
          page_size: int = 16, prefill_chunk: int = 1024, max_batch: int = 256, quant: str | None = None,
          dequantize: bool = False, tp: int | None = None):
    """Compile MODEL (a preset name, an HF folder or a .gguf file) for TARGET into an artifact folder.

    A GGUF's quantized tensors stay packed (--dequantize: every weight in DTYPE instead); --quant
    q4k|q5k|q6k|q8_0|q4_0|q2k|q3k quantizes a safetensors model's weights while converting; --tp N
    shards the model over N devices (tensor parallelism; served with --d 0,1,...)."""
    from .driver import compile_artifact
    return compile_artifact(model=model, target=target, dtype=dtype or DEFAULT_DTYPE.get(target, "float32"),
                            out=out, weights=weights, cuda_arch=cuda_arch, context=context,
                            page_size=page_size, prefill_chunk=prefill_chunk, max_batch=max_batch, quant=quant,
                            dequantize=dequantize, tp=tp)


def main() -> None:
    try:
        fire.Fire(build, name="python -m compile", serialize=lambda path: None)
    except KilnError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
