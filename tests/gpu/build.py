"""Build everything tests/gpu runs, here (TVM compiler + nvcc for sm_90a; no GPU needed).

    make test-gpu-build        # python tests/gpu/build.py .gpu/test-gpu   (about 10 minutes on 2 cores)

The GPU machine has only the runtime-only TVM, so every kernel is compiled to a CUDA binary here:
  attention/<shape>.so  Kiln's paged-attention kernels per (query heads, KV heads, head_dim)
  gemm/                 bench/gemm.py's library of the mma.sync GEMM (what sm_80 GPUs get) at Llama's shapes
  linear.so             the model's own Linear, through Kiln's relax pipeline (low-batch GEMV dispatch,
                        wgmma GEMM, fused residual and logits epilogues) at the presets' real shapes
  models/               bench/gpu_parity.py's tiny random models compiled for CUDA in bf16 (+ stories260K)
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from tests.gpu.shapes import (ATTENTION_SHAPES, ENGINE_MODEL, LINEAR_MAX_ROWS, LINEAR_SHAPES,  # noqa: E402
                              attention_file, linear_name)

ARCH = "sm_90a"


def _target():
    from compile.targets import tvm_target

    return tvm_target("cuda", ARCH)  # what `python -m compile --target cuda` uses


def build_attention(out: Path) -> None:
    """Each shape's decode and prefill kernels, as the KV cache gets them plus the other prefill form."""
    import tvm

    from schedules.attention import prefill_hopper_kernel, prefill_kernel
    from schedules.attention.choice import paged_kv_kernels

    target = _target()
    out.mkdir(parents=True, exist_ok=True)
    for h_qo, h_kv, d in ATTENTION_SHAPES:
        shape = (h_kv, h_qo, d, "bfloat16")
        funcs = {"kiln_decode_paged_kv": paged_kv_kernels(target, h_kv, h_qo, d, "bfloat16")["decode"]}
        for kind in ("ragged", "paged"):
            funcs[f"kiln_prefill_{kind}_fa2"] = prefill_kernel(kind, *shape)
            if d == 128:
                funcs[f"kiln_prefill_{kind}"] = prefill_hopper_kernel(kind, *shape)
        mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
        with target:
            lib = tvm.tirx.build(mod, target=target)
        lib.export_library(str(out / attention_file(h_qo, h_kv, d)))
        print(f"attention {h_qo}/{h_kv}/{d}: {sorted(funcs)}", flush=True)


def build_linear(out: Path) -> None:
    """One Relax function per (K, N, epilogue), dynamic rows bounded as the model bounds them, compiled
    with the model's pipeline: what a Linear of that shape runs in an artifact."""
    import tvm
    from tvm import relax, tirx

    from compile.cuda_aot import enable_cuda_binaries
    from schedules.pipeline import relax_pipeline, tir_pipeline

    target = _target()
    bb = relax.BlockBuilder()
    for k, n, epilogue in LINEAR_SHAPES:
        m = tirx.Var("m", "int64")
        x = relax.Var("x", relax.TensorType((m, k), "bfloat16"))
        w = relax.Var("w", relax.TensorType((n, k), "bfloat16"))
        params = [x, w] + ([relax.Var("r", relax.TensorType((m, n), "bfloat16"))]
                           if epilogue == "residual" else [])
        with bb.function(linear_name(k, n, epilogue), params, attrs={"tir_var_upper_bound": {"m": LINEAR_MAX_ROWS}}):
            with bb.dataflow():
                y = bb.emit(relax.op.matmul(x, relax.op.permute_dims(w), out_dtype="float32"))
                if epilogue != "logits":
                    y = bb.emit(relax.op.astype(y, "bfloat16"))
                if epilogue == "residual":
                    y = bb.emit(relax.op.add(params[2], y))
                y = bb.emit_output(y)
            bb.emit_func_output(y)
    assert enable_cuda_binaries(ARCH), "nvcc and TVM's CUDA runtime are needed to build the GPU tests"
    with tvm.transform.PassContext(opt_level=3, config={"tirx.disable_cse_tir": True}), target:
        ex = tvm.compile(bb.get(), target=target, relax_pipeline=relax_pipeline(target),
                         tir_pipeline=tir_pipeline(target))
    out.mkdir(parents=True, exist_ok=True)
    ex.export_library(str(out / "linear.so"))
    print(f"linear: {len(LINEAR_SHAPES)} functions", flush=True)


def main(out: Path) -> None:
    from bench import gemm, gpu_parity
    from compile.cuda_aot import enable_cuda_binaries

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    assert enable_cuda_binaries(ARCH), "nvcc and TVM's CUDA runtime are needed to build the GPU tests"
    build_attention(out / "attention")
    build_linear(out)
    gemm.build(str(out / "gemm"), ["mma_sync"])
    gpu_parity.build(out / "models")
    # the engine needs a tokenizer; the tests prompt with ids < 256, which the bundled one covers
    shutil.copy(REPO / "model_defs" / "stories260K" / "tokenizer.json", out / "models" / f"art-{ENGINE_MODEL}")
    (out / "built.json").write_text(json.dumps({"seconds": round(time.time() - t0)}))
    print(f"built {out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else REPO / ".gpu" / "test-gpu"))
