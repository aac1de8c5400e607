"""The Redis side of the fan-out: a private ``redis-server`` on a Unix socket.

Theory of operation
-------------------
Redis runs as it ships, persistence off, listening only on a socket in the
run's work directory, so it competes with ipcd on equal terms: one process,
its own event loop, nothing written to disk. PUBSUB NUMSUB tells whether
every subscriber is on the channel before a round starts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from pathlib import Path

from benchmarks.servers import Server, ServerError


def resp(*words: bytes) -> bytes:
    """One RESP command."""
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)


def _ask(path: str, command: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.connect(path)
        sock.sendall(command)
        return sock.recv(256)


def _ping(path: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            answer = _ask(path, resp(b"PING"))
        except OSError as exc:
            answer = str(exc).encode()
        if answer == b"+PONG\r\n":
            return
        if time.monotonic() > deadline:
            raise ServerError(f"redis did not answer PING: {answer!r}")
        time.sleep(0.05)


def start(work: Path, stack: contextlib.ExitStack) -> Server | str:
    """A started Redis (stopped by ``stack``), or why there is none."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.access(binary, os.X_OK):
        return "redis-server is not installed (make install installs it through apt)"
    sock_dir = work / "redis"
    sock_dir.mkdir()
    argv = [binary, "--port", "0", "--unixsocket", str(sock_dir / "stream.sock"), "--unixsocketperm", "700"]
    argv += ["--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(sock_dir)]
    server = Server("redis", argv, sock_dir, work / "redis.log", dgram=False)
    try:
        stack.enter_context(server)
        _ping(server.stream_path)
    except (ServerError, OSError) as exc:
        server.stop()
        return f"redis-server did not start: {exc}"
    return server


def spread(server: Server, subs: int, channel: str, problems: list[str]) -> str:
    """Checks every subscriber is on the channel; Redis has one event loop."""
    answer = _ask(server.stream_path, resp(b"PUBSUB", b"NUMSUB", channel.encode()))
    if not answer.endswith(b":%d\r\n" % subs):
        problems.append(f"redis, {subs} subscribers: PUBSUB NUMSUB said {answer!r}")
    return "one event loop"
