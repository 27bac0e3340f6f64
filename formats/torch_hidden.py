"""TVM's FFI imports torch whenever it is installed (2.5 s of every start), only to exchange tensors
with it, which Kiln never does. Importing TVM inside `torch_hidden()` skips that."""

from __future__ import annotations

import sys
from contextlib import contextmanager


@contextmanager
def torch_hidden():
    """While inside, `import torch` raises ImportError (TVM's "not installed"); a process that imported
    torch already is left as it is, and torch is importable again afterwards."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None
    try:
        yield
    finally:
        if hide and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
