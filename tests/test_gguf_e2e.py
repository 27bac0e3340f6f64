"""GGUF end to end: compile → ModelRunner → greedy tokens.

stories260K in all four forms (HF folder, GGUF f32/q8_0/q4_0) against expected.json and a float64
numpy reference over the same dequantized weights; tiny random Llama/Qwen3 models give the same
tokens from GGUF as from safetensors."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import gguf  # noqa: E402
from conftest import STORIES_EXPECTED, STORIES_HF, compile_cpu  # noqa: E402
from runtime.generate import generate_ids  # noqa: E402
from runtime.model_runner import ModelRunner  # noqa: E402
from runtime.tokenizer import Tokenizer  # noqa: E402
from test_gguf_source import STORIES, random_model, write_hf_folder, write_model_gguf  # noqa: E402

ALL_EXPECTED = STORIES_EXPECTED
EXPECTED = ALL_EXPECTED["greedy_from_bos"]
REPO = Path(__file__).resolve().parents[1]
FORMS = {"hf": STORIES_HF, "f32": STORIES / "gguf" / "stories260K-f32.gguf",
         "q8_0": STORIES / "gguf" / "stories260K-q8_0.gguf", "q4_0": STORIES / "gguf" / "stories260K-q4_0.gguf"}


def reference_weights(path):
    """HF-layout float64 weights read with gguf's own reader and dequantizer (not Kiln's GGUF code)."""
    reader = gguf.GGUFReader(path)
    heads = int(reader.fields["llama.attention.head_count"].contents())
    kv = int(reader.fields["llama.attention.head_count_kv"].contents())
    w = {}
    for t in reader.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist()))).astype(np.float64)
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):  # undo llama.cpp's interleaved-RoPE row order
            n = heads if "attn_q" in t.name else kv
            a = a.reshape(n, -1, 2, a.shape[1]).transpose(0, 2, 1, 3).reshape(a.shape)
        w[t.name] = a
    return w, heads, kv, float(reader.fields["llama.attention.layer_norm_rms_epsilon"].contents())


def numpy_llama_greedy(path, prompt, n):
    """Greedy tokens of a float64 numpy Llama (rotate_half RoPE, GQA, SwiGLU, tied embeddings)."""
    w, heads, kv, eps = reference_weights(path)
    emb = w["token_embd.weight"]
    d = emb.shape[1] // heads
    layers = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blk."))
    inv = 10000.0 ** (-np.arange(0, d, 2) / d)

    def norm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    def rope(x, pos):  # x [t, h, d]
        ang = pos[:, None] * inv[None]
        cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]
        rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
        return x * cos + rot * sin

    ids = list(prompt)
    for _ in range(n):
        t = len(ids)
        x, pos = emb[ids], np.arange(t, dtype=np.float64)
        for i in range(layers):
            p = f"blk.{i}."
            h = norm(x, w[p + "attn_norm.weight"])
            q = rope((h @ w[p + "attn_q.weight"].T).reshape(t, heads, d), pos)
            k = rope((h @ w[p + "attn_k.weight"].T).reshape(t, kv, d), pos).repeat(heads // kv, axis=1)
            v = (h @ w[p + "attn_v.weight"].T).reshape(t, kv, d).repeat(heads // kv, axis=1)
            s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + np.triu(np.full((t, t), -np.inf), 1)
            s = np.exp(s - s.max(-1, keepdims=True))
            o = np.einsum("hqk,khd->qhd", s / s.sum(-1, keepdims=True), v).reshape(t, heads * d)
            x = x + o @ w[p + "attn_output.weight"].T
            h = norm(x, w[p + "ffn_norm.weight"])
            g = h @ w[p + "ffn_gate.weight"].T
            x = x + ((g / (1 + np.exp(-g))) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
        logits = norm(x[-1], w["output_norm.weight"]) @ w.get("output.weight", emb).T
        ids.append(int(np.argmax(logits)))
    return ids[len(prompt):]


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, stories_artifact):
    """Each form compiled: f32 with the `python -m compile` CLI; the HF form is conftest's artifact of
    model_defs/stories260K (the same files as hf/)."""
    root = tmp_path_factory.mktemp("stories-forms")
    run_cli("-m", "compile", "--model", str(FORMS["f32"]), "--target", "cpu", "--out", str(root / "f32"))
    return {"hf": stories_artifact, "f32": root / "f32"} | {
        form: compile_cpu(FORMS[form], root / form) for form in ("q8_0", "q4_0")}


def test_generate_cli_on_gguf_artifact(artifacts):
    """`python -m runtime.generate` on the artifact compiled from the f32 GGUF prints the reference text."""
    ref = ALL_EXPECTED["greedy_once_upon_a_time"]
    out = run_cli("-m", "runtime.generate", "--w", str(artifacts["f32"]), "--prompt", ref["prompt"],
                  "--max_tokens", str(ref["max_new_tokens"]))
    assert out == ref["text"] + "\n"


@pytest.mark.parametrize("form", ["hf", "f32"])
def test_story_from_bos(form, artifacts):
    """The float forms give expected.json's whole 345-token story from BOS."""
    tok = Tokenizer(artifacts[form])
    prompt = tok.encode("")
    assert prompt == EXPECTED["prompt_ids"] == [tok.bos_token_id]
    story = generate_ids(ModelRunner(artifacts[form]), [prompt], 400, stop_ids={1, 2})[0]
    assert len(story) == 345 and story == EXPECTED["generated_ids"]
    assert tok.decode(story).startswith(EXPECTED["text"][:60])


@pytest.mark.parametrize("form", ["q8_0", "q4_0"])
def test_quantized_matches_numpy_reference(form, artifacts):
    """First 32 greedy tokens equal a float64 numpy forward over the same dequantized weights."""
    ref = numpy_llama_greedy(FORMS[form], [1], 32)
    assert generate_ids(ModelRunner(artifacts[form]), [[1]], 32)[0] == ref


@pytest.mark.parametrize("form", ["q8_0", "q4_0"])
def test_quantized_forms_stay_packed(form, artifacts):
    """Each 2-D tensor keeps its GGUF type (Q8_0, Q4_0; F16 as stored): the weights stay about the file's size."""
    quantization = yaml.safe_load((artifacts[form] / "kiln.yaml").read_text())["quantization"]
    stored = {t.tensor_type.name.lower() for t in gguf.GGUFReader(FORMS[form]).tensors if len(t.shape) == 2}
    assert set(quantization["summary"]) == stored and form in stored
    weight_bytes = sum(f.stat().st_size for f in (artifacts[form] / "weights").glob("*.safetensors"))
    assert weight_bytes <= 1.3 * FORMS[form].stat().st_size


def test_numpy_reference_is_right():
    """The reference itself reproduces expected.json on the f32 GGUF."""
    assert numpy_llama_greedy(FORMS["f32"], [1], 32) == EXPECTED["generated_ids"][:32]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_random_model_gguf_equals_safetensors(arch, tmp_path):
    """A tiny random model as an HF folder and as a llama.cpp-layout GGUF: identical greedy tokens."""
    cfg, tensors = random_model(arch, seed=3)
    hf = write_hf_folder(tmp_path / "hf", cfg, tensors)
    gguf_path = write_model_gguf(tmp_path / f"{arch}.gguf", cfg, tensors)
    prompts = [[1, 403, 407, 261, 378], [1, 42]]
    outs = [generate_ids(ModelRunner(compile_cpu(p, tmp_path / f"art-{i}")), prompts, 16)
            for i, p in enumerate((hf, gguf_path))]
    assert outs[0] == outs[1] and len(outs[0][0]) == 16
