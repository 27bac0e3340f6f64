"""The runtime on the GPU over Kiln's own kernels (head_dim 128: wgmma prefill, split-KV decode, GEMMs):
decode replayed as CUDA graphs while the batch changes size, and the engine preempting and forking
cached prefixes; every token checked against transformers (fp32, same bf16-rounded weights)."""

from __future__ import annotations

import numpy as np
import pytest

from .shapes import ENGINE_MODEL

REL = 2e-2  # logits, relative to transformers: bf16 weights and activations


@pytest.fixture(scope="module")
def model(build_dir):
    import torch
    import transformers

    art = build_dir / "models" / f"art-{ENGINE_MODEL}"
    ref = transformers.AutoModelForCausalLM.from_pretrained(art.parent / f"hf-{ENGINE_MODEL}", dtype=torch.bfloat16)
    return art, ref.float().cuda().eval()


def reference_logits(ref, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return ref(torch.tensor([ids], device="cuda")).logits[0].cpu().numpy()


def reference_greedy(ref, prompt: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def assert_greedy(ref, prompt: list[int], tokens: list[int]) -> None:
    """Each token is the argmax of transformers' logits along the sequence, or within bf16 noise of it
    (a near-tie); a wrong kernel picks tokens a whole logit spread away."""
    want = reference_logits(ref, prompt + tokens)[len(prompt) - 1:len(prompt) - 1 + len(tokens)]
    gaps = [float(w.max() - w[t]) / float(w.std()) for w, t in zip(want, tokens)]
    assert max(gaps) < 0.1, gaps


def test_cuda_graph_decode_across_changing_batch_sizes(model):
    """Eight sequences prefilled together (ragged), then decode steps over subsets of sizes 8, 3, 1, 5...
    and back: each size's captured graph replayed with other sequences, positions and pages."""
    from runtime.model_runner import ModelRunner

    art, ref = model
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 256, int(n)).tolist() for n in rng.integers(5, 300, 8)]
    paths = [p + reference_greedy(ref, p, 12) for p in prompts]
    wants = [reference_logits(ref, path) for path in paths]
    runner = ModelRunner(art, kv_tokens=8192)
    for i in range(8):
        runner.add_sequence(i)
    got = runner.forward(list(range(8)), prompts)
    errors = [rel(got[i], wants[i][len(prompts[i]) - 1]) for i in range(8)]
    pos = [len(p) for p in prompts]
    for subset in ([*range(8)], [1, 4, 6], [*range(8)], [5], [0, 2, 3, 5, 7], [1, 4, 6], [5], [*range(8)], [6, 7]):
        got = runner.forward(subset, [[paths[i][pos[i]]] for i in subset])
        errors += [rel(got[r], wants[i][pos[i]]) for r, i in enumerate(subset)]
        for i in subset:
            pos[i] += 1
    assert max(errors) < REL, max(errors)


def test_engine_preempts_and_forks_prefixes_and_stays_greedy(model):
    """Twelve prompts sharing prefixes in a cache for about two: preemption and prefix forks happen, every
    request finishes, every page comes back, and every token is greedy under transformers."""
    from runtime.engine import Engine, EngineConfig
    from runtime.sampling import SamplingParams

    art, ref = model
    rng = np.random.default_rng(1)
    shared = rng.integers(3, 256, 100).tolist()
    prompts = [shared[:rng.integers(40, 100)] + rng.integers(3, 256, rng.integers(1, 40)).tolist() for _ in range(12)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    cfg = EngineConfig(model_path=str(art), kv_tokens=24 * 16, max_num_seqs=12, max_num_batched_tokens=96)
    with Engine(cfg) as eng:
        forks = []
        fork = eng.runner.fork_sequence
        eng.runner.fork_sequence = lambda *a, **k: (forks.append(a), fork(*a, **k))[1]
        outs = eng.generate_sync(params, prompts[:1]) + eng.generate_sync(params, prompts[1:])
        assert eng.scheduler.num_preemptions > 0 and forks
        eng.scheduler.clear_cache()
        assert eng.runner.free_pages() == eng.runner.total_pages
    for prompt, out in zip(prompts, outs):
        assert len(out.token_ids) == 32
        assert_greedy(ref, prompt, out.token_ids)


def test_page_table_copies_wait_on_the_gpu_not_on_the_host(model):
    """ModelRunner finds the KV cache's private copy stream (model_runner.kv_copy_stream): decode steps
    launched behind a long kernel return before it ends (the host does not wait for the last forward),
    the next step's page-table copy waits on the GPU instead, and the tokens equal those of steps run one
    at a time."""
    import ctypes

    import torch

    from runtime.cudart import cudart, is_nonblocking_stream
    from runtime.model_runner import ModelRunner

    art, _ = model
    runner = ModelRunner(art, kv_tokens=8192)
    assert runner._copy_stream is not None and is_nonblocking_stream(runner._copy_stream)
    prompt = np.random.default_rng(3).integers(3, 256, 40).tolist()
    for seq in (0, 1):
        runner.add_sequence(seq)
    one_at_a_time = [int(runner.forward([0], [prompt]).argmax())]
    for _ in range(3):
        one_at_a_time.append(int(runner.forward([0], [[one_at_a_time[-1]]]).argmax()))
    tokens = runner.greedy(runner.forward([1], [prompt], on_device=True))
    torch.cuda.synchronize()
    torch.cuda._sleep(400_000_000)  # ~0.2 s on the stream the runner launches on (both the default stream)
    spin = torch.cuda.Event()
    spin.record()
    steps = [tokens]
    for _ in range(2):  # a third would wait for the first's page-table copy, queued behind the spin kernel
        steps.append(runner.greedy(runner.decode_next([1], steps[-1])))
    spinning = not spin.query()
    copy_waits = cudart().cudaStreamQuery(ctypes.c_void_p(runner._copy_stream)) == 600  # cudaErrorNotReady
    assert spinning and copy_waits
    steps.append(runner.greedy(runner.decode_next([1], steps[-1])))
    assert [int(t.host()[0]) for t in steps] == one_at_a_time


@pytest.mark.parametrize("sampled", [False, True])
def test_overlapped_loop_equals_the_synchronous_one(model, sampled):
    """EngineConfig.overlap launches step N+1 on step N's tokens, on the device, before the host reads
    them (and TVM copies step N+1's page tables while step N may still run): the same tokens, greedy or
    seeded draws, as the loop that reads every step first. Greedy sequences end at different steps; drawn
    ones all at the same step: after a sequence ends, the overlapped loop computes it one step longer, so
    its batches are a row larger for a step, which picks other kernels (GEMV buckets, split-K) and so other
    roundings of the same logits, and a near-flat draw of this tiny model may flip there while an argmax
    does not (H100, 2026-12-06: with every draw ending together the loops were identical; with ends at
    4-47 tokens one token of 16 × 4-47 parted, after the batches had differed; bench/RESULTS.md)."""
    import queue

    from runtime.engine import Engine, EngineConfig
    from runtime.sampling import SamplingParams

    art, ref = model
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 256, int(n)).tolist() for n in rng.integers(5, 200, 16)]
    ends = [24] * 16 if sampled else rng.integers(4, 48, 16)
    params = [SamplingParams(temperature=0.8 if sampled else 0, top_p=0.9, seed=i, max_tokens=int(m), ignore_eos=True)
              for i, m in enumerate(ends)]
    outs = {}
    for overlap in (False, True):
        with Engine(EngineConfig(model_path=str(art), kv_tokens=8192, max_num_seqs=16, overlap=overlap)) as eng:
            done: queue.Queue = queue.Queue()
            ids = eng.add_requests(list(zip(prompts, params)), done.put)  # admitted together: batches not timing-bound
            finals = {}
            while len(finals) < len(ids):
                delta = done.get()
                if delta.output is not None:
                    finals[delta.request_id] = delta.output.token_ids
            outs[overlap] = [finals[i] for i in ids]
            eng.scheduler.clear_cache()
            assert eng.runner.free_pages() == eng.runner.total_pages
    assert outs[True] == outs[False]
    assert [len(t) for t in outs[True]] == [p.max_tokens for p in params]
    if not sampled:
        for prompt, tokens in zip(prompts[:4], outs[True][:4]):
            assert_greedy(ref, prompt, tokens)
