"""The overlapped step loop (EngineConfig.overlap) against the synchronous one, on stories260K.

Reference: the same requests through an engine with overlap=False (the loop that reads every step's
tokens before launching the next). Greedy outputs, finish reasons, the Deltas each request streams and
the KV pages left must be identical, while the overlapped engine really launches decode steps on tokens
it has not read yet (ModelRunner.decode_next).
"""

from __future__ import annotations

import queue

import pytest

from runtime import Engine, EngineConfig, SamplingParams
from test_engine import OPENINGS, STORY, all_pages_free, prompts32


def run(cfg: EngineConfig, requests: list[tuple[str, SamplingParams]]) -> tuple[list, list, int]:
    """(per request: its Deltas as (index, text, token_ids, finish_reason), grouped by completion, each in
    order; per request: the final (token_ids, text, finish_reason) of each completion; decode steps launched
    on device tokens). How a request's n completions interleave their Deltas is timing: not compared."""
    with Engine(cfg) as eng:
        launched, decode_next = [], eng.runner.decode_next

        def counted(seq_ids, tokens):
            launched.append(len(seq_ids))
            return decode_next(seq_ids, tokens)

        eng.runner.decode_next = counted
        done: queue.Queue = queue.Queue()
        ids = eng.add_requests(requests, done.put, [f"r{i}" for i in range(len(requests))])
        deltas = {rid: [] for rid in ids}
        finals = {}
        while len(finals) < len(ids):
            d = done.get()
            deltas[d.request_id].append((d.index, d.text, d.token_ids, d.finish_reason))
            if d.output is not None:
                finals[d.request_id] = [(c.token_ids, c.text, c.finish_reason) for c in d.output.outputs]
        assert all_pages_free(eng)  # no page leaked by a token decoded one step too many
        by_completion = [sorted(deltas[i], key=lambda delta: delta[0]) for i in ids]  # stable: order kept
        return by_completion, [finals[i] for i in ids], len(launched)


def mixed_requests(batch: int) -> list[tuple[str, SamplingParams]]:
    """`batch` prompts of different lengths, greedy, ending at different steps: by max_tokens, by a stop
    string, by EOS (ignore_eos off), with and without streaming hold-back."""
    out = []
    for i in range(batch):
        prompt = (STORY * (i % 3) if i % 4 == 1 else "") + OPENINGS[i % len(OPENINGS)]
        params = SamplingParams(temperature=0, max_tokens=5 + 7 * i, stop=[[], ["."], [" the", "was"], ["!"]][i % 4],
                                ignore_eos=i % 5 == 2)
        out.append((prompt, params))
    return out


@pytest.mark.parametrize("batch", [1, 3, 12])
def test_overlap_streams_the_same_greedy_outputs(stories_artifact, batch):
    requests = mixed_requests(batch)
    cfg = dict(model_path=str(stories_artifact), max_num_seqs=16)
    want_deltas, want, sync_launched = run(EngineConfig(**cfg, overlap=False), requests)
    got_deltas, got, launched = run(EngineConfig(**cfg, overlap=True), requests)
    assert sync_launched == 0 and launched > 0
    assert got == want
    assert got_deltas == want_deltas
    reasons = {c[2] for r in want for c in r}
    if batch == 12:  # the batch really ends in every way, at different steps
        assert reasons == {"length", "stop"}
        assert len({len(r[0][0]) for r in want}) > 6


def test_overlap_under_preemption_matches_the_sync_loop(stories_artifact):
    """32 requests in a KV cache for about 4: sequences are preempted and recomputed in both loops."""
    cfg = dict(model_path=str(stories_artifact), kv_tokens=28 * 16, max_num_seqs=32, max_num_batched_tokens=64)
    requests = [(p, SamplingParams(temperature=0, max_tokens=48)) for p in prompts32()]
    want_deltas, want, _ = run(EngineConfig(**cfg, overlap=False), requests)
    got_deltas, got, launched = run(EngineConfig(**cfg, overlap=True), requests)
    assert launched > 0
    assert got == want and got_deltas == want_deltas


def test_overlap_stops_at_max_model_len_and_serves_sampled_rows_in_step(stories_artifact):
    """A sequence ends at the context limit one step before the overlapped loop learns it; sampled,
    penalized and logprob rows (which run synchronously) in the same engine give the same results."""
    cfg = dict(model_path=str(stories_artifact), max_num_seqs=8, max_model_len=48)
    requests = [("Tom had a dog", SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)),
                (STORY[:90], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)),
                ("The sun was hot", SamplingParams(temperature=0.8, seed=3, max_tokens=20)),
                ("A bird sang", SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.3)),
                ("Mom said no", SamplingParams(temperature=0, max_tokens=12, logprobs=True, top_logprobs=2))]
    want_deltas, want, _ = run(EngineConfig(**cfg, overlap=False), requests)
    got_deltas, got, launched = run(EngineConfig(**cfg, overlap=True), requests[:2])
    assert launched > 0
    assert got == want[:2] and got_deltas == want_deltas[:2]
    assert [r[0][2] for r in want[:2]] == ["length", "length"]
    _, mixed, _ = run(EngineConfig(**cfg, overlap=True), requests)
    assert mixed == want


def test_overlap_draws_the_same_seeded_samples(stories_artifact):
    """Rows that all sample (temperature, top-p, top-k, min-p) leave their drawn tokens on the device too:
    each sequence takes one random number a step in both loops, so seeded outputs are identical (on the
    CPU, whose kernels give a row the same logits at any batch size; tests/gpu/test_engine.py for CUDA)."""
    kinds = [dict(temperature=0.8), dict(temperature=1.0, top_p=0.9), dict(temperature=0.7, top_k=20),
             dict(temperature=1.2, min_p=0.05)]
    requests = [(OPENINGS[i % len(OPENINGS)],
                 SamplingParams(seed=i, max_tokens=8 + 5 * i, stop=["!"] if i % 3 else None, **kinds[i % 4]))
                for i in range(6)]
    requests.append(("Ben and Mia", SamplingParams(temperature=0.9, seed=7, n=2, max_tokens=20)))
    cfg = dict(model_path=str(stories_artifact), max_num_seqs=16)
    want_deltas, want, _ = run(EngineConfig(**cfg, overlap=False), requests)
    got_deltas, got, launched = run(EngineConfig(**cfg, overlap=True), requests)
    assert launched > 0
    assert got == want and got_deltas == want_deltas


def test_kv_cache_streams_sit_where_the_runner_looks(stories_artifact):
    """ModelRunner orders the KV cache's page-table copies on the GPU through the cache's private copy
    stream, found in the object's memory (model_runner.kv_copy_stream): the pinned TVM's object must hold
    its device followed by its three stream handles (null on the CPU), inside the object (1.8 KB in TVM 0.27)."""
    import struct

    from runtime.model_runner import _KV_SCAN_BYTES, ModelRunner, object_bytes

    runner = ModelRunner(stories_artifact, kv_tokens=1024)
    data = object_bytes(runner.kv, _KV_SCAN_BYTES)
    fields = struct.pack("<iiQQQ", 1, 0, 0, 0, 0)  # Device{kDLCPU, 0}, compute, copy and transfer streams
    found = [at for at in range(0, len(data) - len(fields) + 1, 8) if data[at:at + len(fields)] == fields]
    assert len(data) == _KV_SCAN_BYTES and found and found[0] < 2048, found
