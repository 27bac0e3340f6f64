"""The kernels one decoder layer launches per decode step, counted statically from the compiled Relax (no GPU).

    python bench/decode_kernels.py [--model qwen3] [--target cuda] [--quant q4k] [--fuse-norms]

Runs Kiln's Relax pipeline (schedules/pipeline.py) on the model's `decode` with one and with two layers,
up to the point where kernels are still `call_tir`s (less the scheduling passes, which take most of the
time and change no call), and lists what the second layer adds: every
`call_tir` that is not a reshape (those become views) plus, for each paged-KV-cache attention call, the
kernels TVM's runtime launches for it (RoPE, K/V append, and the decode attention's kernels).
A PrimFunc may hold more than one kernel (on main before issue 12's q/k-norm, the profile saw 17 a
Qwen3 layer against 15 listed), so bench/decode_profile.py's launches on the GPU are the final word;
this count is what tests guard.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tvm  # noqa: E402
import tvm_ffi  # noqa: E402
from tvm import relax  # noqa: E402

from compile import targets  # noqa: E402
from compile.presets import resolve  # noqa: E402
from compile.quant_plan import plan_quantize, quant_type_of  # noqa: E402
from model_defs.config import ModelConfig  # noqa: E402
from model_defs.spec import build_model, export  # noqa: E402
from schedules.attention.choice import paged_kv_kernels  # noqa: E402
from schedules.pipeline import _passes  # noqa: E402

SCHEDULING = ("KilnScheduleNormGEMV", "KilnScheduleSwiGLUGEMV", "KilnLowBatchDispatch", "ApplyDefaultSchedule")  # schedule PrimFuncs, never change the calls: skipped
ATTENTION_CALL = "vm.builtin.attention_kv_cache_attention_with_fused_qkv"
# What paged_kv_cache.cc launches for one decode attention call: RoPE, the K/V append, then the decode
# kernel's kernels (Kiln's split-KV decode: one on CUDA, whose last split block merges; two on Metal)
ATTENTION_KERNELS = ("rope (tir_split_rotary)", "kv append (kv_cache_transpose_append)")


def kernels_in(func: tvm.tirx.PrimFunc) -> int:
    """Kernels a scheduled TIR PrimFunc launches: its loops bound to blockIdx.x (one a kernel)."""
    found = []
    tvm_ffi.structural_walk(func.body, [(tvm.tirx.For, lambda f: found.append(f) if f.thread_binding is not None
                                         and f.thread_binding.thread_tag == "blockIdx.x" else None)])
    return len(found)


def decode_kernels(config: dict, target: str = "cuda", dtype: str = "bfloat16", quant: str | None = None,
                   fuse_norms: bool = False) -> list[str]:
    """Names of the kernels `decode` launches over the whole model described by `config`, in order
    (`fuse_norms`: compiled with `python -m compile --fuse_norms`)."""
    cfg = ModelConfig.from_dict(config, "decode_kernels")
    tvm_target = targets.tvm_target(target, targets.DEFAULT_CUDA_ARCH)
    kv = paged_kv_kernels(tvm_target, cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim, dtype)
    plan = None
    if quant:
        float_params = [(n, tuple(int(d) for d in p.shape)) for n, p in build_model(cfg, dtype, None).named_parameters()]
        plan = plan_quantize(quant_type_of(quant), float_params, cfg)
    mod, _ = export(cfg, dtype, tvm_target, 256, 1024, kv, plan.types if plan else None)
    passes = _passes(tvm_target, fuse_norms)
    up_to = next(i for i, p in enumerate(passes) if p.info.name == "ToNonDataflow")  # views rewritten, still call_tir
    passes = [p for p in passes[:up_to] if p.info.name not in SCHEDULING]
    config = {"relax.backend.use_cuda_graph": target == "cuda", "tirx.disable_cse_tir": target != "cpu"}
    with tvm.transform.PassContext(opt_level=3, config=config), tvm_target:
        mod = tvm.transform.Sequential(passes)(mod)
    # TVM's own decode (no Kiln kernels): one kernel
    attention = ATTENTION_KERNELS + ("attention decode",) * (kernels_in(kv["decode"]) if kv else 1)
    names = []

    def visit(expr):
        if not isinstance(expr, relax.Call):
            return
        callee = expr.args[0] if expr.args else None
        if isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.call_tir":
            names.append(callee.name_hint)
        elif isinstance(callee, relax.ExternFunc) and callee.global_symbol == ATTENTION_CALL:  # call_dps_packed
            names.extend(attention)

    relax.analysis.post_order_visit(mod["decode"], visit)
    return names


def layer_kernels(config: dict, target: str = "cuda", dtype: str = "bfloat16", quant: str | None = None,
                  fuse_norms: bool = False) -> list[str]:
    """The kernels one decoder layer adds to `decode`, in launch order: the stretch of the two-layer model's
    list where it departs from the one-layer model's (a layer, possibly rotated by a kernel it shares
    with what follows the stack, such as the final RMSNorm)."""
    one = decode_kernels({**config, "num_hidden_layers": 1}, target, dtype, quant, fuse_norms)
    two = decode_kernels({**config, "num_hidden_layers": 2}, target, dtype, quant, fuse_norms)
    per_layer = len(two) - len(one)
    same = next((i for i, (a, b) in enumerate(zip(one, two)) if a != b), len(one))
    start = min(same, len(two) - per_layer)
    return two[start:start + per_layer]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3")
    ap.add_argument("--target", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quant", default=None)
    ap.add_argument("--fuse-norms", action="store_true", help="each RMSNorm folded into the GEMV after it")
    a = ap.parse_args()
    _, config, _ = resolve(a.model)
    kernels = layer_kernels(config, a.target, a.dtype, a.quant, a.fuse_norms)
    print(f"{a.model} on {a.target}: {len(kernels)} kernels a decoder layer per decode step")
    for name in kernels:
        print(f"    {name}")


if __name__ == "__main__":
    main()
