"""Kiln's paged-attention kernels on the GPU against float32 torch attention (bench/attention.py's cases):
split-KV decode, the wgmma (sm_90a) and mma.sync prefills, ragged and over pages, at the presets' head
shapes and GQA ratios 1-8; pages ending mid-page, empty sequences, NaN-poisoned outputs and unused slots."""

from __future__ import annotations

import pytest

from bench.attention import Bench

from .conftest import load_module
from .shapes import ATTENTION_SHAPES, attention_file

RAGGED = ([1, 37, 300, 16], [1000, 130, 64, 65], [64, 0, 3], [2048])
PAGED = ([(5, 100), (64, 1000), (1, 17), (200, 33), (3, 0)], [(16, 16), (1, 4096), (128, 129)])


@pytest.fixture(scope="module", params=ATTENTION_SHAPES, ids=lambda s: "q{}_kv{}_d{}".format(*s))
def bench(request, build_dir):
    h_qo, h_kv, d = request.param
    mod = load_module(build_dir / "attention" / attention_file(h_qo, h_kv, d))
    return Bench(mod, None, [], shape=request.param)


def _prefills(bench, kind):
    return [f"kiln_prefill_{kind}"] * (bench.d == 128) + [f"kiln_prefill_{kind}_fa2"]


@pytest.mark.parametrize("lens", Bench.DECODE_CHECKS, ids=str)
def test_split_kv_decode(bench, lens):
    ok, _ = bench.decode_case("kiln_decode_paged_kv", lens, check_only=True)
    assert ok, bench.checks[-1]


@pytest.mark.parametrize("lens", RAGGED, ids=str)
def test_ragged_prefill(bench, lens):
    for name in _prefills(bench, "ragged"):
        ok, _ = bench.ragged_case(name, lens, check_only=True)
        assert ok, bench.checks[-1]


@pytest.mark.parametrize("cases", PAGED, ids=str)
def test_prefill_over_pages(bench, cases):
    for name in _prefills(bench, "paged"):
        assert bench.paged_case(name, cases), bench.checks[-1]
