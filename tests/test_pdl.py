"""Programmatic dependent launch (schedules/pdl.py) reaches every CUDA kernel of a compiled model.

A kernel launched with PDL's launch attribute may start before the previous kernel has finished, so one
that lacks `griddepcontrol.wait` before its first global access would race; and a kernel with the wait
but no launch tag gains nothing. The model is compiled for CUDA without nvcc (the generated source is
what is checked); the device modules are caught as they reach codegen, where their launch parameters
become the runtime's launch configuration. A kernel's marked pre-wait section (weight prefetch) may
precede the wait, and then reads no global buffer but the weights it names and writes none.
"""

import re
import sys

import pytest
import tvm
import yaml
from tvm.script import tirx as T

from compile import driver, targets
from conftest import STORIES_HF
from schedules.pdl import LAUNCH_TAG, PDL_TIR_PIPELINE, PRE_WAIT
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
    """({kernel: launch tags}, {kernel: first two statements of its CUDA body}, CUDA source)."""
    (mod, built), = device
    tags = {gv.name_hint: [str(t) for t in f.attrs["tirx.kernel_launch_params"]]
            for gv, f in mod.functions.items() if int(f.attrs.get("calling_conv", 0)) == 2}
    source = built.inspect_source("cuda")
    bodies = dict(re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\([^;{]*\) \{\n'
                             r'((?:[^\n]*\n){2})', source))
    return tags, bodies, source


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
        assert bodies[name].split() == [_TRIGGER, _WAIT], name  # before any other statement


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


@T.prim_func
def _prefetched_add(w: T.Buffer((256,), "float32"), x: T.Buffer((256,), "float32"), y: T.Buffer((256,), "float32")):
    T.func_attr({"global_symbol": "prefetched_add", "tirx.noalias": True})
    for bx in T.thread_binding(2, thread="blockIdx.x"):
        for tx in T.thread_binding(128, thread="threadIdx.x"):
            for i in T.unroll(2, annotations={PRE_WAIT: "w"}):  # what a schedule's sch.annotate(loop, ...) gives
                T.evaluate(T.ptx.prefetch.global_.L2(T.address_of(w[bx * 128 + i * 64 + tx % 64])))
            y[bx * 128 + tx] = x[bx * 128 + tx] + w[bx * 128 + tx]


def _kernel_lines(func, pipeline) -> tuple[list[str], list[str]]:
    """(statements of the kernel's CUDA body, its pointer parameters) built with `pipeline` for sm_90a."""
    target = targets.tvm_target("cuda", "sm_90a")
    with target:
        lib = tvm.tirx.build(tvm.IRModule({"k": func}), target=target, pipeline=pipeline)
    source = lib.imports[0].inspect_source()
    (params, body), = re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?\w+\(([^;{]*)\) \{\n'
                                 r'(.*?)\n\}', source, re.S)
    return [line.strip() for line in body.splitlines()], re.findall(r"\* __restrict__ (\w+)", params)


def test_pre_wait_section_runs_between_trigger_and_wait():
    lines, params = _kernel_lines(_prefetched_add, PDL_TIR_PIPELINE)
    assert lines[0] == _TRIGGER and lines.count(_WAIT) == 1 and lines.count(_TRIGGER) == 1
    wait = lines.index(_WAIT)
    before, after = " ".join(lines[1:wait]), " ".join(lines[wait:])
    assert before.count("prefetch_global_L2") == 2 and "prefetch" not in after
    assert set(params) == {"w_ptr", "x_ptr", "y_ptr"}
    assert [p for p in params if p in before] == ["w_ptr"]  # no activation read, no output written
    assert "x_ptr" in after and "y_ptr[" in after


def test_pre_wait_mark_without_pdl_is_just_the_first_statement():
    lines, _ = _kernel_lines(_prefetched_add, tir_pipeline(targets.tvm_target("cuda", "sm_90a"), pdl=False))
    assert "griddepcontrol" not in " ".join(lines) and "prefetch_global_L2" in lines[0]


@T.prim_func
def _reads_activation_early(w: T.Buffer((256,), "float32"), x: T.Buffer((256,), "float32"),
                            y: T.Buffer((256,), "float32")):
    T.func_attr({"global_symbol": "early_x", "tirx.noalias": True})
    for bx in T.thread_binding(2, thread="blockIdx.x"):
        for tx in T.thread_binding(128, thread="threadIdx.x"):
            for i in T.unroll(2, annotations={PRE_WAIT: "w"}):
                T.evaluate(T.ptx.prefetch.global_.L2(T.address_of(x[bx * 128 + i * 64 + tx % 64])))
            y[bx * 128 + tx] = x[bx * 128 + tx] + w[bx * 128 + tx]


@T.prim_func
def _writes_early(w: T.Buffer((256,), "float32"), x: T.Buffer((256,), "float32"), y: T.Buffer((256,), "float32")):
    T.func_attr({"global_symbol": "early_y", "tirx.noalias": True})
    for bx in T.thread_binding(2, thread="blockIdx.x"):
        for tx in T.thread_binding(128, thread="threadIdx.x"):
            for i in T.unroll(2, annotations={PRE_WAIT: "w"}):
                y[bx * 128 + i * 64 + tx % 64] = w[bx * 128 + i * 64 + tx % 64]
            y[bx * 128 + tx] = x[bx * 128 + tx] + w[bx * 128 + tx]


@T.prim_func
def _mark_in_a_loop(w: T.Buffer((256,), "float32"), x: T.Buffer((256,), "float32"), y: T.Buffer((256,), "float32")):
    T.func_attr({"global_symbol": "mark_in_loop", "tirx.noalias": True})
    for bx in T.thread_binding(2, thread="blockIdx.x"):
        for tx in T.thread_binding(64, thread="threadIdx.x"):
            for j in range(2):
                for i in T.unroll(2, annotations={PRE_WAIT: "w"}):
                    T.evaluate(T.ptx.prefetch.global_.L2(T.address_of(w[bx * 128 + i * 64 + tx])))
                y[bx * 128 + j * 64 + tx] = x[bx * 128 + j * 64 + tx] + w[bx * 128 + j * 64 + tx]


@pytest.mark.parametrize("func,error", [(_reads_activation_early, "reads global buffer 'x'"),
                                        (_writes_early, "writes global buffer 'y'"),
                                        (_mark_in_a_loop, "top level")])
def test_pre_wait_section_may_touch_only_the_named_weights(func, error):
    with pytest.raises(ValueError, match=error):
        _kernel_lines(func, PDL_TIR_PIPELINE)
