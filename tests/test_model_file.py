"""What `--w` resolves to (runtime/model_file.py): an artifact checked against this machine, or the
newest artifact of a folder that can run here, with the reason for each one that cannot."""

from __future__ import annotations

import os
import shutil

import pytest
import yaml

from formats.errors import KilnError
from runtime.model_file import resolve_model


def _copy(artifact, folder, name, mtime, **manifest_changes):
    """A copy of `artifact` whose kiln.yaml has `manifest_changes` and modification time `mtime`."""
    out = folder / name
    shutil.copytree(artifact, out)
    manifest = yaml.safe_load((out / "kiln.yaml").read_text()) | manifest_changes
    (out / "kiln.yaml").write_text(yaml.safe_dump(manifest))
    os.utime(out / "kiln.yaml", (mtime, mtime))
    return out


def test_a_folder_gives_its_newest_artifact_that_runs_here(stories_artifact, tmp_path, capsys):
    runs = _copy(stories_artifact, tmp_path, "cpu-old", 1000)
    _copy(stories_artifact, tmp_path, "metal-new", 3000, target="metal", library="model.tar")
    _copy(stories_artifact, tmp_path, "no-weights", 2000, weights=None, weights_hint="make compile MODEL=x")
    assert resolve_model(tmp_path) == runs
    assert "using the newest that runs here, cpu-old" in capsys.readouterr().err
    with pytest.raises(KilnError, match="it computes in float32, bfloat16 was asked"):
        resolve_model(tmp_path, "bf16")
    assert resolve_model(runs, "f32") == runs


def test_an_artifact_that_cannot_run_here_is_named_with_the_reason(stories_artifact, tmp_path):
    metal = _copy(stories_artifact, tmp_path / "only", "m2", 1000, target="metal", library="model.tar")
    with pytest.raises(KilnError, match=r"m2 cannot run here: it was compiled for Metal, which needs a Mac"):
        resolve_model(metal)
    with pytest.raises(KilnError, match=r"none of its 1 artifacts can run here \(m2: it was compiled for Metal"):
        resolve_model(tmp_path / "only")
    with pytest.raises(KilnError, match="not an artifact, a folder of artifacts, an HF model folder"):
        resolve_model(tmp_path)
