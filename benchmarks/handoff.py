"""fd hand-off rate: ipcd's store against raw fd passing over a socketpair.

Both sides do the same job: a client hands an open fd (one end of a pipe)
to a holder and gets it back. ``put+take`` is one round trip each way per
operation (the fd goes to the holder, then comes back and the holder forgets
it); ``get`` asks for a duplicate of a held fd (the holder keeps its copy).
The baseline holder is a forked process with a blocking loop on a
``socketpair`` speaking one-byte commands with ``socket.send_fds`` /
``recv_fds``: no framing, no JSON, no access checks, no worker in between.
ipcd's path is client -> worker -> master (the store) and back, with
credentials checked and quotas charged; the ratio says what that costs.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

from benchmarks.echo import Settings, progress
from benchmarks.report import Table
from benchmarks.servers import Server
from ipcd.client import Client


def _raw_holder(sock: socket.socket) -> None:
    """The baseline's holder: P + fd stores it, T returns and forgets it,
    G returns a duplicate; runs until EOF."""
    held: int | None = None
    while True:
        msg, fds, _, _ = socket.recv_fds(sock, 1, 1)
        if not msg:
            return
        if msg == b"P":
            if held is not None:
                os.close(held)
            held = fds[0]
            sock.send(b"k")
        elif msg == b"T" and held is not None:
            socket.send_fds(sock, [b"k"], [held])
            os.close(held)
            held = None
        elif msg == b"G" and held is not None:
            socket.send_fds(sock, [b"k"], [held])
        else:
            sock.send(b"e")


def _timed(duration: float, op: Callable[[], None]) -> float:
    """Operations per second of ``op`` over ``duration`` seconds."""
    count = 0
    deadline = time.perf_counter() + duration
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        for _ in range(50):
            op()
        count += 50
    return count / (time.perf_counter() - start)


def _measure_raw(duration: float) -> tuple[float, float]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the holder
        ours.close()
        try:
            _raw_holder(theirs)
        finally:
            os._exit(0)
    theirs.close()
    reader, writer = os.pipe()
    try:

        def put_take() -> None:
            socket.send_fds(ours, [b"P"], [writer])
            ours.recv(1)
            ours.send(b"T")
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
            os.close(fds[0])

        def get() -> None:
            ours.send(b"G")
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
            os.close(fds[0])

        pairs = _timed(duration, put_take)
        socket.send_fds(ours, [b"P"], [writer])
        ours.recv(1)
        gets = _timed(duration, get)
    finally:
        ours.close()
        os.waitpid(pid, 0)
        os.close(reader)
        os.close(writer)
    return pairs, gets


def _measure_ipcd(server: Server, duration: float) -> tuple[float, float]:
    reader, writer = os.pipe()
    try:
        with Client(server.socket_dir) as client:

            def put_take() -> None:
                client.put("bench", [writer])
                os.close(client.take("bench").fds[0])

            def get() -> None:
                os.close(client.get("bench").fds[0])

            pairs = _timed(duration, put_take)
            client.put("bench", [writer])
            gets = _timed(duration, get)
            client.rm("bench")
    finally:
        os.close(reader)
        os.close(writer)
    return pairs, gets


def handoff(ipcd: Server, raw: Server, s: Settings, problems: list[str]) -> Table:
    duration = s.duration
    table = Table("handoff", f"fd hand-off, one client, one fd per operation, {duration:g} s each")
    progress("handoff: ipcd")
    ipcd_pairs, ipcd_gets = _measure_ipcd(ipcd, duration)
    progress("handoff: raw send_fds/recv_fds")
    raw_pairs, raw_gets = _measure_raw(duration)
    table.add("put+take pairs/s", "ops/s", ipcd_pairs, raw_pairs, "higher")
    table.add("get (dup received)/s", "ops/s", ipcd_gets, raw_gets, "higher")
    table.notes.append(
        "baseline: a forked holder on a socketpair with 1-byte commands and send_fds/recv_fds; "
        "ipcd goes client -> worker -> master store and back, with access checks and quotas"
    )
    return table
