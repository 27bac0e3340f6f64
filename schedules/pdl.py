"""Programmatic dependent launch (PDL) for every CUDA kernel on sm_90+.

A decode step is hundreds of short kernels, each paying its launch, ramp-up and tail. With PDL a kernel
is launched while the previous one in the stream still runs: TVM 0.27's CUDA runtime launches a kernel
with `cuLaunchKernelEx` + `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION` when its launch
parameters carry the tag below, and the kernel itself must then wait (`griddepcontrol.wait`) before it
touches global memory, since it no longer waits at launch. Each kernel here starts with
`griddepcontrol.launch_dependents` (the next kernel's blocks may be scheduled as soon as every block of
this one has started) and then `griddepcontrol.wait` (which returns once the whole previous grid has
finished and its writes are visible), so each kernel still sees all earlier ones, transitively.

The pass runs on the device functions after SplitHostDevice, where `tirx.kernel_launch_params` exists.
"""

from __future__ import annotations

import re

import tvm
from tvm import tirx
from tvm.script import tirx as T

from .matmul_tensorcore import TIR_PIPELINE

LAUNCH_TAG = "tirx.use_programtic_dependent_launch"  # sic: TVM's spelling (src/runtime/metadata.h)
_DYNAMIC_SHARED_TAG = "tirx.use_dyn_shared_memory"  # the runtime requires it to stay the last tag
_KERNEL_LAUNCH = 2  # calling_conv of a __global__ function (CallingConv::kDeviceKernelLaunch)
PDL_TIR_PIPELINE = TIR_PIPELINE + "-pdl"


def supports_pdl(target: tvm.target.Target) -> bool:
    """PDL needs a CUDA target of compute capability 9.0 or later (griddepcontrol is sm_90+ PTX)."""
    if target.kind.name != "cuda":
        return False
    digits = re.match(r"sm_(\d+)", str(target.attrs.get("arch", "")))
    return digits is not None and int(digits.group(1)) >= 90


def _with_pdl(func: tirx.PrimFunc) -> tirx.PrimFunc:
    tags = [str(t) for t in func.attrs["tirx.kernel_launch_params"]]
    if LAUNCH_TAG in tags:
        return func
    at = len(tags) - 1 if tags and tags[-1] == _DYNAMIC_SHARED_TAG else len(tags)
    body = tirx.SeqStmt([tirx.Evaluate(T.ptx.griddepcontrol.launch_dependents()),
                         tirx.Evaluate(T.ptx.griddepcontrol.wait()), func.body])
    return func.with_body(body).with_attr("tirx.kernel_launch_params", tags[:at] + [LAUNCH_TAG] + tags[at:])


@tvm.transform.module_pass(opt_level=0, name="ProgrammaticDependentLaunch")
def ProgrammaticDependentLaunch(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
    """Give every sm_90+ kernel of a device module the PDL launch tag and its trigger-then-wait prologue."""
    for gvar, func in list(mod.functions.items()):
        if (isinstance(func, tirx.PrimFunc) and func.attrs is not None
                and int(func.attrs.get("calling_conv", 0)) == _KERNEL_LAUNCH
                and "tirx.kernel_launch_params" in func.attrs and supports_pdl(func.attrs["target"])):
            mod[gvar] = _with_pdl(func)
    return mod


def _pdl_tir_pipeline():
    """Kiln's TIR pipeline with ProgrammaticDependentLaunch last in the device passes."""
    main, host, device = tvm.tirx.get_tir_pipeline(TIR_PIPELINE)
    return main, host, lambda: tvm.transform.Sequential([device(), ProgrammaticDependentLaunch])


tvm.tirx.compilation_pipeline.register_tir_pipeline(PDL_TIR_PIPELINE, _pdl_tir_pipeline)
