"""The shapes the GPU tests build (tests/gpu/build.py) and check (tests/gpu/test_*.py): the presets'
real ones and awkward ones. Plain data: the GPU machine imports it without TVM's compiler."""

# Attention (query heads, KV heads, head_dim): GQA ratios 1, 2, 4, 7 and 8, head_dim 64 and 128
ATTENTION_SHAPES = [
    (32, 8, 128),  # Llama-3.1-8B, Mistral-7B (GQA 4)
    (16, 8, 128),  # Qwen3-0.6B (GQA 2)
    (28, 4, 128),  # Qwen2-7B (GQA 7)
    (14, 2, 64),   # Qwen2-0.5B (GQA 7, head_dim 64: the mma.sync prefill serves it)
    (8, 8, 128),   # plain multi-head attention (GQA 1)
    (16, 2, 128),  # GQA 8
]

# Linear layers (K, N, epilogue) of one decoder layer and the LM head. "cast": y = (x·Wᵀ in fp32) as bf16;
# "residual": r + that (the O and down projections); "logits": fp32 out (the LM head).
LINEAR_SHAPES = [
    (1024, 4096, "cast"), (2048, 1024, "residual"), (1024, 6144, "cast"), (3072, 1024, "residual"),
    (1024, 151936, "logits"),                                                             # Qwen3-0.6B
    (4096, 6144, "cast"), (4096, 4096, "residual"), (4096, 28672, "cast"), (14336, 4096, "residual"),
    (4096, 128256, "logits"),                                                             # Llama-3.1-8B
    (896, 1152, "cast"), (4864, 896, "residual"), (896, 151936, "logits"),                # Qwen2-0.5B
    (4096, 32768, "logits"),                                                              # Mistral-7B
]
LINEAR_MAX_ROWS = 1024  # the prefill chunk of the presets: the model's bound on a Linear's rows
# rows: the GEMV bucket edges (1-8), the middle kernels' row buckets (9-128) and the small-M switch (32),
# ragged tails, a full chunk
LINEAR_ROWS = [1, 2, 3, 5, 8, 9, 16, 17, 32, 33, 64, 100, 128, 129, 257, 1000, 1024]


def attention_file(h_qo: int, h_kv: int, d: int) -> str:
    return f"attn_q{h_qo}_kv{h_kv}_d{d}.so"


def linear_name(k: int, n: int, epilogue: str) -> str:
    return f"linear_k{k}_n{n}_{epilogue}"

# tiny random models bench/gpu_parity.py builds (art-NAME): head_dim 16/32 use TVM's attention kernels,
# the -hd128 ones Kiln's (wgmma prefill, split-KV decode), qwen2-hd64 Kiln's mma.sync prefill
GPU_MODELS = ["llama3", "mistral", "qwen2", "qwen3", "llama3-hd128", "qwen3-hd128", "qwen2-hd64"]
ENGINE_MODEL = "qwen3-hd128"  # the engine tests run over Kiln's own kernels
