"""Programmatic dependent launch (PDL) for every CUDA kernel on sm_90+.

A decode step is hundreds of short kernels, each paying its launch, ramp-up and tail. With PDL a kernel
is launched while the previous one in the stream still runs: TVM 0.27's CUDA runtime launches a kernel
with `cuLaunchKernelEx` + `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION` when its launch
parameters carry the tag below, and the kernel itself must then wait (`griddepcontrol.wait`) before it
touches global memory, since it no longer waits at launch. Each kernel here starts with
`griddepcontrol.wait` (which returns once the whole previous grid has finished and its writes are
visible), so each kernel still sees all earlier ones, transitively. `griddepcontrol.launch_dependents`
lets the next kernel's blocks be scheduled (to park in their own wait) as soon as every block of this one
has executed it or exited; where it sits is the pass's `trigger` (TRIGGERS), which changes only when the
next kernel's blocks take SM slots, never what any kernel reads:

  "start"         first, before the wait: the next kernel is resident from this one's start (and, as
                  its own trigger is its first statement, the one after it too, and so on);
  "before_store"  (the default) before the first statement that stores to global memory (a GEMV: after
                  its K loop and cross-thread reduction, before the epilogue; an elementwise kernel: its
                  start);
  "end"           last: the next kernel's blocks come as this one's last blocks finish.

On an H100, QuantGemv's M = 1 kernels back to back: "before_store" and "end" within 1% of each other, both
faster than "start" on the small shapes (Llama-3.1-8B's 4096→1024 6.0 → 3.8 µs, O 7.9 → 7.0 µs), the
Q4_K_M-like step's GEMVs 2.345 → 2.219 ms (bench/RESULTS.md, "PDL's trigger after the K loop").

A kernel that already holds a `griddepcontrol.wait` places its own trigger and wait (the decode attention's
`pdl_prewait`: its page-table reads, which no kernel writes, before the wait); the pass only tags its launch.

The pass runs on the device functions after SplitHostDevice, where `tirx.kernel_launch_params` exists.
"""

from __future__ import annotations

import re

import tvm
import tvm_ffi
from tvm import tirx
from tvm.script import tirx as T

from .matmul_tensorcore import TIR_PIPELINE

LAUNCH_TAG = "tirx.use_programtic_dependent_launch"  # sic: TVM's spelling (src/runtime/metadata.h)
_DYNAMIC_SHARED_TAG = "tirx.use_dyn_shared_memory"  # the runtime requires it to stay the last tag
_KERNEL_LAUNCH = 2  # calling_conv of a __global__ function (CallingConv::kDeviceKernelLaunch)
TRIGGERS = ("start", "before_store", "end")
DEFAULT_TRIGGER = "before_store"
PDL_TIR_PIPELINE = TIR_PIPELINE + "-pdl"  # the default trigger's; pdl_tir_pipeline(trigger) names the others


def supports_pdl(target: tvm.target.Target) -> bool:
    """PDL needs a CUDA target of compute capability 9.0 or later (griddepcontrol is sm_90+ PTX)."""
    if target.kind.name != "cuda":
        return False
    digits = re.match(r"sm_(\d+)", str(target.attrs.get("arch", "")))
    return digits is not None and int(digits.group(1)) >= 90


def pdl_tir_pipeline(trigger: str = DEFAULT_TRIGGER) -> str:
    """The registered TIR pipeline whose kernels put `launch_dependents` at `trigger`."""
    if trigger not in TRIGGERS:
        raise ValueError(f"PDL trigger {trigger!r}: use one of {', '.join(TRIGGERS)}")
    return PDL_TIR_PIPELINE if trigger == DEFAULT_TRIGGER else f"{PDL_TIR_PIPELINE}-{trigger}"


def _stores_global(stmt: tirx.Stmt) -> bool:
    """Whether `stmt` holds a BufferStore to a global buffer (stores by intrinsic calls are not seen)."""
    found = []
    tvm_ffi.structural_walk(stmt, [(tirx.BufferStore, lambda s: found.append(s) if s.buffer.scope() == "global" else None)])
    return bool(found)


def _before_first_store(stmt: tirx.Stmt, trigger: tirx.Stmt) -> tirx.Stmt:
    """`stmt` with `trigger` before its first statement that stores to global memory, at a level every
    thread reaches: through sequences and thread/let/attribute scopes, never into a loop or a branch."""
    if isinstance(stmt, tirx.SeqStmt):
        seq = list(stmt.seq)
        at = next(i for i, s in enumerate(seq) if _stores_global(s))
        return tirx.SeqStmt(seq[:at] + [_before_first_store(seq[at], trigger)] + seq[at + 1:])
    if isinstance(stmt, tirx.AttrStmt):
        return tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, _before_first_store(stmt.body, trigger))
    if isinstance(stmt, tirx.LetStmt):
        return tirx.LetStmt(stmt.var, stmt.value, _before_first_store(stmt.body, trigger))
    return tirx.SeqStmt([trigger, stmt])


def _waits(stmt: tirx.Stmt) -> bool:
    """Whether `stmt` holds a `griddepcontrol.wait` of its own."""
    found = []
    tvm_ffi.structural_walk(stmt, [(tvm.ir.expr.Call, lambda c: found.append(c) if c.op.name == "tirx.ptx.griddepcontrol"
                                    and c.args[0].value == "wait" else None)])
    return bool(found)


def _with_pdl(func: tirx.PrimFunc, trigger: str) -> tirx.PrimFunc:
    tags = [str(t) for t in func.attrs["tirx.kernel_launch_params"]]
    if LAUNCH_TAG in tags:
        return func
    at = len(tags) - 1 if tags and tags[-1] == _DYNAMIC_SHARED_TAG else len(tags)
    launch, wait = (tirx.Evaluate(T.ptx.griddepcontrol.launch_dependents()),
                    tirx.Evaluate(T.ptx.griddepcontrol.wait()))
    if _waits(func.body):
        body = func.body
    elif trigger == "start":
        body = tirx.SeqStmt([launch, wait, func.body])
    elif trigger == "end" or not _stores_global(func.body):
        body = tirx.SeqStmt([wait, func.body, launch])
    else:
        body = tirx.SeqStmt([wait, _before_first_store(func.body, launch)])
    return func.with_body(body).with_attr("tirx.kernel_launch_params", tags[:at] + [LAUNCH_TAG] + tags[at:])


def programmatic_dependent_launch(trigger: str = DEFAULT_TRIGGER) -> tvm.transform.Pass:
    """The pass giving every sm_90+ kernel of a device module the PDL launch tag, `griddepcontrol.wait` first
    and `launch_dependents` at `trigger` (TRIGGERS)."""

    @tvm.transform.module_pass(opt_level=0, name="ProgrammaticDependentLaunch")
    def _pass(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        for gvar, func in list(mod.functions.items()):
            if (isinstance(func, tirx.PrimFunc) and func.attrs is not None
                    and int(func.attrs.get("calling_conv", 0)) == _KERNEL_LAUNCH
                    and "tirx.kernel_launch_params" in func.attrs and supports_pdl(func.attrs["target"])):
                mod[gvar] = _with_pdl(func, trigger)
        return mod

    return _pass


def _register(trigger: str) -> None:
    """Kiln's TIR pipeline with the PDL pass (at `trigger`) last in the device passes, under its name."""

    def pipeline():
        main, host, device = tvm.tirx.get_tir_pipeline(TIR_PIPELINE)
        return main, host, lambda: tvm.transform.Sequential([device(), programmatic_dependent_launch(trigger)])

    tvm.tirx.compilation_pipeline.register_tir_pipeline(pdl_tir_pipeline(trigger), pipeline)


for _trigger in TRIGGERS:
    _register(_trigger)
