"""The baseline: a raw Unix-socket echo server in Python, with no framing.

Theory of operation
-------------------
This is the floor an ipcd echo cannot beat: the same language, the same
kernel objects (a Unix stream and a Unix datagram socket), the same
readiness loop (``selectors``, i.e. epoll), but no header, no decoder, no
services, no master. Whatever ipcd costs above this is the price of its
protocol and architecture.

Fairness: the daemon pre-forks ``--workers`` processes, so this server
pre-forks the same number. Each worker accepts on the *shared* listening
socket itself (the classic pre-fork model) instead of having a master accept
and pass fds over ``SCM_RIGHTS`` as ipcd does. The baseline therefore skips
ipcd's accept-and-hand-off hop; the benchmarks hold connections open for the
whole run, so that hop is paid once per connection and does not weigh on the
throughput or latency figures.

Left alone, a shared accept is badly unbalanced here: the worker that wakes
first keeps accepting while the other is still being woken (a wake-up across
vCPUs costs tens of microseconds on a VM), and one worker ends up with
nearly every connection, which would leave the baseline using one core where
ipcd's master spreads connections over all of them. So the workers keep
their live connection counts in a shared ``mmap`` and only the least loaded
(ties included) listen; a worker that has more than that stops watching the
listening socket and looks again every couple of milliseconds. Each worker
reports on stderr how many connections it took, so the spread is visible.
Every worker also serves the shared datagram socket, as ipcd's workers do.

A worker stops reading a connection while it holds unsent bytes for it, so
memory stays bounded when a client does not read. Workers exit on EOF of a
pipe from the master (parent death), the master on SIGTERM/SIGINT or on EOF
of its stdin (the harness died).

Run: ``python -m benchmarks.rawecho --socket-dir DIR --workers N``; it binds
``DIR/stream.sock`` and ``DIR/dgram.sock``.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import re
import selectors
import signal
import socket
import sys
import traceback
from pathlib import Path
from typing import Final

RECV_SIZE: Final = 65536
DGRAM_MAX: Final = 65536


class _Conn:
    __slots__ = ("pending", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending = b""  # bytes read but not yet echoed


class _Load:
    """Live connections per worker, in memory shared by all of them."""

    def __init__(self, workers: int) -> None:
        self.mem = mmap.mmap(-1, 8 * workers)  # anonymous and MAP_SHARED: survives fork
        self.counts = memoryview(self.mem).cast("q")

    def least_loaded(self, index: int) -> bool:
        return self.counts[index] <= min(self.counts)


class _Worker:
    def __init__(
        self, stream: socket.socket, dgram: socket.socket, parent_pipe: int, load: _Load, index: int
    ) -> None:
        self.stream = stream
        self.dgram = dgram
        self.parent_pipe = parent_pipe
        self.load = load
        self.index = index
        self.sel = selectors.DefaultSelector()
        self.accepted = 0
        self.listening = False
        self.running = True

    def _gate(self) -> None:
        """Watch the listening socket only while no other worker has fewer connections."""
        allowed = self.load.least_loaded(self.index)
        if allowed and not self.listening:
            self.sel.register(self.stream, selectors.EVENT_READ, None)
        elif self.listening and not allowed:
            self.sel.unregister(self.stream)
        self.listening = allowed

    def run(self) -> None:
        sel = self.sel
        sel.register(self.dgram, selectors.EVENT_READ, None)
        sel.register(self.parent_pipe, selectors.EVENT_READ, None)
        while self.running:
            self._gate()
            for key, mask in sel.select(None if self.listening else 0.002):
                conn = key.data
                if conn is not None:
                    if mask & selectors.EVENT_READ:
                        self._on_read(conn)
                    elif mask & selectors.EVENT_WRITE:
                        self._flush(conn)
                elif key.fileobj is self.stream:
                    self._accept()
                elif key.fileobj is self.dgram:
                    self._datagram()
                else:
                    self.running = False  # the master went away
        # One write(2), so the workers' lines cannot interleave in a shared log.
        os.write(2, f"rawecho worker {os.getpid()}: accepted {self.accepted} connections\n".encode())

    def _accept(self) -> None:
        try:
            sock, _ = self.stream.accept()
        except (BlockingIOError, InterruptedError):
            return  # another worker won the race
        sock.setblocking(False)
        self.accepted += 1
        self.load.counts[self.index] += 1
        self.sel.register(sock, selectors.EVENT_READ, _Conn(sock))

    def _on_read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.pending = data
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.pending)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        conn.pending = conn.pending[sent:]
        # Read or write, never both: unsent bytes stop the reading.
        events = selectors.EVENT_WRITE if conn.pending else selectors.EVENT_READ
        if self.sel.get_key(conn.sock).events != events:
            self.sel.modify(conn.sock, events, conn)

    def _close(self, conn: _Conn) -> None:
        self.load.counts[self.index] -= 1
        self.sel.unregister(conn.sock)
        conn.sock.close()

    def _datagram(self) -> None:
        try:
            data, addr = self.dgram.recvfrom(DGRAM_MAX)
        except (BlockingIOError, InterruptedError):
            return
        # Replies to an unbound sender (empty address) have nowhere to go.
        if addr:
            with contextlib.suppress(OSError):
                self.dgram.sendto(data, addr)


def accept_spread(log: str) -> list[int]:
    """Connections taken by each worker, from the lines the workers print at exit."""
    found = re.findall(r"^rawecho worker \d+: accepted (\d+) connections$", log, re.MULTILINE)
    return sorted((int(n) for n in found), reverse=True)


def _bind(sock_dir: Path) -> tuple[socket.socket, socket.socket]:
    sock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream.bind(str(sock_dir / "stream.sock"))
    stream.listen(1024)
    stream.setblocking(False)
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dgram.bind(str(sock_dir / "dgram.sock"))
    dgram.setblocking(False)
    return stream, dgram


def serve(sock_dir: Path, workers: int) -> int:
    stream, dgram = _bind(sock_dir)
    death_r, death_w = os.pipe()
    load = _Load(workers)
    pids: list[int] = []
    for index in range(workers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(death_w)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            code = 0
            try:
                _Worker(stream, dgram, death_r, load, index).run()
            except BaseException:  # report and exit; never return into the master's code
                traceback.print_exc()
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    os.close(death_r)
    stream.close()
    dgram.close()
    _wait_for_stop()
    os.close(death_w)  # workers see EOF and exit after reporting
    failed = 0
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        failed += os.waitstatus_to_exitcode(status) != 0
    for name in ("stream.sock", "dgram.sock"):
        with contextlib.suppress(FileNotFoundError):
            (sock_dir / name).unlink()
    return 1 if failed else 0


def _wait_for_stop() -> None:
    """Block until SIGTERM/SIGINT or EOF on stdin. Handlers only wake the loop."""
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(wake_r, selectors.EVENT_READ)
    with contextlib.suppress(OSError, ValueError):
        sel.register(sys.stdin.fileno(), selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is wake_r:
                return
            if not os.read(sys.stdin.fileno(), 4096):
                return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rawecho", description=__doc__.split("\n")[0])
    parser.add_argument("--socket-dir", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    return serve(args.socket_dir, max(1, args.workers))


if __name__ == "__main__":
    sys.exit(main())
