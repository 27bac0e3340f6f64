"""Tensor parallelism on the CPU (Disco ProcessSession, runtime/ccl_cpu.py's all-reduce): tiny Llama-3 and
Qwen3 compiled with --tp 2 against the same model compiled for one device (fp32), TP=4 against transformers."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import STORIES_HF, compile_cpu, hf_logits, make_tiny_hf, tiny_artifact
from formats.errors import KilnError
from runtime.cli import add_model_flags, parser
from runtime.engine import Engine, EngineConfig
from runtime.model_runner import ModelRunner
from runtime.sampling import SamplingParams
from runtime.sharded_runner import ShardedModelRunner

PROMPTS = [[1, 17, 99, 3, 250, 42, 7], [1, 5], list(range(100, 170))]  # the last spans two prefill chunks (64)


@pytest.fixture(scope="module", params=["llama3", "qwen3"])
def pair(request, tmp_path_factory):
    """(one-device artifact, --tp 2 artifact) of one tiny random model, with a tokenizer for the engine."""
    arts = [tiny_artifact(request.param, tmp_path_factory, tp)[1] for tp in (None, 2)]
    for art in arts:
        shutil.copy(STORIES_HF / "tokenizer.json", art)  # prompts are ids < 256
    return arts


def run_steps(runner, decode_steps: int = 4) -> list[np.ndarray]:
    """Logits of a ragged prefill of PROMPTS, then of greedy decode steps, then of a fork's first step."""
    ids = list(range(len(PROMPTS)))
    for i in ids:
        runner.add_sequence(i)
    out = [runner.forward(ids, PROMPTS)]
    for _ in range(decode_steps):
        out.append(runner.forward(ids, [[int(t)] for t in out[-1].argmax(axis=1)]))
    runner.fork_sequence(0, 9, 5)
    out.append(runner.forward([9], [[33, 44]]))
    for i in ids + [9]:
        runner.remove_sequence(i)
    assert runner.free_pages() == runner.total_pages
    return out


def test_tp2_logits_match_one_device(pair):
    plain, tp2 = pair
    sharded = ShardedModelRunner(tp2, [0, 1], max_batch=8, kv_tokens=1024)
    try:
        got = run_steps(sharded)
    finally:
        sharded.close()
    ref = run_steps(ModelRunner(plain, max_batch=8, kv_tokens=1024))
    for step, (a, b) in enumerate(zip(got, ref)):
        assert np.abs(a - b).max() < 1e-5 * max(1.0, np.abs(b).max()), f"step {step}"


def test_tp2_engine_greedy_tokens_match_one_device(pair):
    plain, tp2 = pair
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = []
    for art, devices in ((plain, None), (tp2, [0, 1])):
        with Engine(EngineConfig(model_path=str(art), device_ids=devices, kv_tokens=1024, max_num_seqs=4)) as eng:
            outs.append([o.outputs[0].token_ids for o in eng.generate_sync(params, PROMPTS)])
            if devices:
                eng.runner.close()
    assert outs[0] == outs[1]


def test_tp4_logits_match_transformers(tmp_path):
    """Four ranks of a tiny Qwen3 with 4 KV heads (one query and one KV head per rank)."""
    hf = make_tiny_hf("qwen3", tmp_path / "hf", num_key_value_heads=4)
    runner = ShardedModelRunner(compile_cpu(hf, tmp_path / "tp4", tp=4), [0, 1, 2, 3], max_batch=2, kv_tokens=256)
    try:
        runner.add_sequence(0)
        got = [runner.forward([0], [PROMPTS[0][:5]])[0]] + [runner.forward([0], [[t]])[0] for t in PROMPTS[0][5:]]
    finally:
        runner.close()
    ref = hf_logits(hf, PROMPTS[0])[4:]
    for pos, (a, b) in enumerate(zip(got, ref)):
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-4, f"position {pos + 4}"


@pytest.mark.parametrize("tp, what", [(3, "num_attention_heads=4"), (4, "num_key_value_heads=2")])
def test_uneven_heads_are_a_one_line_error(tmp_path_factory, tp, what):
    hf = tiny_artifact("llama3", tmp_path_factory)[0]  # 4 heads, 2 KV heads
    with pytest.raises(KilnError) as e:
        compile_cpu(hf, tmp_path_factory.mktemp("uneven"), tp=tp)
    assert what in str(e.value) and f"over {tp} ranks" in str(e.value) and "\n" not in str(e.value)


def test_device_flag_and_artifact_mismatches(pair):
    plain, tp2 = pair
    def devices(flag):
        p = parser("kiln", "")
        add_model_flags(p)
        return p.parse_args(["--d", flag]).d

    assert devices("0,1") == [0, 1] and devices("2,3") == [2, 3] and devices("cuda:1") == [1]
    with pytest.raises(KilnError, match="'x' is not a device number"):
        devices("x")
    with pytest.raises(KilnError, match="recompile it with --tp 2"):
        Engine(EngineConfig(model_path=str(plain), device_ids=[0, 1]))
    with pytest.raises(KilnError, match="needs 2 distinct devices"):
        ShardedModelRunner(tp2, [0, 1, 2])
    with pytest.raises(KilnError, match="compiled with --tp 2"):
        ModelRunner(tp2)
