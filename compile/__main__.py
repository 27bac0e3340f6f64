"""python -m compile --model PATH_OR_PRESET --target cpu|cuda|metal [--dtype bf16|f16|f32] [--quant q4k|q4_k_m] [--out DIR] [--tp N] [--no-pdl] [--fuse_norms]

A model file (HF folder or GGUF) or a preset becomes an artifact folder that `runtime` serves. The
runtime runs this same command when `--w` names a model file (runtime/model_file.py).
"""

from __future__ import annotations

import fire

from formats.dtypes import DEFAULT_DTYPE, canonical_dtype
from formats.errors import exit_on_error
from formats.torch_hidden import torch_hidden

from .tvm_warnings import harmless_warnings_dropped


def build(model: str = "stories260k", target: str = "cpu", dtype: str | None = None, out: str | None = None,
          weights: str | None = None, cuda_arch: str | None = None, context: int | None = None,
          page_size: int = 16, prefill_chunk: int = 1024, max_batch: int = 256, quant: str | None = None,
          dequantize: bool = False, tp: int | None = None, no_pdl: bool = False, fuse_norms: bool = False):
    """Compile MODEL (a preset name, an HF folder or a .gguf file) for TARGET into an artifact folder.

    A GGUF's quantized tensors stay packed (--dequantize: every weight in DTYPE instead); --quant
    q4k|q5k|q6k|q8_0|q4_0|q2k|q3k quantizes a safetensors model's weights while converting (q4_k_m|q5_k_m|q3_k_m:
    llama.cpp's mixes of those types); --tp N shards
    the model over N devices (tensor parallelism; served with --d 0,1,...). CONTEXT (tokens per sequence)
    defaults to the model's max_position_embeddings. CUDA kernels for sm_90+ use programmatic dependent
    launch (each one's launch overlaps the previous one's tail); --no-pdl builds them without it. --fuse_norms
    (CUDA, experimental; a quantized model's on the CPU too) folds each RMSNorm of `decode` into the GEMV
    after it (schedules/norm_gemv.py)."""
    with torch_hidden():
        from .driver import compile_artifact
    with harmless_warnings_dropped():
        return compile_artifact(model=model, target=target,
                                dtype=canonical_dtype(dtype) or DEFAULT_DTYPE.get(target, "float32"),
                                out=out, weights=weights, cuda_arch=cuda_arch, context=context,
                                page_size=page_size, prefill_chunk=prefill_chunk, max_batch=max_batch, quant=quant,
                                dequantize=dequantize, tp=tp, pdl=not no_pdl, fuse_norms=fuse_norms)


def main() -> None:
    exit_on_error(lambda: fire.Fire(build, name="python -m compile", serialize=lambda path: None))


if __name__ == "__main__":
    main()
