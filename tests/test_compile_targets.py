"""Compile-only checks for the GPU targets (CI has nvcc but no GPU): CUDA carries a binary, Metal a .tar."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import tarfile

import pytest
import yaml

from conftest import HEAD_DIM_128, REPO, STORIES_HF, make_tiny_hf

FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)


def _compile(tmp_path, target, dtype, model=STORIES_HF):
    out = tmp_path / target
    # A subprocess: CUDA AOT loads TVM's CUDA runtime (with a stub driver) into the compiling process.
    proc = subprocess.run([sys.executable, "-m", "compile", "--model", str(model), "--target", target,
                           "--dtype", dtype, "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, yaml.safe_load((out / "kiln.yaml").read_text())


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_artifact_holds_a_compiled_binary(tmp_path):
    # Llama-3 RoPE scaling at head_dim 128: Kiln's attention kernels, and the shape that once broke TIR's CSE
    model = make_tiny_hf("llama3", tmp_path / "hf", **HEAD_DIM_128)
    out, manifest = _compile(tmp_path, "cuda", "bfloat16", model)
    assert manifest["cuda_binary"] is True and manifest["cuda_arch"] == "sm_90a"
    library = (out / "model.so").read_bytes()
    assert FATBIN_MAGIC in library            # nvcc's fatbin is embedded ...
    assert b"extern \"C\" __global__" not in library  # ... instead of CUDA source
    assert (out / "weights" / "index.json").is_file()


def test_metal_artifact_is_a_tar_of_objects_and_metal_source(tmp_path):
    # head_dim 128, GQA: the shape Kiln's Metal attention kernels (plain TIR) serve
    model = make_tiny_hf("qwen3", tmp_path / "hf", **HEAD_DIM_128)
    out, manifest = _compile(tmp_path, "metal", "float16", model)
    assert manifest["library"] == "model.tar"
    with tarfile.open(out / "model.tar") as tar:
        names = tar.getnames()
        assert any(n.endswith(".o") for n in names)
        blob = b"".join(tar.extractfile(m).read() for m in tar.getmembers() if m.isfile())
    assert b"kernel void" in blob  # Metal shading language source, compiled by the Metal runtime on the Mac
    for kernel in (b"kiln_decode_paged_kv_kernel(", b"kiln_metal_prefill_ragged_kernel(", b"kiln_metal_prefill_paged_kernel("):
        assert b"kernel void " + kernel in blob
