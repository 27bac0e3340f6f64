"""The compile CLI's stderr filter drops TVM's two harmless warnings and passes everything else through."""

from __future__ import annotations

import os

from compile.tvm_warnings import harmless_warnings_dropped


def test_only_the_harmless_warnings_are_dropped(capfd):
    fast = b"[07:03:03] /project/include/tvm/topi/transform.h:1261: Warning: Fast mode segfaults when there are " \
           b"out-of-bounds indices. Make sure input indices are in bound\n"
    pragma = b"[07:03:05] /project/src/target/llvm/codegen_cpu.cc:1183: Warning: Unknown pragma pragma_scope\n"
    other = b"[07:03:06] /project/src/x.cc:1: Warning: something that matters\n"
    with harmless_warnings_dropped():
        os.write(2, b"\rbar 1/3 " + fast[:30])  # a warning split across writes, mid progress bar
        os.write(2, fast[30:] + b"\rbar 2/3 " + pragma + other)
        os.write(2, b"\rbar 3/3 [00:01<00:00]")
    assert capfd.readouterr().err == "\rbar 1/3 \rbar 2/3 " + other.decode() + "\rbar 3/3 [00:01<00:00]"
