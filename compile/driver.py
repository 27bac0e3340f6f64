"""The compile driver: source → config → Relax module → compiled library + converted weights."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import tvm
from tqdm import tqdm

from formats.dtypes import DTYPES
from formats.errors import KilnError
from formats.gguf import GGUFSource
from model_defs.config import ModelConfig
from model_defs.layers import shard
from model_defs.spec import build_model, export
from schedules.attention.choice import paged_kv_kernels
from schedules.pdl import supports_pdl
from schedules.pipeline import relax_pipeline, tir_pipeline

from . import artifact, targets
from .convert import convert
from .cuda_aot import enable_cuda_binaries
from .presets import resolve
from .quant_plan import plan_gguf, plan_quantize, quant_type_of
from .sources import open_source



@tvm.ir.instrument.pass_instrument
class _PassProgress:
    """A progress bar over the compiler's passes (tvm.compile gives no other progress signal)."""

    def __init__(self, bar: tqdm):
        self.bar = bar

    def run_after_pass(self, mod, info):
        self.bar.set_postfix_str(info.name[:40], refresh=False)
        self.bar.update()


def _context(raw_config: dict, config_name: str, asked: int | None, max_positions: int) -> int:
    """Tokens per sequence: `asked` or the model's max_position_embeddings. Sliding-window attention
    (Mistral's `sliding_window`, Qwen2's with `use_sliding_window`) is not implemented: a context within
    the window is exact, so it is capped there, and a longer one asked for is refused."""
    context = min(asked or max_positions, max_positions)
    window = raw_config.get("sliding_window")
    if "use_sliding_window" in raw_config and not raw_config["use_sliding_window"]:
        window = None
    if window and int(window) < context:
        if asked:
            raise KilnError(f"{config_name}: sliding_window is {window} and Kiln does not implement sliding-window "
                            f"attention yet; compile with a context of at most {window} tokens (CONTEXT= / --context)")
        print(f"kiln: {config_name} attends within a sliding window of {window} tokens, which Kiln does not "
              f"implement yet; the context is capped at {window}", file=sys.stderr)
        context = int(window)
    return context


def compile_artifact(model: str, target: str, dtype: str, out: str | None, weights: str | None,
                     cuda_arch: str | None, context: int | None, page_size: int, prefill_chunk: int,
                     max_batch: int = 256, quant: str | None = None, dequantize: bool = False,
                     tp: int | None = None, pdl: bool = True, fuse_norms: bool = False) -> Path:
    """`quant`: quantize a safetensors model's 2-D weights into this type (compile/quant_plan.py); a GGUF
    keeps its quantized tensors packed unless `dequantize`, which gives every weight the model dtype.
    `tp`: shard the model over that many devices (tensor parallelism). `pdl`: CUDA kernels for sm_90+
    overlap their launch with the previous kernel's tail (programmatic dependent launch, schedules/pdl.py).
    `fuse_norms`: `decode` folds each RMSNorm into the GEMV after it on CUDA (schedules/norm_gemv.py)."""
    if target not in targets.TARGETS:
        raise KilnError(f"unknown target '{target}'; choose one of {', '.join(targets.TARGETS)}")
    if dtype not in DTYPES:
        raise KilnError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    name, preset_config, weights_path = resolve(model)
    if weights:
        weights_path = Path(weights).expanduser()
        if not weights_path.exists():
            raise KilnError(f"WEIGHTS={weights}: no such file or folder")
    source = open_source(weights_path) if weights_path is not None and weights_path.exists() else None
    if source is None and preset_config is None:
        raise KilnError(f"{weights_path}: model weights not found")
    raw_config = source.config if source is not None else preset_config
    config_name = f"{weights_path}/config.json" if source is not None and weights_path.is_dir() else str(
        weights_path if source is not None else "presets.yaml:" + name)
    cfg = ModelConfig.from_dict(raw_config, config_name)
    context = _context(raw_config, config_name, context, cfg.max_position_embeddings)
    arch = (cuda_arch or targets.DEFAULT_CUDA_ARCH) if target == "cuda" else None

    qtype = quant_type_of(quant) if quant else None
    float_params = [(n, tuple(int(d) for d in p.shape)) for n, p in build_model(cfg, dtype, None).named_parameters()]
    plan = _quant_plan(source, qtype, dequantize, float_params, dtype, cfg)
    for note in plan.notes if plan else []:
        print(f"kiln: {note}", file=sys.stderr)
    if tp is not None and (not isinstance(tp, int) or tp < 1):
        raise KilnError(f"--tp {tp}: the tensor-parallel degree must be a whole number >= 1")
    if tp is not None and plan is not None:
        raise KilnError(f"--tp {tp}: quantized weights are not split over devices yet; compile a safetensors "
                        "model without --quant, or a GGUF with --dequantize")

    out_dir = Path(out) if out else Path("artifacts") / (f"{name}-{dtype}{'-' + qtype if qtype else ''}-{target}"
                                                         f"{f'-tp{tp}' if tp else ''}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tvm_target = targets.tvm_target(target, arch or targets.DEFAULT_CUDA_ARCH)
    cuda_binary = target == "cuda" and enable_cuda_binaries(arch)
    if target == "cuda" and not cuda_binary:
        print("kiln: nvcc not found; the artifact carries CUDA source, compiled on the GPU at first load",
              file=sys.stderr)

    t0 = time.time()
    heads, kv_heads = (shard(cfg.num_attention_heads, tp, "num_attention_heads"),
                       shard(cfg.num_key_value_heads, tp, "num_key_value_heads"))  # per rank
    kernels = paged_kv_kernels(tvm_target, kv_heads, heads, cfg.head_dim, dtype, pdl)
    mod, named_params = export(cfg, dtype, tvm_target, max_batch, prefill_chunk, kernels,
                               plan.types if plan else None, tp)
    library = targets.library_name(target)
    with tqdm(desc=f"compiling {name} for {target}", unit="pass", leave=False) as bar:
        # TIR's CSE emits a use before its definition in TVM's RoPE kernel under Llama-3 frequency
        # scaling (head_dim 128) on GPU targets; the device compilers eliminate common subexpressions anyway.
        config = {"relax.backend.use_cuda_graph": target == "cuda", "tirx.disable_cse_tir": target != "cpu"}
        with tvm.transform.PassContext(opt_level=3, config=config, instruments=[_PassProgress(bar)]), tvm_target:
            executable = tvm.compile(mod, target=tvm_target, relax_pipeline=relax_pipeline(tvm_target, fuse_norms),
                                     tir_pipeline=tir_pipeline(tvm_target, pdl))
        bar.set_postfix_str("linking")
        executable.export_library(str(out_dir / library))
    print(f"kiln: compiled {name} for {target} ({dtype}) in {time.time() - t0:.1f}s", file=sys.stderr)

    params = [(n, tuple(int(d) for d in p.shape), p.dtype) for n, p in named_params]
    artifact.write_params(out_dir, params)
    manifest = {
        "architecture": cfg.architecture,
        "family": cfg.family,
        "name": name,
        "config": cfg.to_dict(),
        "dtype": dtype,
        "target": target,
        "cuda_arch": arch,
        "cuda_binary": bool(cuda_binary),
        "cuda_pdl": pdl and supports_pdl(tvm_target),  # False for every other target
        "library": library,
        "page_size": page_size,
        "context_length": context,
        "prefill_chunk": prefill_chunk,
        "max_batch": max_batch,
        "tensor_parallel": tp,  # None: one device; N: N ranks, each with its rank_weights folder
        "tvm_version": tvm.__version__,
        "content_hash": artifact.content_hash(cfg.to_dict() if tp is None else {**cfg.to_dict(), "tensor_parallel": tp},
                                              dtype, target, arch, source, plan.types if plan else None),
        "quantization": plan.manifest() if plan else None,
        "weights": None,
        "weights_hint": None,
    }
    if source is not None:
        if tp is None:
            convert(source, params, out_dir / artifact.WEIGHTS_DIR, plan.packed(float_params) if plan else None)
        for rank in range(tp or 0):
            convert(source, params, out_dir / artifact.rank_dir(rank), rank=rank, tp=tp)
        source.write_tokenizer(out_dir)
        manifest["weights"] = artifact.WEIGHTS_DIR
        if tp is not None:
            manifest["rank_weights"] = [artifact.rank_dir(rank) for rank in range(tp)]
    else:
        manifest["weights_hint"] = (f"make compile MODEL={model} TARGET={target} WEIGHTS=/path/to/{name} "
                                    f"(an HF folder or .gguf file; looked for {weights_path})")
        print(f"kiln: no weights at {weights_path}; built the library only. Add weights with: "
              f"{manifest['weights_hint']}", file=sys.stderr)
    artifact.write_manifest(out_dir, manifest)
    print(f"kiln: artifact written to {out_dir}", file=sys.stderr)
    return out_dir


def _quant_plan(source, qtype: str | None, dequantize: bool, float_params, dtype: str, cfg: ModelConfig):
    """Which weights stay packed: `--quant`'s type for a safetensors model, a GGUF's own types, or none."""
    if qtype:
        if isinstance(source, GGUFSource):
            raise KilnError(f"--quant {qtype}: {source.path} is a GGUF file, which keeps its own quantization; "
                            "--quant applies to safetensors models")
        return plan_quantize(qtype, float_params, cfg)
    if isinstance(source, GGUFSource) and not dequantize:
        return plan_gguf(source, float_params, dtype)
    return None
