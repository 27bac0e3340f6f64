"""A small all-reduce between CPU Disco workers (the CPU path of tensor parallelism, for CI).

Rank 0 listens on a Unix socket; every other rank connects once. An all-reduce sends each rank's
tensor to rank 0, which sums them in rank order (float64, so every rank gets the same bits) and sends
the sum back. Registered as Disco's `runtime.disco.cpu.*` collectives by runtime/tp_worker.py.
"""

from __future__ import annotations

import socket
import struct
import time

import numpy as np

_CONNECT_SECONDS = 120  # workers start in parallel; a worker that never connects is an error


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = conn.recv_into(view[got:])
        if not k:
            raise ConnectionError("a tensor-parallel worker closed its connection")
        got += k
    return bytes(buf)


class CpuCollective:
    def __init__(self, path: str, rank: int, world: int):
        self.rank, self.world, self.peers = rank, world, {}
        if rank == 0:
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(path)
            server.listen(world)
            server.settimeout(_CONNECT_SECONDS)
            for _ in range(world - 1):
                conn, _ = server.accept()
                conn.settimeout(None)
                self.peers[struct.unpack("<i", _recv_exact(conn, 4))[0]] = conn
            server.close()
        else:
            deadline = time.monotonic() + _CONNECT_SECONDS
            self.hub = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            while True:
                try:
                    self.hub.connect(path)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
            self.hub.sendall(struct.pack("<i", rank))

    def allreduce(self, send, op: int, recv) -> None:
        """recv = the sum over ranks of send (Disco's ReduceKind 0; the only one a Kiln model emits)."""
        if op != 0:
            raise ValueError(f"the CPU all-reduce sums only (ReduceKind {op} asked)")
        local = send.numpy()
        if self.rank == 0:
            total = local.astype(np.float64)
            for r in range(1, self.world):
                total += np.frombuffer(_recv_exact(self.peers[r], local.nbytes), local.dtype).reshape(local.shape)
            result = np.ascontiguousarray(total.astype(local.dtype))
            for r in range(1, self.world):
                self.peers[r].sendall(result.tobytes())
        else:
            self.hub.sendall(np.ascontiguousarray(local).tobytes())
            result = np.frombuffer(_recv_exact(self.hub, local.nbytes), local.dtype).reshape(local.shape)
        recv.copyfrom(result)
