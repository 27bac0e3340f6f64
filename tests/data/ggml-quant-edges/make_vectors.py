"""Regenerate ggml-quant-edges.gguf: 16 kinds of rows quantized by ggml's own reference quantizers.

    python make_vectors.py LIB [OUT]
LIB: a shared library exporting ggml's `quantize_row_<type>_ref` (see README.md for the build used).
"""

import ctypes
import sys

import gguf
import numpy as np

TYPES = {"q8_0": "q8_0", "q4_0": "q4_0", "q2_k": "q2_K", "q3_k": "q3_K", "q4_k": "q4_K", "q5_k": "q5_K",
         "q6_k": "q6_K"}
ROWS, K = 3, 1024  # rows per kind; 4 super-blocks per row


def kinds(rng):
    shape = (ROWS, K)
    normal = rng.standard_normal(shape)
    sparse = rng.standard_normal(shape)
    sparse[rng.random(shape) < 0.9] = 0
    outliers = rng.standard_normal(shape)
    outliers[:, ::97] *= 1000
    flat = np.repeat(rng.standard_normal((ROWS, K // 16)), 16, axis=1)  # every 16-weight sub-block constant
    mixed = rng.standard_normal(shape)
    mixed[:, 5::16] = 0
    mixed[:, :256] = mixed[:, :1]
    lone = np.zeros(shape)
    lone[:, 3::256] = rng.standard_normal((ROWS, K // 256)) * 10
    return {
        "normal": normal, "scaled": normal * np.exp2(rng.integers(-20, 10, (ROWS, 1))),
        "fp16_grid": rng.standard_normal(shape).astype(np.float16),
        "bf16_grid": (rng.standard_normal(shape).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32),
        "ints": rng.integers(-8, 8, shape), "halves": rng.integers(-16, 16, shape) / 2,
        "uniform": rng.uniform(-1, 1, shape), "positive": rng.uniform(0, 1, shape),
        "negative": -rng.uniform(0, 1, shape), "sparse": sparse, "outliers": outliers, "flat": flat,
        "tiny": rng.standard_normal(shape) * 1e-6, "laplace": rng.laplace(size=shape), "mixed": mixed, "lone": lone,
    }


def main(lib_path: str, out: str = "ggml-quant-edges.gguf") -> None:
    lib = ctypes.CDLL(lib_path)
    src = np.concatenate([v.astype(np.float32) for v in kinds(np.random.default_rng(2026)).values()])
    writer = gguf.GGUFWriter(out, "quant-edges")
    writer.add_tensor("src", src)
    for name, c_name in TYPES.items():
        qtype = gguf.GGMLQuantizationType[name.upper()]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        blocks = np.zeros((len(src), K // block * size), np.uint8)
        getattr(lib, f"quantize_row_{c_name}_ref")(src.ctypes.data_as(ctypes.c_void_p),
                                                    blocks.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(src.size))
        writer.add_tensor(f"{name}.q", blocks, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
