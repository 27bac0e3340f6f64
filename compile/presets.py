"""`--model` may name a preset from model_defs/presets.yaml instead of a path."""

from __future__ import annotations

from pathlib import Path

import yaml

import model_defs
from formats.errors import KilnError

PRESETS_FILE = Path(model_defs.__file__).parent / "presets.yaml"
REPO_ROOT = PRESETS_FILE.parent.parent


def presets() -> dict:
    return yaml.safe_load(PRESETS_FILE.read_text())


def resolve(model: str) -> tuple[str, dict | None, Path | None]:
    """(name, config dict or None, weights path or None) for a preset name or a model path."""
    table = presets()
    if model in table:
        entry = table[model]
        weights = Path(entry["weights"]).expanduser()
        if not weights.is_absolute() and not weights.exists() and (REPO_ROOT / weights).exists():
            weights = REPO_ROOT / weights
        return model, entry.get("config"), weights
    path = Path(model).expanduser()
    if not path.exists():
        raise KilnError(f"--model '{model}' is neither a file or folder nor a preset "
                        f"({', '.join(table)} in {PRESETS_FILE.name})")
    return path.stem if path.is_file() else path.resolve().name, None, path
