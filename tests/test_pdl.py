"""Programmatic dependent launch (schedules/pdl.py) reaches every CUDA kernel of a compiled model.

A kernel launched with PDL's launch attribute may start before the previous kernel has finished, so one
that lacks `griddepcontrol.wait` before its first global access would race; and a kernel with the wait
but no launch tag gains nothing. The model is compiled for CUDA without nvcc (the generated source is
what is checked); the device modules are caught as they reach codegen, where their launch parameters
become the runtime's launch configuration.
"""

import os
import re
import sys

import pytest
import tvm
import yaml
from tvm.script import tirx as T

from compile import driver, targets
from conftest import STORIES_HF
from schedules.pdl import DEFAULT_TRIGGER, LAUNCH_TAG, TRIGGERS, pdl_tir_pipeline
from schedules.pipeline import tir_pipeline

_TRIGGER = "tvm_builtin_ptx_griddepcontrol_launch_dependents();"
_WAIT = "tvm_builtin_ptx_griddepcontrol_wait();"


def _record_device_modules(monkeypatch) -> list:
    """(device module, built module) of every CUDA codegen from now on: the launch tags and the source."""
    tirx_build = sys.modules["tvm.tirx.build"]
    codegen, device = tirx_build.codegen_build, []

    def recording_codegen(mod, target):
        built = codegen(mod, target)
        if target.kind.name == "cuda":
            device.append((mod, built))
        return built

    monkeypatch.setattr(tirx_build, "codegen_build", recording_codegen)
    return device


def _kernels(device: list) -> tuple[dict, dict, str]:
    """({kernel: launch tags}, {kernel: its CUDA body}, CUDA source)."""
    (mod, built), = device
    tags = {gv.name_hint: [str(t) for t in f.attrs["tirx.kernel_launch_params"]]
            for gv, f in mod.functions.items() if int(f.attrs.get("calling_conv", 0)) == 2}
    source = built.inspect_source("cuda")
    bodies = dict(re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\([^;{]*\) \{\n'
                             r'(.*?)\n\}\n', source, re.S))
    return tags, bodies, source


def _statements(body: str) -> list[str]:
    return [line.strip() for line in body.splitlines() if line.strip() and line.strip() != "}"]


def test_every_kernel_waits_and_is_launched_with_pdl(tmp_path, monkeypatch):
    monkeypatch.setattr(driver, "enable_cuda_binaries", lambda arch: False)  # the source is what is checked
    device = _record_device_modules(monkeypatch)
    art = driver.compile_artifact(model=str(STORIES_HF), target="cuda", dtype="float16", out=str(tmp_path / "pdl"),
                                  weights=None, cuda_arch=None, context=256, page_size=16, prefill_chunk=64,
                                  max_batch=4)
    assert yaml.safe_load((art / "kiln.yaml").read_text())["cuda_pdl"] is True
    tags, bodies, _ = _kernels(device)
    assert len(tags) > 20 and set(bodies) == set(tags)  # attention, RoPE/append, norms, GEMV, sampling...
    for name, kernel_tags in tags.items():
        assert LAUNCH_TAG in kernel_tags, name
        assert "tirx.use_dyn_shared_memory" not in kernel_tags[:-1], name  # the runtime reads it last
        first = _statements(bodies[name])
        # the wait before any statement but the trigger; the trigger exactly once
        assert first[:2] == [_TRIGGER, _WAIT] or first[0] == _WAIT, name
        assert bodies[name].count(_TRIGGER) == 1, name


@T.prim_func
def _add_one(a: T.Buffer((256,), "float32"), b: T.Buffer((256,), "float32")):
    T.func_attr({"global_symbol": "add_one", "tirx.noalias": True})
    for bx in T.thread_binding(2, thread="blockIdx.x"):
        for tx in T.thread_binding(128, thread="threadIdx.x"):
            b[bx * 128 + tx] = a[bx * 128 + tx] + T.float32(1)


@pytest.mark.parametrize("pdl", [True, False])
def test_no_pdl_pipeline_has_neither_tag_nor_wait(monkeypatch, pdl):
    """`--no-pdl` (tir_pipeline(target, pdl=False)) on an sm_90 target: a kernel keeps its plain launch."""
    target = targets.tvm_target("cuda", "sm_90a")
    device = _record_device_modules(monkeypatch)
    tvm.tirx.build(tvm.IRModule({"add_one": _add_one}), target=target, pipeline=tir_pipeline(target, pdl))
    tags, _, source = _kernels(device)
    assert (LAUNCH_TAG in tags["add_one_kernel"]) is pdl
    assert ("griddepcontrol" in source) is pdl


@pytest.mark.parametrize("target,pipeline", [
    (targets.tvm_target("cuda", "sm_90a"), "kiln-pdl"), (targets.tvm_target("cuda", "sm_100a"), "kiln-pdl"),
    (targets.tvm_target("cuda", "sm_89"), "kiln"), (targets.tvm_target("cuda", "sm_80"), "kiln"),
    (targets.tvm_target("metal"), "default"), (targets.tvm_target("cpu"), "default")])
def test_pdl_only_for_sm90_and_later(target, pipeline):
    assert tir_pipeline(target) == pipeline
    assert tir_pipeline(target, pdl=False) == ("default" if pipeline == "default" else "kiln")


def test_pdl_pipeline_is_registered():
    assert tvm.tirx.get_tir_pipeline(tir_pipeline(targets.tvm_target("cuda", "sm_90a")))


def _built_kernel(func, trigger: str, monkeypatch) -> str:
    """The CUDA body of `func`'s kernel built for sm_90a with `launch_dependents` at `trigger`."""
    device = _record_device_modules(monkeypatch)
    tvm.tirx.build(tvm.IRModule({"main": func}), target=targets.tvm_target("cuda", "sm_90a"),
                   pipeline=pdl_tir_pipeline(trigger))
    _, bodies, _ = _kernels(device)
    return next(iter(bodies.values()))


@pytest.mark.parametrize("trigger,expected", [("start", [_TRIGGER, _WAIT]), ("before_store", [_WAIT, _TRIGGER])])
def test_trigger_first_in_a_one_statement_kernel(trigger, expected, monkeypatch):
    """An elementwise kernel stores from its first statement: "before_store" triggers at its start, as "start"."""
    assert _statements(_built_kernel(_add_one, trigger, monkeypatch))[:2] == expected


def test_trigger_last_at_end(monkeypatch):
    statements = _statements(_built_kernel(_add_one, "end", monkeypatch))
    assert statements[0] == _WAIT and statements[-1] == _TRIGGER and statements.count(_TRIGGER) == 1


def test_trigger_after_the_gemv_loop(monkeypatch):
    """A GEMV's "before_store" trigger comes after its K loop (every weight and x load) and the cross-thread
    reduction, before the epilogue's global store; the wait stays first."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.quant_gemm import dequant_matmul
    from schedules.quant_gemv import QuantGemv, QuantGemvConfig

    func = QuantGemv(QuantGemvConfig(m_tiles=(1,), lanes=64, row_threads=1, rows_per_thread=2)).kernel(
        dequant_matmul("q4_k", 4096, 64, "bfloat16", "residual", byte_perm=True))
    body = _built_kernel(func.with_attr("global_symbol", "gemv"), "before_store", monkeypatch)
    statements = _statements(body)
    assert statements[0] == _WAIT and body.count(_TRIGGER) == 1
    trigger = body.index(_TRIGGER)
    loads = [m.start() for m in re.finditer(r"(w_q|x)_ptr \+|(w_q|x|w_sc|w_d)_ptr\[", body)]
    stores = [m.start() for m in re.finditer(r"T_add_ptr\[[^\]]*\] =", body)]
    assert loads and stores and max(loads) < trigger < min(stores)
    assert body.rindex("__syncthreads()", 0, min(stores)) < trigger  # after the reduction too


def test_every_trigger_has_a_pipeline():
    assert {pdl_tir_pipeline(t) for t in TRIGGERS} == {f"kiln-pdl{'' if t == DEFAULT_TRIGGER else '-' + t}"
                                                       for t in TRIGGERS}
    assert all(tvm.tirx.get_tir_pipeline(pdl_tir_pipeline(t)) for t in TRIGGERS)
    with pytest.raises(ValueError, match="before_store"):
        pdl_tir_pipeline("middle")


@T.prim_func
def _own_wait(a: T.Buffer((256,), "float32"), n: T.Buffer((1,), "int32"), b: T.Buffer((256,), "float32")):
    T.func_attr({"global_symbol": "own_wait", "tirx.noalias": True})
    for bx in T.thread_binding(2, thread="blockIdx.x"):
        for tx in T.thread_binding(128, thread="threadIdx.x"):
            T.evaluate(T.ptx.griddepcontrol.launch_dependents())
            if tx < n[0]:  # read before the wait: no kernel writes n
                T.evaluate(T.ptx.griddepcontrol.wait())
                b[bx * 128 + tx] = a[bx * 128 + tx] + T.float32(1)


def test_a_kernel_with_its_own_wait_is_only_tagged(monkeypatch):
    """A kernel that places its own trigger and wait (the decode attention's page tables before the wait) keeps
    them where they are: the pass adds the launch tag, no second wait or trigger."""
    device = _record_device_modules(monkeypatch)
    tvm.tirx.build(tvm.IRModule({"main": _own_wait}), target=targets.tvm_target("cuda", "sm_90a"),
                   pipeline=pdl_tir_pipeline())
    tags, bodies, _ = _kernels(device)
    body = next(iter(bodies.values()))
    assert LAUNCH_TAG in next(iter(tags.values()))
    assert body.count(_WAIT) == 1 and body.count(_TRIGGER) == 1
    assert _statements(body)[0] == _TRIGGER and body.index("n_ptr[0]") < body.index(_WAIT) < body.index("b_ptr[")
