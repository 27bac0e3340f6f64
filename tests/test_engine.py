"""The serving engine on stories260K: batching, preemption, prefix caching, stop strings, bad input.

References: runtime.generate.generate_ids (each prompt alone, greedy) and a bare ModelRunner's logits.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from runtime import Engine, EngineConfig, KilnError, SamplingParams
from runtime.generate import generate_ids
from runtime.model_runner import ModelRunner

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
         "One day, she saw a big, red ball. She wanted to play with it, but it was too high. ")
OPENINGS = ["Once upon a time", "Tom had a dog", "The sun was hot", "Lily went to the park", "A bird sang",
            "Mom said no", "The cat was sad", "Ben and Mia"]


def prompts32() -> list[str]:
    """32 prompts from ~5 to ~120 tokens (several longer than a step's token budget)."""
    return [(STORY * (i % 4) if i % 3 == 0 else "") + OPENINGS[i % 8] + " " * (i // 8) for i in range(32)]


@pytest.fixture(scope="module")
def engine(stories_artifact):
    with Engine(EngineConfig(model_path=str(stories_artifact), max_num_seqs=16)) as eng:
        yield eng


def count_forward(engine) -> list[tuple[list[int], list[int]]]:
    """Record (seq_ids, token counts) of every ModelRunner.forward call the engine makes."""
    calls, forward = [], engine.runner.forward

    def counted(seq_ids, token_lists, *args):
        calls.append((list(seq_ids), [len(t) for t in token_lists]))
        return forward(seq_ids, token_lists, *args)

    engine.runner.forward = counted
    return calls


def all_pages_free(engine) -> bool:
    engine.scheduler.clear_cache()
    return engine.runner.free_pages() == engine.runner.total_pages


def test_32_requests_in_a_cache_for_4_match_each_alone(stories_artifact):
    cfg = EngineConfig(model_path=str(stories_artifact), kv_tokens=28 * 16, max_num_seqs=32,
                       max_num_batched_tokens=64)
    with Engine(cfg) as eng:
        calls = count_forward(eng)
        outs = eng.generate_sync(SamplingParams(temperature=0, max_tokens=48), prompts32())
        assert eng.scheduler.num_preemptions > 0
        assert any(0 < n < len(o.prompt_token_ids) for o in outs for _, ns in calls for n in ns if n > 1)
        assert max(sum(ns) for _, ns in calls) <= 64
        assert all_pages_free(eng)
        runner = ModelRunner(stories_artifact)
        for o in outs:
            want = generate_ids(runner, [o.prompt_token_ids], 48, eng.tokenizer.eos_token_ids)[0]
            assert o.token_ids == want, o.prompt
            assert o.finish_reason == ("length" if len(want) == 48 else "stop")
            assert o.text.strip() == eng.tokenizer.decode(want).strip()  # (leading space: prompt context)


def test_prefix_cache_reuses_a_200_token_prefix(engine):
    ids = engine.tokenizer.encode(STORY * 6)
    prefix, a, b = ids[:200], ids[200:230], ids[230:270]
    engine.generate_sync(SamplingParams(temperature=0, max_tokens=4), [prefix + a])
    calls = count_forward(engine)
    try:
        out = engine.generate_sync(SamplingParams(temperature=0, max_tokens=6), [prefix + b])[0]
    finally:
        del engine.runner.forward
    prefill = sum(sum(ns) for _, ns in calls) - (out.num_output_tokens - 1)
    assert prefill <= len(prefix + b) - 200 + engine.runner.page_size
    want = generate_ids(ModelRunner(engine.runner.artifact), [prefix + b], 6, engine.tokenizer.eos_token_ids)[0]
    assert out.token_ids == want


def test_seeds_reproduce_and_top_k_1_is_greedy(engine):
    prompt = "Once upon a time"

    def text(**kw):
        return engine.generate_sync(SamplingParams(max_tokens=40, **kw), [prompt])[0].text

    assert text(seed=5, temperature=1.0) == text(seed=5, temperature=1.0)
    assert text(seed=5, temperature=1.0) != text(seed=6, temperature=1.0)
    assert text(top_k=1, temperature=1.0, seed=1) == text(temperature=0)


def test_n_completions_fork_the_prompt(engine):
    prompt = STORY + "Then"
    calls = count_forward(engine)
    try:
        out = engine.generate_sync(SamplingParams(n=3, seed=2, max_tokens=20, ignore_eos=True), [prompt])[0]
    finally:
        del engine.runner.forward
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    computed = sum(sum(ns) for _, ns in calls) - 3 * 19
    assert computed < len(out.prompt_token_ids) + 2 * engine.runner.page_size


def test_logprobs_equal_log_softmax_of_the_model_logits(engine):
    out = engine.generate_sync(SamplingParams(temperature=0, max_tokens=8, logprobs=True, top_logprobs=3),
                               ["Tom had a dog"])[0]
    runner = ModelRunner(engine.runner.artifact)
    runner.add_sequence(0)
    logits = runner.forward([0], [out.prompt_token_ids])
    for tok, lp in zip(out.token_ids, out.outputs[0].logprobs):
        ref = logits[0].astype(np.float64) - np.log(np.exp(logits[0].astype(np.float64)).sum())
        assert lp.token_id == tok
        assert abs(lp.logprob - ref[tok]) < 1e-4
        assert list(lp.top) == np.argsort(-ref)[:3].tolist()
        logits = runner.forward([0], [[tok]])


def test_stop_strings_across_token_boundaries_stop_exactly(engine):
    params = SamplingParams(temperature=0, max_tokens=60)
    full = engine.generate_sync(params, ["Lily went to the park"])[0]
    pieces = [engine.tokenizer.decode(full.token_ids[:i + 1]) for i in range(len(full.token_ids))]
    # a stop string made of the end of one token and the start of the next
    cut = next(i for i in range(5, len(pieces) - 1)
               if len(pieces[i]) - len(pieces[i - 1]) >= 2 and len(pieces[i + 1]) - len(pieces[i]) >= 2)
    stop = full.text[len(pieces[cut]) - 2:len(pieces[cut]) + 2]
    expected = full.text[:full.text.find(stop)]
    for stops in ([stop], ["never appears", stop], [stop[:-1] + "\x00"]):
        stream = engine.generate_stream(SamplingParams(temperature=0, max_tokens=60, stop=stops),
                                        "Lily went to the park")
        streamed = list(stream)
        want = expected if stop in stops else full.text
        assert "".join(streamed) == want == stream.output.text
        assert stream.output.finish_reason == ("stop" if stop in stops else full.finish_reason)


def test_bad_requests_fail_alone_while_others_are_served(engine):
    long = engine.generate_stream(SamplingParams(temperature=0, max_tokens=200, ignore_eos=True), "Ben and Mia")
    pieces = iter(long)
    next(pieces)
    bad = {"context": ("word " * 600, SamplingParams()), "max_tokens": ("hi", SamplingParams(max_tokens=0)),
           "top_p": ("hi", SamplingParams(top_p=1.5)), "UTF-8": (b"\xff\xfe", SamplingParams()),
           "UTF-8 ": ("caf\udce9", SamplingParams()), "seed": ("hi", SamplingParams(seed=-1))}
    for word, (prompt, params) in bad.items():
        with pytest.raises(KilnError, match=word.strip()):
            engine.generate_stream(params, prompt)
    outs = engine.generate_sync(SamplingParams(temperature=0, max_tokens=5), ["Tom had a dog", b"\xff", "A bird"])
    assert [o.finish_reason for o in outs] == ["length", "error", "length"]
    assert "UTF-8" in outs[1].error
    rest = "".join(pieces)
    assert long.output.num_output_tokens == 200 and long.output.finish_reason == "length"
    assert rest


def test_requests_added_together_share_their_first_step_or_none_is_queued(engine):
    """add_requests: one bad pair queues none of them; good ones are admitted before the engine's next
    step, so their prompts are prefilled in one batch however fast the engine thread runs."""
    import queue

    greedy = SamplingParams(temperature=0, max_tokens=3)
    with pytest.raises(KilnError, match="top_p"):
        engine.add_requests([("Tom had a dog", greedy), ("A bird", SamplingParams(top_p=1.5))], lambda d: None)
    batches = []
    forward = engine.runner.forward
    engine.runner.forward = lambda seq_ids, *a, **k: batches.append(len(seq_ids)) or forward(seq_ids, *a, **k)
    try:
        done: queue.Queue = queue.Queue()
        ids = engine.add_requests([(p, greedy) for p in ("Tom had a dog", "A bird sang", "Ben and Mia")], done.put)
        finished = set()
        while len(finished) < len(ids):
            d = done.get()
            if d.output is not None:
                finished.add(d.request_id)
    finally:
        engine.runner.forward = forward
    assert batches[0] == 3 and engine.stats().running == 0


def test_async_streams_and_abort(engine):
    async def run():
        async def collect(prompt):
            return [d async for d in engine.generate_async(SamplingParams(temperature=0, max_tokens=20), prompt)]

        async def aborted():
            deltas = []
            async for d in engine.generate_async(SamplingParams(max_tokens=300, ignore_eos=True), "Mom said no",
                                                 request_id="to-abort"):
                deltas.append(d)
                if len(deltas) == 3:
                    engine.abort("to-abort")
            return deltas

        return await asyncio.gather(collect("The cat was sad"), collect("A bird sang"), aborted())

    a, b, c = asyncio.run(run())
    for deltas in (a, b):
        assert deltas[-1].output is not None
        assert "".join(d.text for d in deltas) == deltas[-1].output.text
    assert c[-1].output.finish_reason == "abort" and c[-1].output.num_output_tokens < 300


def test_submission_from_many_threads(engine):
    results = {}

    def worker(i):
        results[i] = engine.generate_sync(SamplingParams(temperature=0, max_tokens=10), [OPENINGS[i]])[0].text

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alone = engine.generate_sync(SamplingParams(temperature=0, max_tokens=10), OPENINGS)
    assert [results[i] for i in range(8)] == [o.text for o in alone]


def test_a_failing_step_fails_its_requests_and_the_engine_serves_on(engine):
    forward = engine.runner.forward

    def broken(*args):
        del engine.runner.forward  # fail once
        raise RuntimeError("injected")

    engine.runner.forward = broken
    out = engine.generate_sync(SamplingParams(temperature=0, max_tokens=5), ["Tom had a dog"])[0]
    assert out.finish_reason == "error" and "injected" in out.error
    assert engine.runner.forward == forward
    again = engine.generate_sync(SamplingParams(temperature=0, max_tokens=5), ["Tom had a dog"])[0]
    assert again.finish_reason == "length" and again.num_output_tokens == 5
    assert all_pages_free(engine)


def test_a_batch_mixing_rows_with_and_without_logprobs(engine):
    """Rows asking for logprobs and rows that do not, in the same steps: the same greedy tokens."""
    kinds = [SamplingParams(temperature=0, max_tokens=12), SamplingParams(temperature=0, max_tokens=12, logprobs=True)]

    async def run():
        async def one(params):
            return [d async for d in engine.generate_async(params, "The sun was hot")][-1].output
        return await asyncio.gather(*(one(p) for p in kinds))

    greedy, with_logprobs = asyncio.run(run())
    assert greedy.token_ids == with_logprobs.token_ids
    assert [lp.token_id for lp in with_logprobs.outputs[0].logprobs] == with_logprobs.token_ids


def test_repetition_penalty_matches_transformers_step_by_step(engine):
    import torch
    import transformers

    out = engine.generate_sync(SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.5,
                                              ignore_eos=True), ["Tom had a dog"])[0]
    runner, proc = ModelRunner(engine.runner.artifact), transformers.RepetitionPenaltyLogitsProcessor(1.5)
    runner.add_sequence(0)
    ids = list(out.prompt_token_ids)
    logits = runner.forward([0], [ids])
    for _ in range(30):
        ids.append(int(proc(torch.tensor([ids]), torch.tensor(logits)).argmax()))
        logits = runner.forward([0], [ids[-1:]])
    assert out.token_ids == ids[len(out.prompt_token_ids):]


def test_a_random_mix_under_page_pressure_always_finishes(stories_artifact):
    """Random params, n, stops, logprobs, penalties and aborts against a tiny cache: no crash, no hang,
    no stop string in any text, every page back."""
    import queue
    import random

    rnd = random.Random(0)
    words = STORY.split()
    cfg = EngineConfig(model_path=str(stories_artifact), kv_tokens=20 * 16, max_num_seqs=12, max_num_batched_tokens=48)
    with Engine(cfg) as eng:
        done, ids, params = queue.Queue(), [], {}
        for _ in range(60):
            p = SamplingParams(temperature=rnd.choice([0, 0.8]), top_p=rnd.choice([1, 0.9]), top_k=rnd.choice([-1, 5]),
                               min_p=rnd.choice([0, 0.1]), max_tokens=rnd.randint(1, 100), n=rnd.choice([1, 2, 3]),
                               seed=rnd.choice([None, 1]), stop=rnd.choice([None, ["the"], [" a", "ark"]]),
                               logprobs=rnd.random() < 0.2, frequency_penalty=rnd.choice([0, 0.5]),
                               ignore_eos=rnd.random() < 0.3)
            ids.append(eng.add_request(" ".join(rnd.choices(words, k=rnd.randint(1, 60))), p, done.put))
            params[ids[-1]] = p
            if rnd.random() < 0.15:
                eng.abort(rnd.choice(ids))
        outputs = {}
        while len(outputs) < len(ids):
            delta = done.get(timeout=60)
            if delta.output:
                outputs[delta.request_id] = delta.output
        assert eng.scheduler.num_preemptions > 0
        for rid, out in outputs.items():
            assert out.error is None
            finished = [c for c in out.outputs if c.finish_reason != "abort"]
            assert len(out.outputs) == params[rid].n or any(c.finish_reason == "abort" for c in out.outputs)
            assert not any(s in c.text for c in finished for s in params[rid].stop)
        assert all_pages_free(eng)


def test_generate_async_raises_bad_requests_at_the_call(engine):
    async def run():
        with pytest.raises(KilnError, match="top_p"):
            engine.generate_async(SamplingParams(top_p=0), "hi")
        return [d async for d in engine.generate_async(SamplingParams(temperature=0, max_tokens=3), "hi")]

    assert asyncio.run(run())[-1].output.num_output_tokens == 3


def test_tiny_qwen3_shares_prefixes_and_preempts_like_each_alone(tmp_path):
    """Another family and head layout (qwen3: q/k norms, head_dim 32, GQA), random weights; prompts as ids."""
    import shutil

    from conftest import STORIES_HF, compile_cpu, make_tiny_hf

    artifact = compile_cpu(make_tiny_hf("qwen3", tmp_path / "hf"), tmp_path / "art")
    shutil.copy(STORIES_HF / "tokenizer.json", artifact)  # the engine needs a tokenizer; prompts are ids < 256
    rng = np.random.default_rng(0)
    shared = rng.integers(3, 256, 70).tolist()
    prompts = [shared[:rng.integers(20, 70)] + rng.integers(3, 256, rng.integers(1, 30)).tolist() for _ in range(12)]
    cfg = EngineConfig(model_path=str(artifact), kv_tokens=16 * 16, max_num_seqs=12, max_num_batched_tokens=40)
    with Engine(cfg) as eng:
        outs = eng.generate_sync(SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), prompts[:1])
        outs += eng.generate_sync(SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), prompts[1:])
        assert eng.scheduler.num_preemptions > 0
        assert all_pages_free(eng)
    runner = ModelRunner(artifact)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == generate_ids(runner, [prompt], 24)[0]


def test_penalties_on_the_device_match_the_numpy_reference(engine):
    """Greedy with all three penalties, two requests batched: the tokens the numpy reference picks
    step by step from the same model's logits."""
    from sampling_reference import apply_penalties

    params = SamplingParams(temperature=0, max_tokens=30, frequency_penalty=0.7, presence_penalty=0.4,
                            repetition_penalty=1.2, ignore_eos=True)
    prompts = ["Tom had a dog", "The sun was hot"]
    device = engine.generate_sync(params, prompts)
    runner = ModelRunner(engine.runner.artifact)
    for seq_id, out in enumerate(device):
        prompt, tokens = out.prompt_token_ids, []
        runner.add_sequence(seq_id)
        logits = runner.forward([seq_id], [prompt])
        for _ in range(30):
            tokens.append(int(apply_penalties(logits, [params], [prompt], [tokens]).argmax()))
            logits = runner.forward([seq_id], [[tokens[-1]]])
        assert out.token_ids == tokens
    assert device[0].token_ids != engine.generate_sync(SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                                                       ["Tom had a dog"])[0].token_ids


def test_ctrl_c_inside_thread_start_still_closes_cleanly(stories_artifact, monkeypatch):
    """Ctrl-C can land inside Thread.start() while it waits for the new engine thread to come up (CI saw it
    under load, through runtime.complete): close() must still stop that thread once it runs, not raise
    "cannot join thread before it is started"."""
    start = threading.Thread.start

    def interrupted(thread):
        timer = threading.Timer(0.3, start, args=(thread,))  # the thread comes up after start() was interrupted
        start(timer)
        raise KeyboardInterrupt

    eng = Engine(EngineConfig(model_path=str(stories_artifact), max_num_seqs=2))
    monkeypatch.setattr(threading.Thread, "start", interrupted)
    with pytest.raises(KeyboardInterrupt):
        eng.generate_sync(SamplingParams(max_tokens=2), ["Once"])
    monkeypatch.undo()
    thread = eng._thread  # pylint: disable=protected-access
    eng.close()
    assert thread is not None and not thread.is_alive()
