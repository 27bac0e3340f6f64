"""Quantized models end to end on the CPU: `--quant`, native GGUF (uniform and *_K_M-like mixed), tied heads.

Tiny random Llama-3 and Qwen3 models (hidden 256, intermediate 512: whole k-quant super-blocks) are
quantized by Kiln with `--quant` and also written as GGUF files holding ggml's bytes for the same
weights. Each GGUF is compiled twice, packed (native) and with `--dequantize` (today's float path):
their logits must agree within 1e-4 relative and their 32 greedy tokens be identical. Above 8
sequences the runner switches to the unfused `decode_wide` / `logits_wide` (schedules/quant_wide.py):
they must agree with the dequantize path too, and the engine's tokens must not depend on the batch.
With `--fuse_norms` the fused GEMVs carry decode's RMSNorms: the same logits and tokens as without.
"""

import re

import numpy as np
import pytest
import yaml
from safetensors import safe_open

import gguf  # noqa: E402
from compile.convert import hf_names  # noqa: E402
from compile.driver import compile_artifact  # noqa: E402
from compile.quantize import quantize  # noqa: E402
from compile.repack import repack  # noqa: E402
from formats.gguf import GGUFSource  # noqa: E402
from runtime.generate import generate_ids  # noqa: E402
from runtime.model_runner import ModelRunner  # noqa: E402
from test_gguf_e2e import numpy_llama_greedy  # noqa: E402
from test_gguf_source import random_model, write_hf_folder, write_model_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType
PROMPTS = [[1, 403, 407, 261, 378, 300, 12], [1, 42]]
FUSED_ROWS = 8  # runtime/model_runner.py's limit of the dequant-fused GEMV
WIDE = FUSED_ROWS + 1  # sequences of a step that takes the wide functions
# Llama: a Q4_K_M-like mix (llama.cpp's choice for layer 0's attn_v and layer 1's ffn_down, and the
# LM head: Q6_K), so layer 0 runs q, k and v as separate matmuls; the embedding is Q3_K.
MIXED = {"model.layers.0.self_attn.v_proj.weight": Q.Q6_K, "model.layers.1.mlp.down_proj.weight": Q.Q6_K,
         "lm_head.weight": Q.Q6_K, "model.embed_tokens.weight": Q.Q3_K}
CASES = {"llama": ("q4k", lambda name: MIXED.get(name, Q.Q4_K)),  # (--quant, GGUF types)
         "qwen3": ("q8_0", lambda name: Q.Q8_0)}  # tied embeddings: the LM head is the Q8_0 embedding


def _compile(model, out, **kw):
    return compile_artifact(model=str(model), target="cpu", dtype="float32", out=str(out), weights=None,
                            cuda_arch=None, context=256, page_size=16, prefill_chunk=64, max_batch=WIDE, **kw)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    arch = request.param
    flag, types = CASES[arch]
    tmp = tmp_path_factory.mktemp(f"quant-{arch}")
    cfg, tensors = random_model(arch, seed=5, head_dim=64, hidden=256, inter=512)
    hf = write_hf_folder(tmp / "hf", cfg, tensors)
    path = write_model_gguf(tmp / f"{arch}.gguf", cfg, tensors, qtype=types)
    quant = _compile(hf, tmp / "quant", quant=flag)
    # Qwen3's GGUF holds --quant's blocks: its artifact would be the same (checked on the weights), so the
    # --quant one runs as the native side and one compile is saved.
    native = quant if arch == "qwen3" else _compile(path, tmp / "native")
    # decode's RMSNorms folded into the QKV and gate/up GEMVs (schedules/norm_gemv.py), from the native side's source
    fused = _compile(hf, tmp / "fused", quant=flag, fuse_norms=True) if arch == "qwen3" else \
        _compile(path, tmp / "fused", fuse_norms=True)
    return {"arch": arch, "cfg": cfg, "tensors": tensors, "types": types, "gguf": path, "quant": quant,
            "native": native, "fused": fused, "dequantized": _compile(path, tmp / "dequantized", dequantize=True)}


def _runner(artifact):
    return ModelRunner(artifact, max_batch=WIDE)


def _prefill_logits(artifact):
    runner = _runner(artifact)
    for i in range(len(PROMPTS)):
        runner.add_sequence(i)
    return runner.forward(list(range(len(PROMPTS))), PROMPTS).astype(np.float64)


def _manifest(artifact):
    return yaml.safe_load((artifact / "kiln.yaml").read_text())


def test_native_matches_dequantized_path(case):
    native, ref = _prefill_logits(case["native"]), _prefill_logits(case["dequantized"])
    assert np.abs(native - ref).max() <= 1e-4 * np.abs(ref).max()
    tokens = [generate_ids(_runner(case[k]), PROMPTS, 32) for k in ("native", "dequantized")]
    assert tokens[0] == tokens[1] and all(len(t) == 32 for t in tokens[0])


def test_native_keeps_every_tensor_packed(case):
    """Every 2-D weight stays in its GGUF type; the dequantized artifact has none."""
    q = _manifest(case["native"])["quantization"]
    stored = {case["types"](n).name.lower() for n, t in case["tensors"].items() if t.ndim == 2}
    assert set(q["summary"]) == stored and not any("converted to" in n for n in q["notes"])
    assert _manifest(case["dequantized"])["quantization"] is None
    if case["arch"] == "llama":  # the mixed layer: one matmul per part; llama's q/k rows un-permuted
        assert q["tensors"]["model.layers.0.self_attn.qkv_proj.weight [v_proj]"] == "q6_k"
        assert any("one matmul per part" in n for n in q["notes"])
    else:
        assert "lm_head.weight" not in case["tensors"] and q["tensors"]["model.embed_tokens.weight"] == "q8_0"


def _weights(artifact):
    out = {}
    for f in (artifact / "weights").glob("*.safetensors"):
        with safe_open(str(f), "numpy") as s:
            out |= {k: s.get_tensor(k) for k in s.keys()}
    return out


def test_quant_writes_ggml_blocks(case):
    """`--quant`'s components are ggml's blocks of the float weights, repacked (the layout's bits)."""
    weights = _weights(case["quant"])
    qtype = _manifest(case["quant"])["quantization"]["tensors"]["model.layers.1.mlp.down_proj.weight"]
    w = case["tensors"]["model.layers.1.mlp.down_proj.weight"]
    for c, a in repack(qtype, quantize(qtype, w), w.shape[1]).items():
        np.testing.assert_array_equal(weights[f"model.layers.1.mlp.down_proj.weight.{c}"], a)


def test_quant_runs_like_its_gguf(case, tmp_path):
    """Qwen3 `--quant q8_0` holds the same components as its Q8_0 GGUF's blocks repacked, for every weight.
    Llama `--quant q4k` gives the greedy tokens of a float64 numpy Llama over gguf's dequantization of
    ggml's Q4_K blocks."""
    if case["arch"] == "qwen3":
        source, weights = GGUFSource(case["gguf"]), _weights(case["quant"])
        packed = {n.rpartition(".")[0] for n in weights if n.endswith(".q")}
        assert "model.embed_tokens.weight" in packed and len(packed) == 1 + 4 * 2  # embedding, 4 per layer
        for name in packed:
            blocks = np.concatenate([source.blocks(p) for p in hf_names(name)])
            k = case["tensors"][hf_names(name)[0]].shape[1]
            for c, a in repack("q8_0", blocks, k).items():
                np.testing.assert_array_equal(weights[f"{name}.{c}"], a, err_msg=name)
    else:
        path = write_model_gguf(tmp_path / "q4_k.gguf", case["cfg"], case["tensors"], qtype=Q.Q4_K)
        assert generate_ids(_runner(case["quant"]), [[1]], 32)[0] == numpy_llama_greedy(path, [1], 32)


def _wide_prompts(n):
    return [[1, *range(20 + 7 * i, 20 + 7 * i + 2 + i % 5)] for i in range(n)]


def _decode_logits(artifact, prompts):
    """Logits of one decode step of all `prompts` together, after their prefill."""
    runner = _runner(artifact)
    ids = list(range(len(prompts)))
    for i in ids:
        runner.add_sequence(i)
    runner.forward(ids, prompts)
    return runner, runner.forward(ids, [[5 + i] for i in ids]).astype(np.float64)


def test_wide_functions_match_dequantized_path(case):
    """9 sequences decode through `decode_wide` and `logits_wide` (the unfused dequantize + matmul), whose
    logits equal the dequantize path's; the dequantized artifact has no wide functions."""
    runner, wide = _decode_logits(case["native"], _wide_prompts(WIDE))
    plain, ref = _decode_logits(case["dequantized"], _wide_prompts(WIDE))
    assert runner._wide == {"decode", "logits"} and not plain._wide
    assert runner._for_rows("decode", WIDE) is not runner._for_rows("decode", FUSED_ROWS)
    assert np.abs(wide - ref).max() <= 1e-4 * np.abs(ref).max()


def test_engine_tokens_do_not_depend_on_the_batch(case):
    """Batches of 8 (the fused GEMV) and 9 (the wide functions) give each prompt the greedy tokens it
    gets alone."""
    from runtime import Engine, EngineConfig, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = _wide_prompts(WIDE)
    with Engine(EngineConfig(model_path=str(case["native"]), kv_tokens=2048, max_num_seqs=WIDE,
                                 prefix_caching=False)) as engine:
        alone = [engine.generate_sync(params, [p])[0].outputs[0].token_ids for p in prompts]
        for n in (FUSED_ROWS, WIDE):
            together = [o.outputs[0].token_ids for o in engine.generate_sync(params, prompts[:n])]
            assert together == alone[:n], n


def test_random_weights_fill_a_quantized_artifact(case, tmp_path):
    """bench/random_weights.py fills a library-only copy of each artifact (the mixed GGUF's types; Q8_0):
    random code words and small scales, so the logits are finite and differ between prompts, fused or wide."""
    import shutil

    from bench.random_weights import fill

    art = tmp_path / "art"
    art.mkdir()
    for name in ("params.json", "kiln.yaml", "model.so"):
        shutil.copyfile(case["native"] / name, art / name)
    fill(art, None)
    weights = _weights(art)
    assert all(a.any() for n, a in weights.items() if n.endswith((".q", ".d")))
    for n in (2, WIDE):
        _, logits = _decode_logits(art, _wide_prompts(n))
        assert np.isfinite(logits).all() and np.abs(logits[0] - logits[1]).max() > 0


def test_norms_folded_into_the_gemvs_decode_alike(case):
    """`--fuse_norms`: decode's QKV and gate/up GEMVs carry their RMSNorm (no norm kernel; the Llama's layer 0
    folds it into each of its q, k, v parts), the gate/up one silu·up too (schedules/swiglu_gemv.py, on the CPU
    only with the norm). Decode logits of 1 and 8 sequences equal the unfused native
    artifact's within 1e-4 of their largest: both sum in fp32 and the fp32 model rounds the unfused normed x to
    fp32 only (the differences are fp32 summation order, ~1e-6); 32 greedy tokens are identical."""
    library = {k: (case[k] / _manifest(case[k])["library"]).read_bytes() for k in ("fused", "native")}
    assert b"rms_norm_dequantize_q" in library["fused"] and b"rms_norm_dequantize_q" not in library["native"]
    swiglu = rb"dequantize_q\w+_silu_multiply"  # schedules/swiglu_gemv.py's call: on the CPU with the norm only
    assert re.search(b"rms_norm_" + swiglu, library["fused"]) and not re.search(swiglu, library["native"])
    for n in (1, FUSED_ROWS):
        _, fused = _decode_logits(case["fused"], _wide_prompts(n))
        _, plain = _decode_logits(case["native"], _wide_prompts(n))
        assert np.abs(fused - plain).max() <= 1e-4 * np.abs(plain).max(), n
    tokens = [generate_ids(_runner(case[k]), PROMPTS, 32) for k in ("fused", "native")]
    assert tokens[0] == tokens[1] and all(len(t) == 32 for t in tokens[0])
