"""Rewrite some Relax functions of a module whose rewrites add PrimFuncs: the shared frame of the decode fusions.

Each decode fusion pass (quant_fusion.py's few-row rewrite, norm_gemv.py's, swiglu_gemv.py's) rewrites only the
functions it is given (`decode`, `logits`: few rows) and adds a PrimFunc per new call; adding them all through
one BlockBuilder over the module names each PrimFunc once and keeps the other functions as they were.
"""

from __future__ import annotations

from typing import Callable

from tvm import relax
from tvm.ir import IRModule


def rewrite_functions(mod: IRModule, functions: tuple[str, ...],
                      rewrite: Callable[[relax.Function, relax.BlockBuilder], relax.Function]) -> IRModule:
    """`mod` with each Relax function named in `functions` replaced by rewrite(function, builder) and the
    PrimFuncs the rewrites added to `builder`; unused bindings and functions are left to the caller."""
    builder = relax.BlockBuilder(IRModule(dict(mod.functions), attrs=mod.attrs))
    rewritten = {gv.name_hint: rewrite(func, builder) for gv, func in mod.functions.items()
                 if gv.name_hint in functions and isinstance(func, relax.Function)}
    out = builder.get()
    for name, func in rewritten.items():
        if not func.same_as(mod[name]):
            out.update_func(out.get_global_var(name), func)
    return out
