"""Shared fixtures: tiny random-weight HF models (transformers, CPU) and compiled Kiln artifacts."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"  # copies of ../shared/data (licenses in tests/data/README.md)
STORIES_HF = REPO / "model_defs" / "stories260K"
STORIES_EXPECTED = json.loads((REPO / "tests" / "data" / "stories260K_expected.json").read_text())

# Tiny configs of each family: GQA, several layers, head_dim 16 (32 for qwen3), vocab 256.
_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, rms_norm_eps=1e-5,
               bos_token_id=1, eos_token_id=2)
TINY_CONFIGS = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        _COMMON, rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64))),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_COMMON, rope_theta=1e6, tie_word_embeddings=False,
                                                            head_dim=16, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_COMMON, rope_theta=1e6, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_COMMON, head_dim=32, rope_theta=1e6,
                                                      tie_word_embeddings=True, attention_bias=False)),
}

# head_dim 128 with GQA 4: the shapes Kiln's own CUDA attention kernels serve (smaller heads use TVM's)
HEAD_DIM_128 = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=1, head_dim=128)
# head_dim 64 (hidden / heads) with GQA 4: Kiln's mma.sync prefill and split-KV decode
HEAD_DIM_64 = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=1)


def make_tiny_hf(family: str, out: Path, seed: int = 0, **overrides) -> Path:
    """Save a random-weight transformers model of `family` to `out`; weights scaled so logits are spread."""
    import torch
    import transformers

    config_cls, model_cls, kwargs = TINY_CONFIGS[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if "embed" in name else 1.0) / p.shape[-1] ** 0.5)
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


def hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    """transformers' float64 logits of every position of `ids` (the reference)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float64).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def hf_greedy(model_dir: Path, ids: list[int], n: int, dtype: str = "float64") -> list[int]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def top_k_top_p_kept(probs: np.ndarray, k: int, p: float) -> set[int]:
    """The tokens a top-k (k <= 0: the whole row) then top-p sampler may draw from `probs`: the smallest
    prefix of the k most likely whose share of their mass reaches p (transformers' and vLLM's order)."""
    top = np.argsort(-probs)[:k if k > 0 else None]
    mass = np.cumsum(probs[top]) / probs[top].sum()
    return set(top[:int(np.searchsorted(mass, p - 1e-6)) + 1].tolist())


def compile_cpu(model: str | Path, out: Path, dtype: str = "float32", tp: int | None = None) -> Path:
    from compile.driver import compile_artifact

    return compile_artifact(model=str(model), target="cpu", dtype=dtype, out=str(out), weights=None,
                            cuda_arch=None, context=512, page_size=16, prefill_chunk=64, tp=tp)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder `name`, filled by `build(folder)` once per run: under pytest-xdist the first worker to
    ask builds it while holding a file lock and the others wait for it, so a model is compiled once, not
    once per worker. Its users must not change it (copy it first). The folder is alone in its parent,
    which a test may pass as a folder of artifacts (tests/test_cli.py)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: <run>/gw0, <run>/gw1
    out, done = shared / f"{name}-built" / name, shared / f"{name}.built"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.is_file():
            out.mkdir(parents=True, exist_ok=True)
            build(out)
            done.touch()
    return out


def tiny_artifact(family: str, tmp_path_factory, tp: int | None = None) -> tuple[Path, Path]:
    """(HF folder, CPU fp32 artifact) of make_tiny_hf(family), compiled once per run (with --tp `tp`)."""
    hf = built_once(tmp_path_factory, f"hf-{family}", lambda out: make_tiny_hf(family, out))
    art = built_once(tmp_path_factory, f"art-{family}" + (f"-tp{tp}" if tp else ""),
                     lambda out: compile_cpu(hf, out, tp=tp))
    return hf, art


@pytest.fixture(scope="session")
def stories_artifact(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "stories", lambda out: compile_cpu(STORIES_HF, out))


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """The first-use compile cache (runtime/model_file.py) the seed-command tests share: each model file
    is compiled once per session, by whichever test starts it first."""
    return tmp_path_factory.mktemp("kiln-cache")


def wait_until_healthy(proc, url: str, seconds: float) -> None:
    """Poll a server process's /health until it answers 200 (failing if the process ends or time runs out)."""
    import time

    import httpx

    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def ctrl_c_reaches_child() -> None:
    """The preexec_fn (pexpect.spawn, subprocess.Popen) of a CLI the test interrupts: Ctrl-C must reach it
    even where this test run was started as a background job (`cmd &` ignores SIGINT, children inherit
    that, and Python then installs no KeyboardInterrupt handler)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
