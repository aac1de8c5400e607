"""A burst of connects loses none: every connection the kernel accepted is
served. The master used to close some ("no worker could take a connection")
when the workers' channels were full; it now stops accepting instead and
lets the kernel's listen backlog push back on the clients.

The clients are forked processes, each holding its share of the
connections open (the hard limit on open files is 20,000 per process), so
the whole burst is open at once before any is used."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import resource
import socket
from pathlib import Path

from ipcd.protocol import Op, encode_frame
from tests.daemon import Daemon, fd_count

ECHO = encode_frame(Op.ECHO, 1, b"burst")


def _client(path: str, count: int, results: multiprocessing.connection.Connection) -> None:
    """Open ``count`` connections as fast as possible, then echo on each."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks: list[socket.socket] = []
    errors: list[str] = []
    served = 0
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                # Blocking: a full listen backlog makes connect() wait (a
                # socket with a timeout would get EAGAIN at once instead).
                sock.connect(path)
                sock.settimeout(60)
            except OSError as exc:
                errors.append(f"connect: {exc}")
                sock.close()
                continue
            socks.append(sock)
        for sock in socks:
            sock.sendall(ECHO)
        for sock in socks:
            try:
                reply = b""
                while len(reply) < len(ECHO):
                    chunk = sock.recv(len(ECHO) - len(reply))
                    if not chunk:
                        raise ConnectionResetError("closed by the daemon")
                    reply += chunk
                served += reply[3] == Op.ECHO_REPLY
            except OSError as exc:
                errors.append(f"echo: {exc!r}")
    finally:
        for sock in socks:
            sock.close()
        results.send((served, errors[:5], len(errors)))
        results.close()


def burst(daemon: Daemon, clients: int, each: int) -> None:
    context = multiprocessing.get_context("fork")
    pipes = [context.Pipe(duplex=False) for _ in range(clients)]
    procs = [context.Process(target=_client, args=(str(daemon.stream_path), each, send)) for _, send in pipes]
    for proc in procs:
        proc.start()
    results = []
    for (receive, send), proc in zip(pipes, procs, strict=True):
        send.close()
        assert receive.poll(180), "a burst client hung"
        results.append(receive.recv())
        proc.join(30)
    served = sum(r[0] for r in results)
    errors = [e for r in results for e in r[1]]
    failed = sum(r[2] for r in results)
    log = daemon.log()
    assert (served, failed) == (clients * each, 0), f"{failed} failed: {errors}\n{log[-2000:]}"
    assert "no worker" not in log, log[-2000:]


def test_a_burst_of_20000_connects_is_served_whole(short_tmp: Path) -> None:
    # The burst is root's: its default connection budget (16384 here) would refuse some.
    daemon = Daemon(short_tmp / "s", "--connections-per-uid", "20000", workers=2).start()
    try:
        baseline = fd_count(daemon.pid)
        burst(daemon, clients=4, each=5000)
        assert daemon.settled_status(lambda s: s["totals"]["connections"] <= 1)["respawns"] == 0
        assert fd_count(daemon.pid) == baseline
    finally:
        assert daemon.stop() == 0
