"""Programmatic dependent launch (PDL) for every CUDA kernel on sm_90+.

A decode step is hundreds of short kernels, each paying its launch, ramp-up and tail. With PDL a kernel
is launched while the previous one in the stream still runs: TVM 0.27's CUDA runtime launches a kernel
with `cuLaunchKernelEx` + `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION` when its launch
parameters carry the tag below, and the kernel itself must then wait (`griddepcontrol.wait`) before it
touches global memory, since it no longer waits at launch. Each kernel here starts with
`griddepcontrol.launch_dependents` (the next kernel's blocks may be scheduled as soon as every block of
this one has started) and then `griddepcontrol.wait` (which returns once the whole previous grid has
finished and its writes are visible), so each kernel still sees all earlier ones, transitively.

Pre-wait section: a kernel may do work before the wait that depends on nothing an earlier kernel writes,
e.g. start streaming the model's weights (constant during a step) while the previous kernel finishes. A
schedule marks that statement with an `AttrStmt` keyed `PRE_WAIT` whose value names the buffers it may read
(`pre_wait_mark`; `sch.annotate(loop, PRE_WAIT, tirx.StringImm("w"))` on a loop lowers to the same
`AttrStmt`). The marked statement must sit at the kernel's top level (under thread extents and buffer
declarations only, not in a loop or branch); the kernel then runs `launch_dependents`, whatever precedes the
mark, the mark, `wait`, the rest. Everything before the wait may read global memory only from the named
buffers and write none (checked here: a mark that breaks it is a compile error). Kernels without a mark
start with `launch_dependents; wait` as before; off sm_90 (or with `--no-pdl`) a mark is left in place and
codegen ignores it, so the marked statement simply runs first.

The pass runs on the device functions after SplitHostDevice, where `tirx.kernel_launch_params` exists.
"""

from __future__ import annotations

import re

import tvm
import tvm_ffi
from tvm import tirx
from tvm.script import tirx as T

LAUNCH_TAG = "tirx.use_programtic_dependent_launch"  # sic: TVM's spelling (src/runtime/metadata.h)
PRE_WAIT = "pragma_kiln_pdl_pre_wait"  # value: the comma-separated names of the buffers it reads
_DYNAMIC_SHARED_TAG = "tirx.use_dyn_shared_memory"  # the runtime requires it to stay the last tag
_KERNEL_LAUNCH = 2  # calling_conv of a __global__ function (CallingConv::kDeviceKernelLaunch)
PDL_TIR_PIPELINE = "kiln-pdl"  # schedules/matmul_tensorcore.py's TIR_PIPELINE, then this pass


def supports_pdl(target: tvm.target.Target) -> bool:
    """PDL needs a CUDA target of compute capability 9.0 or later (griddepcontrol is sm_90+ PTX)."""
    if target.kind.name != "cuda":
        return False
    digits = re.match(r"sm_(\d+)", str(target.attrs.get("arch", "")))
    return digits is not None and int(digits.group(1)) >= 90


def pre_wait_mark(body: tirx.Stmt, reads: list[str], node=None) -> tirx.AttrStmt:
    """`body` marked as the kernel's pre-wait section; `reads`: the names of the (weight) buffers it reads."""
    return tirx.AttrStmt(node if node is not None else tirx.IntImm("int32", 0), PRE_WAIT,
                         tirx.stmt.StringImm(",".join(reads)), body)


def _is_mark(stmt) -> bool:
    return isinstance(stmt, tirx.AttrStmt) and stmt.attr_key == PRE_WAIT


def _marks(stmt) -> int:
    found = []
    tvm_ffi.structural_walk(stmt, [(tirx.AttrStmt, lambda s: found.append(s) if _is_mark(s) else None)])
    return len(found)


def _place_wait(stmt, wait, before: list):
    """`stmt` with `wait` right after its marked statement; what runs before the wait is appended to `before`."""
    if _is_mark(stmt):
        before.append(stmt.body)
        return tirx.SeqStmt([stmt.body, wait]), stmt.value.value
    if isinstance(stmt, tirx.AttrStmt):  # thread extents and the like: the mark is inside
        before.append(stmt.value)
        body, reads = _place_wait(stmt.body, wait, before)
        return tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, body), reads
    if isinstance(stmt, tirx.SeqStmt):
        seq = list(stmt.seq)
        at = next(i for i, s in enumerate(seq) if _marks(s))
        before.extend(seq[:at])
        seq[at], reads = _place_wait(seq[at], wait, before)
        return tirx.SeqStmt(seq), reads
    raise ValueError(f"{PRE_WAIT}: the marked statement must be at the kernel's top level, not under a "
                     f"{type(stmt).__name__} (a loop or branch would run the wait more than once or not at all)")


def _check_pre_wait(before: list, reads: str, kernel: str) -> None:
    """No global store and no global load but of the `reads` buffers before the wait."""
    allowed = set(reads.split(","))

    def check(node):
        buf = node.buffer if isinstance(node, tirx.BufferStore) else node.source
        if buf.scope() != "global":
            return
        if isinstance(node, tirx.BufferStore) or buf.name not in allowed:
            what = "writes" if isinstance(node, tirx.BufferStore) else "reads"
            raise ValueError(f"{kernel}: its pre-wait section {what} global buffer {buf.name!r} before "
                             f"griddepcontrol.wait (it may only read {sorted(allowed)}, written by no kernel)")

    for stmt in before:
        tvm_ffi.structural_walk(stmt, [((tvm.ir.expr.TensorLoad, tirx.BufferStore), check)])  # BufferLoad's class


def _with_pdl(func: tirx.PrimFunc, name: str) -> tirx.PrimFunc:
    tags = [str(t) for t in func.attrs["tirx.kernel_launch_params"]]
    if LAUNCH_TAG in tags:
        return func
    at = len(tags) - 1 if tags and tags[-1] == _DYNAMIC_SHARED_TAG else len(tags)
    trigger, wait = tirx.Evaluate(T.ptx.griddepcontrol.launch_dependents()), tirx.Evaluate(T.ptx.griddepcontrol.wait())
    marks = _marks(func.body)
    if marks > 1:
        raise ValueError(f"{name}: {marks} {PRE_WAIT} marks; a kernel has one pre-wait section at most")
    if marks:
        before = []
        body, reads = _place_wait(func.body, wait, before)
        _check_pre_wait(before, reads, name)
        body = tirx.SeqStmt([trigger, body])
    else:
        body = tirx.SeqStmt([trigger, wait, func.body])
    return func.with_body(body).with_attr("tirx.kernel_launch_params", tags[:at] + [LAUNCH_TAG] + tags[at:])


@tvm.transform.module_pass(opt_level=0, name="ProgrammaticDependentLaunch")
def ProgrammaticDependentLaunch(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
    """Give every sm_90+ kernel of a device module the PDL launch tag, `launch_dependents` first and
    `griddepcontrol.wait` before its first global access (after its pre-wait section, if marked)."""
    for gvar, func in list(mod.functions.items()):
        if (isinstance(func, tirx.PrimFunc) and func.attrs is not None
                and int(func.attrs.get("calling_conv", 0)) == _KERNEL_LAUNCH
                and "tirx.kernel_launch_params" in func.attrs and supports_pdl(func.attrs["target"])):
            mod[gvar] = _with_pdl(func, gvar.name_hint)
    return mod


def _pdl_tir_pipeline():
    """Kiln's TIR pipeline with ProgrammaticDependentLaunch last in the device passes."""
    from .matmul_tensorcore import TIR_PIPELINE  # not at the top: it imports low_batch, which imports this

    main, host, device = tvm.tirx.get_tir_pipeline(TIR_PIPELINE)
    return main, host, lambda: tvm.transform.Sequential([device(), ProgrammaticDependentLaunch])


tvm.tirx.compilation_pipeline.register_tir_pipeline(PDL_TIR_PIPELINE, _pdl_tir_pipeline)
