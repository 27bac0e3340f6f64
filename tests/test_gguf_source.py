"""GGUFSource: config and HF-layout tensors from real (stories260K) and test-written (Llama, Qwen2, Qwen3) GGUFs."""

import json

import numpy as np
import pytest

from conftest import DATA, STORIES_HF

import gguf  # noqa: E402
from formats.gguf import GGUFSource  # noqa: E402
from formats.errors import KilnError  # noqa: E402

STORIES = DATA / "stories260K"

# HF name pattern -> llama.cpp name pattern (what llama.cpp's convert_hf_to_gguf writes).
_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
            "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
            "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}

def gguf_name(hf):
    if hf in _GLOBAL or hf == "rope_freqs.weight":
        return _GLOBAL.get(hf, hf)
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_TO_GGUF[module]}.{kind}"

def llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute: HF rotate_half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

def random_model(arch, seed=0, head_dim=None, hidden=64, inter=96):
    """(HF config, HF-named float32 tensors) of a tiny random Llama / Qwen2 / Qwen3 with a 512-token vocab."""
    rng = np.random.default_rng(seed)
    heads, kv, layers = 4, 2, 2
    head_dim = head_dim or (32 if arch == "qwen3" else 16)
    hf_arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
    cfg = {"architectures": [hf_arch], "model_type": arch, "hidden_size": hidden, "intermediate_size": inter,
           "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim, "vocab_size": 512,
           "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
           "rope_theta": 1000000.0 if arch != "llama" else 10000.0,
           "rope_scaling": None, "hidden_act": "silu", "tie_word_embeddings": arch == "qwen3",
           "attention_bias": arch == "qwen2", "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2}
    w = {"model.embed_tokens.weight": (512, hidden), "model.norm.weight": (hidden,)}
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = (512, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        w |= {p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
              p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
              p + "self_attn.v_proj.weight": (kv * head_dim, hidden),
              p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
              p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
              p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
              p + "post_attention_layernorm.weight": (hidden,)}
        if arch == "qwen2":
            w |= {p + f"self_attn.{x}_proj.bias": (n * head_dim,) for x, n in (("q", heads), ("k", kv), ("v", kv))}
        if arch == "qwen3":
            w |= {p + "self_attn.q_norm.weight": (head_dim,), p + "self_attn.k_norm.weight": (head_dim,)}
    tensors = {}
    for name, shape in w.items():
        if name.endswith("norm.weight"):
            tensors[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            tensors[name] = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    return cfg, tensors

def write_hf_folder(folder, cfg, tensors):
    """An HF model folder: config.json, model.safetensors and stories260K's tokenizer files."""
    import shutil
    from safetensors.numpy import save_file
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, folder / "model.safetensors")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(STORIES_HF / f, folder / f)
    return folder

def write_model_gguf(path, cfg, tensors, tokenizer_gguf=STORIES / "gguf" / "stories260K-f32.gguf", qtype=None):
    """Write an HF model as llama.cpp would: its names, metadata and (llama) the q/k row permutation.
    Tokenizer metadata is copied from `tokenizer_gguf`; qtype (a GGMLQuantizationType, or a function of
    the HF name giving one or None) quantizes the 2-D weights: Kiln's native types with compile.quantize
    (ggml's bytes), others with gguf.quants."""
    from compile.quantize import quantize
    from formats.gguf import GGUFFile
    from formats.quant_layout import QUANT_TYPES
    arch = cfg["model_type"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    meta = GGUFFile(tokenizer_gguf).metadata
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_scores(meta["tokenizer.ggml.scores"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    for name, t in tensors.items():
        if arch == "llama" and ".q_proj." in name:
            t = llama_cpp_permute(t, cfg["num_attention_heads"])
        if arch == "llama" and ".k_proj." in name:
            t = llama_cpp_permute(t, cfg["num_key_value_heads"])
        t_type = qtype(name) if callable(qtype) else qtype
        if t_type is not None and t.ndim == 2:
            blocks = (quantize(t_type.name.lower(), t) if t_type.name.lower() in QUANT_TYPES
                      else gguf.quants.quantize(t, t_type))
            w.add_tensor(gguf_name(name), blocks, raw_dtype=t_type)
        else:
            w.add_tensor(gguf_name(name), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_random_model_round_trip(arch, tmp_path):
    """Config and every tensor come back exactly as the HF model that was written (permutation undone)."""
    cfg, tensors = random_model(arch)
    src = GGUFSource(write_model_gguf(tmp_path / f"{arch}.gguf", cfg, tensors))
    assert src.config == cfg
    assert sorted(src.tensor_names()) == sorted(tensors)
    for name, t in tensors.items():
        np.testing.assert_array_equal(src.tensor(name), t, err_msg=name)

def test_random_llama_q8_0(tmp_path):
    """Quantized tensors equal gguf's own quantize→dequantize, then un-permuted."""
    cfg, tensors = random_model("llama")
    src = GGUFSource(write_model_gguf(tmp_path / "q8.gguf", cfg, tensors, qtype=gguf.GGMLQuantizationType.Q8_0))
    Q8 = gguf.GGMLQuantizationType.Q8_0
    for name in ("model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        t = tensors[name]
        permuted = llama_cpp_permute(t, cfg["num_key_value_heads"]) if "k_proj" in name else t
        expected = gguf.quants.dequantize(gguf.quants.quantize(permuted, Q8), Q8)
        if "k_proj" in name:  # inverse permutation, written independently of GGUFSource
            n = cfg["num_key_value_heads"]
            expected = expected.reshape(n, -1, 2, t.shape[1]).transpose(0, 2, 1, 3).reshape(t.shape)
        np.testing.assert_array_equal(src.tensor(name), expected)
        assert 0 < np.abs(src.tensor(name) - t).max() < 0.05

@pytest.mark.parametrize("form", ["f32", "q8_0", "q4_0"])
def test_stories260k(form):
    """Config equals the HF folder's config.json; f32 tensors equal model.safetensors bit for bit."""
    from safetensors.numpy import load_file
    src = GGUFSource(STORIES / "gguf" / f"stories260K-{form}.gguf")
    hf_cfg = json.loads((STORIES_HF / "config.json").read_text())
    assert {k: hf_cfg[k] for k in src.config} == src.config
    hf = load_file(STORIES_HF / "model.safetensors")
    assert sorted(src.tensor_names()) == sorted(hf)
    for name, t in hf.items():
        got = src.tensor(name)
        assert got.dtype == np.float32 and got.shape == t.shape
        if form == "f32":
            np.testing.assert_array_equal(got, t, err_msg=name)
        else:
            assert np.abs(got - t).max() < (0.02 if form == "q8_0" else 0.2), name

def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    """llama.cpp keeps Llama 3.1 RoPE scaling only as a rope_freqs tensor; we recover the HF rope_scaling."""
    cfg, tensors = random_model("llama")
    head_dim, theta = cfg["head_dim"], 500000.0
    cfg["rope_theta"] = theta
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    # transformers' _compute_llama3_parameters, factor 8, low 1, high 4, original context 8192
    smooth = np.clip((8192 / wavelen - 1) / 3, 0, 1)
    factors = np.where(wavelen < 8192 / 4, 1.0, np.where(wavelen > 8192, 8.0, 1 / ((1 - smooth) / 8 + smooth)))
    path = tmp_path / "l3.gguf"
    write_model_gguf(path, cfg, tensors | {"rope_freqs.weight": factors.astype(np.float32)})
    assert GGUFSource(path).config["rope_scaling"] == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    write_model_gguf(path, cfg, tensors | {"rope_freqs.weight": (factors * 1.5).astype(np.float32)})
    with pytest.raises(KilnError, match="rope_freqs"):
        GGUFSource(path)
