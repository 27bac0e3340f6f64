"""TVM's C++ logs warnings straight to the process's stderr with no level switch; two of them come
with every compile and mean nothing for Kiln's models, so the compile CLI drops them:

- "Fast mode segfaults when there are out-of-bounds indices": `take` on token ids and on logit
  positions, which the engine checks against the vocabulary and the batch before they reach the model.
- "Unknown pragma pragma_scope": LLVM codegen ignoring a GPU-only schedule hint in host code.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from contextlib import contextmanager

HARMLESS = re.compile(rb"\[\d\d:\d\d:\d\d\] [^\n]*Warning: (?:Fast mode segfaults|Unknown pragma pragma_scope)"
                      rb"[^\n]*\n?")
_UNFINISHED = re.compile(rb"\[\d\d:\d\d:\d\d\][^\n]*\Z|\[[\d:]{0,8}\Z")  # a log line still being written


@contextmanager
def harmless_warnings_dropped():
    """Everything written to file descriptor 2 inside passes through, less HARMLESS lines (the progress
    bars' carriage returns keep working: text is forwarded as it comes, not by lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward():
        pending = b""
        while chunk := os.read(read_end, 65536):
            text = HARMLESS.sub(b"", pending + chunk)
            held = _UNFINISHED.search(text)
            pending = text[held.start():] if held else b""
            os.write(saved, text[:held.start()] if held else text)
        os.write(saved, HARMLESS.sub(b"", pending))

    thread = threading.Thread(target=forward, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the thread sees end of file
        thread.join()
        os.close(read_end)
        os.close(saved)
