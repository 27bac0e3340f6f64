"""The CUDA runtime that TVM's CUDA module already loaded, through ctypes: what TVM's Python API lacks
for overlapping host and device work. An event waits for one point of a stream (`.numpy()` waits for
everything queued, the next step included), on the host or in another stream; pinned host buffers let a
device→host copy run in the background, queued behind the kernels that produce its data.
"""

from __future__ import annotations

import ctypes

import numpy as np

_EVENT_DISABLE_TIMING = 2
_DEVICE_TO_HOST = 2
_STREAM_NON_BLOCKING = 1


def cudart() -> ctypes.CDLL:
    """The CUDA runtime TVM's CUDA module already loaded (its soname differs between CUDA versions)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "libcudart.so" in line:
                return ctypes.CDLL(line.split()[-1])
    raise RuntimeError("libcudart is not loaded; load TVM's CUDA runtime (runtime.artifact.import_tvm) first")


def _check(result: int, what: str) -> None:
    if result:
        raise RuntimeError(f"{what} failed with CUDA error {result}")


class Event:
    """A point in a stream the host can wait for alone (waiting for one never recorded returns at once)."""

    def __init__(self):
        self._lib, self.handle = cudart(), ctypes.c_void_p()
        _check(self._lib.cudaEventCreateWithFlags(ctypes.byref(self.handle), _EVENT_DISABLE_TIMING),
               "cudaEventCreateWithFlags")

    def record(self, stream: int) -> None:
        _check(self._lib.cudaEventRecord(self.handle, ctypes.c_void_p(stream)), "cudaEventRecord")

    def synchronize(self) -> None:
        _check(self._lib.cudaEventSynchronize(self.handle), "cudaEventSynchronize")

    def wait_in(self, stream: int) -> None:
        """Make `stream` wait, on the device, for this event's point (the host goes on at once)."""
        _check(self._lib.cudaStreamWaitEvent(ctypes.c_void_p(stream), self.handle, 0), "cudaStreamWaitEvent")

    def __del__(self):
        self._lib.cudaEventDestroy(self.handle)


def is_nonblocking_stream(handle: int) -> bool:
    """Whether `handle` is a live CUDA stream created with cudaStreamNonBlocking."""
    flags = ctypes.c_uint()
    return cudart().cudaStreamGetFlags(ctypes.c_void_p(handle), ctypes.byref(flags)) == 0 \
        and flags.value & _STREAM_NON_BLOCKING != 0


class HostReadback:
    """Background copies of small int32 device arrays into pinned host memory, each waited for alone.
    A ring of `slots` buffers: a copy's result must be read before `slots` more copies start."""

    def __init__(self, max_items: int, slots: int = 4):
        self._lib = cudart()
        self._buffers = []
        for _ in range(slots):
            ptr = ctypes.c_void_p()
            _check(self._lib.cudaMallocHost(ctypes.byref(ptr), ctypes.c_size_t(4 * max_items)), "cudaMallocHost")
            self._buffers.append(ptr)
        self._events = [Event() for _ in range(slots)]
        self._next = 0

    def start(self, data_ptr: int, count: int, stream: int):
        """Queue the copy of `count` int32 at device address `data_ptr` on `stream`; returns a function
        that waits for that copy (and what precedes it on the stream) and gives the values."""
        slot = self._next
        self._next = (slot + 1) % len(self._buffers)
        buffer, event = self._buffers[slot], self._events[slot]
        _check(self._lib.cudaMemcpyAsync(buffer, ctypes.c_void_p(data_ptr), ctypes.c_size_t(4 * count),
                                         _DEVICE_TO_HOST, ctypes.c_void_p(stream)), "cudaMemcpyAsync")
        event.record(stream)

        def result() -> np.ndarray:
            event.synchronize()
            return np.ctypeslib.as_array((ctypes.c_int32 * count).from_address(buffer.value)).copy()

        return result

    def __del__(self):
        for ptr in self._buffers:
            self._lib.cudaFreeHost(ptr)
