"""dlight's Matmul rule without its Metal simdgroup path, which segfaults in TVM 0.27.

Scheduling as for a generic GPU (an `opencl` stand-in target with Metal's thread limit) gives
shared-memory tiled kernels that lower to valid Metal.
"""

import tvm
from tvm.s_tir import dlight as dl


class MatmulNoSimdgroup(dl.gpu.Matmul):
    """`dl.gpu.Matmul`, but Metal targets take the generic-GPU branch."""

    def apply(self, func, target, tunable):
        if target.kind.name == "metal":
            target = tvm.target.Target({"kind": "opencl",
                                        "max_num_threads": int(target.attrs["max_num_threads"])})
        return super().apply(func, target, tunable)
