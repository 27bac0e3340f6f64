"""`--quant q4_k_m|q5_k_m|q3_k_m`: llama.cpp's per-tensor types, and a mixed model that runs like its GGUF.

The expected types are written from llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp) for a dense
Llama without an importance matrix: `use_more_bits(i, n)` = i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2,
which for 32 layers picks layers 0-3, 6, 9, ..., 27 and 28-31.
"""

import pytest
import yaml

import gguf
from compile.quant_plan import plan_quantize
from model_defs.config import ModelConfig
from model_defs.spec import build_model
from runtime.generate import generate_ids
from runtime.model_runner import ModelRunner
from test_gguf_e2e import numpy_llama_greedy
from test_gguf_source import random_model, write_hf_folder, write_model_gguf

MORE_BITS_32 = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}  # use_more_bits(i, 32), by hand


def _plan(mix, arch="llama", **overrides):
    cfg_dict, _ = random_model(arch, head_dim=64, hidden=256, inter=512)
    cfg = ModelConfig.from_dict({**cfg_dict, **overrides}, "test")
    params = [(n, tuple(int(d) for d in p.shape)) for n, p in build_model(cfg, "float32", None).named_parameters()]
    return plan_quantize(mix, params, cfg).manifest()["tensors"]


def _layer(tensors, i):
    p = f"model.layers.{i}."
    qkv = {part: tensors.get(f"{p}self_attn.qkv_proj.weight [{part}]", tensors.get(f"{p}self_attn.qkv_proj.weight"))
           for part in ("q_proj", "k_proj", "v_proj")}
    return {**qkv, "o_proj": tensors[f"{p}self_attn.o_proj.weight"], "gate_up": tensors[f"{p}mlp.gate_up_proj.weight"],
            "down": tensors[f"{p}mlp.down_proj.weight"]}


@pytest.mark.parametrize("mix,base", [("q4_k_m", "q4_k"), ("q5_k_m", "q5_k")])
def test_k_m_mix_follows_llama_cpp(mix, base):
    """Q6_K for the LM head and, on the use_more_bits layers, attn_v and ffn_down; the base type elsewhere,
    the embedding included. A layer whose v differs from q/k runs them as separate matmuls."""
    tensors = _plan(mix, num_hidden_layers=32)
    assert tensors["lm_head.weight"] == "q6_k" and tensors["model.embed_tokens.weight"] == base
    for i in range(32):
        more = "q6_k" if i in MORE_BITS_32 else base
        assert _layer(tensors, i) == {"q_proj": base, "k_proj": base, "v_proj": more, "o_proj": base,
                                      "gate_up": base, "down": more}, i
        assert (f"model.layers.{i}.self_attn.qkv_proj.weight" in tensors) == (i not in MORE_BITS_32)


def test_q3_k_m_mix_follows_llama_cpp():
    """attn_v Q5_K on the first two layers, else Q4_K; ffn_down Q5_K below n/16 layers, else Q4_K;
    attn_output Q4_K; the rest Q3_K; the LM head Q6_K."""
    tensors = _plan("q3_k_m", num_hidden_layers=32)
    assert tensors["lm_head.weight"] == "q6_k" and tensors["model.embed_tokens.weight"] == "q3_k"
    for i in range(32):
        assert _layer(tensors, i) == {"q_proj": "q3_k", "k_proj": "q3_k", "v_proj": "q5_k" if i < 2 else "q4_k",
                                      "o_proj": "q4_k", "gate_up": "q3_k", "down": "q5_k" if i < 2 else "q4_k"}, i


def test_tied_embedding_and_llama_70b():
    """A tied embedding is the LM head (Q6_K); a GQA Llama of 80 layers (LLM_TYPE_70B) lifts a Q4_K attn_v to Q5_K."""
    assert _plan("q4_k_m", arch="qwen3")["model.embed_tokens.weight"] == "q6_k"
    tensors = _plan("q3_k_m", num_hidden_layers=80)
    assert _layer(tensors, 20)["v_proj"] == "q5_k" and _layer(tensors, 20)["q_proj"] == "q3_k"
    # layer 20 of 80 is no use_more_bits layer (20 >= 80/8, (20 - 10) % 3 == 1)
    assert _layer(_plan("q4_k_m", num_hidden_layers=80), 20)["v_proj"] == "q5_k"


def test_q4_k_m_model_runs_like_its_gguf(tmp_path):
    """A 2-layer Llama (use_more_bits: layer 1) quantized with `--quant q4_k_m` gives the greedy tokens of a
    float64 numpy Llama over gguf's dequantization of ggml's blocks of the same types; kiln.yaml lists them."""
    from compile.driver import compile_artifact
    cfg, tensors = random_model("llama", seed=5, head_dim=64, hidden=256, inter=512)
    hf = write_hf_folder(tmp_path / "hf", cfg, tensors)
    out = compile_artifact(model=str(hf), target="cpu", dtype="float32", out=str(tmp_path / "art"), weights=None,
                           cuda_arch=None, context=256, page_size=16, prefill_chunk=64, max_batch=2, quant="q4_k_m")
    q6 = {"lm_head.weight", "model.layers.1.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    Q = gguf.GGMLQuantizationType
    path = write_model_gguf(tmp_path / "q4_k_m.gguf", cfg, tensors, qtype=lambda n: Q.Q6_K if n in q6 else Q.Q4_K)
    summary = yaml.safe_load((out / "kiln.yaml").read_text())["quantization"]["summary"]
    assert summary == {"q4_k": 2 + 2 + 2 + 1 + 2, "q6_k": 3}  # per layer q, k (split in 1) or qkv, o, gate_up; down 0; embed
    assert generate_ids(ModelRunner(out, max_batch=2), [[1]], 32)[0] == numpy_llama_greedy(path, [1], 32)
