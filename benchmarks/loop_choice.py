"""Event loop choice: the same framed echo server on ``selectors`` and on asyncio.

Theory of operation
-------------------
The design brief lets the daemon use epoll through ``selectors`` or asyncio
with ``add_reader``, "chosen by measurement". This is the measurement. One
class, :class:`EchoConn`, holds all the per-connection work (non-blocking
``recv``, :class:`~ipcd.protocol.FrameDecoder`, ``encode_frame``, ``send``
with a bounded backlog); two thin drivers deliver its readiness events:

- ``selectors``: a ``DefaultSelector`` (epoll) loop dispatching on
  ``key.data``;
- ``asyncio``: the default event loop (also epoll underneath) with
  ``loop.add_reader``/``add_writer`` callbacks; no streams, no ``sock_*``
  coroutines, no tasks per connection, the cheapest way asyncio offers.

Each runs in a single process (``python -m benchmarks.loop_choice --loop
NAME --socket-dir DIR``), so the difference is only the loop's dispatch
cost. The same throughput and latency clients as the echo scenarios are
pointed at each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import selectors
import signal
import socket
import sys
from pathlib import Path
from typing import Final

from benchmarks.echo import (
    PLACEMENT_NOTE,
    Loaded,
    Settings,
    measure_throughput,
    placements,
    progress,
    round_trips,
)
from benchmarks.report import Table, latency_rows
from benchmarks.servers import Server
from ipcd.protocol import (
    NEED_DATA,
    ErrorCode,
    FrameDecoder,
    Op,
    RemoteProtocolError,
    encode_error,
    encode_frame,
)

RECV_SIZE: Final = 65536
LOOPS: Final[tuple[str, str]] = ("selectors", "asyncio")


class EchoConn:
    """One framed-echo connection; the loop only says when it is ready."""

    __slots__ = ("decoder", "out", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = FrameDecoder()
        self.out = b""  # replies not yet sent; while any, we do not read

    def on_readable(self) -> bool:
        """Read, answer every whole frame, send. False: close the connection."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not data:
            return False
        self.decoder.receive_data(data)
        replies: list[bytes] = []
        alive = True
        while True:
            try:
                event = self.decoder.next_event()
            except RemoteProtocolError as exc:
                body = encode_error(exc.code, exc.message)
                replies.append(encode_frame(Op.ERROR, exc.request_id, body))
                if exc.fatal:
                    alive = False
                    break
                continue
            if event is NEED_DATA:
                break
            if event.op == Op.ECHO:
                replies.append(encode_frame(Op.ECHO_REPLY, event.request_id, event.body))
            else:
                body = encode_error(ErrorCode.UNKNOWN_OP, f"op 0x{event.op:02x} not served here")
                replies.append(encode_frame(Op.ERROR, event.request_id, body))
        self.out = b"".join(replies)
        return self.on_writable() and alive

    def on_writable(self) -> bool:
        if self.out:
            try:
                sent = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                return False
            self.out = self.out[sent:]
        return True


def _listen(sock_dir: Path) -> socket.socket:
    sock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_dir / "stream.sock"))
    listener.listen(1024)
    listener.setblocking(False)
    return listener


def _accept(listener: socket.socket) -> socket.socket | None:
    try:
        sock, _ = listener.accept()
    except (BlockingIOError, InterruptedError):
        return None
    sock.setblocking(False)
    return sock


def serve_selectors(listener: socket.socket) -> None:
    wake_r, wake_w = socket.socketpair()
    for s in (wake_r, wake_w):
        s.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)  # only wakes the loop
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    sel.register(wake_r, selectors.EVENT_READ, None)
    sel.register(sys.stdin, selectors.EVENT_READ, None)  # EOF: the harness is gone
    while True:
        for key, mask in sel.select():
            conn = key.data
            if conn is None:
                if key.fileobj is not listener:
                    return
                sock = _accept(listener)
                if sock is not None:
                    sel.register(sock, selectors.EVENT_READ, EchoConn(sock))
                continue
            alive = conn.on_readable() if mask & selectors.EVENT_READ else conn.on_writable()
            if not alive:
                sel.unregister(conn.sock)
                conn.sock.close()
                continue
            events = selectors.EVENT_WRITE if conn.out else selectors.EVENT_READ
            if key.events != events:
                sel.modify(conn.sock, events, conn)


async def serve_asyncio(listener: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def finish() -> None:
        if not stop.done():
            stop.set_result(None)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, finish)
    loop.add_reader(sys.stdin.fileno(), finish)

    def close(conn: EchoConn) -> None:
        conn.sock.close()

    def on_read(conn: EchoConn) -> None:
        if not conn.on_readable():
            loop.remove_reader(conn.sock)
            close(conn)
        elif conn.out:
            loop.remove_reader(conn.sock)
            loop.add_writer(conn.sock, on_write, conn)

    def on_write(conn: EchoConn) -> None:
        if not conn.on_writable():
            loop.remove_writer(conn.sock)
            close(conn)
        elif not conn.out:
            loop.remove_writer(conn.sock)
            loop.add_reader(conn.sock, on_read, conn)

    def on_accept() -> None:
        sock = _accept(listener)
        if sock is not None:
            loop.add_reader(sock, on_read, EchoConn(sock))

    loop.add_reader(listener, on_accept)
    await stop


# --- the harness side ---------------------------------------------------------------


def scenario(work_dir: Path, s: Settings, problems: list[str]) -> Table:
    """Both loops' servers side by side under the same clients; ratio selectors / asyncio."""
    table = Table(
        "loop",
        f"framed echo server, 1 process: selectors (epoll) vs asyncio add_reader; "
        f"{s.conns} conns x window {s.window}, {s.duration:g} s; {s.rounds} round trips",
        columns=LOOPS,
    )
    with contextlib.ExitStack() as stack:
        servers = []
        for name in LOOPS:
            sock_dir = work_dir / f"loop-{name}"
            argv = [
                sys.executable,
                "-m",
                "benchmarks.loop_choice",
                "--loop",
                name,
                "--socket-dir",
                str(sock_dir),
            ]
            log = work_dir / f"loop-{name}.log"
            servers.append(stack.enter_context(Server(name, argv, sock_dir, log, dgram=False)))
        runs: list[Loaded] = []
        for server in servers:
            progress(f"loop: {server.name} throughput ({s.warmup:g} s warm-up + {s.duration:g} s)")
            runs.append(measure_throughput(server, "ipcd", s))
            problems.extend(runs[-1].problems)
            progress(f"loop: {server.name}: {runs[-1].result.messages_per_s:,.0f} msg/s")
        progress(f"loop: {s.rounds} round trips x {len(placements())} placements x 2 servers")
        samples = round_trips([(server, "ipcd") for server in servers], s, dgram=False)
        for server in servers:
            if server.stop() != 0:
                problems.append(f"{server.name} loop server exited with {server.exit_code}")
    a, b = runs
    table.add("messages/s", "msg/s", a.result.messages_per_s, b.result.messages_per_s, "higher")
    table.add("server CPU per message", "us", a.cpu_us_per_msg, b.cpu_us_per_msg, "lower")
    for label in samples[0]:
        latency_rows(table, label, samples[0][label], samples[1][label])
    table.notes.append(
        f"server CPU busy: selectors {a.cpu_s / a.wall_s:.2f} cores, asyncio {b.cpu_s / b.wall_s:.2f} cores "
        "(one process each, so at most 1.00)"
    )
    table.notes.append(PLACEMENT_NOTE)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loop_choice")
    parser.add_argument("--loop", choices=LOOPS, required=True)
    parser.add_argument("--socket-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    listener = _listen(args.socket_dir)
    try:
        if args.loop == "selectors":
            serve_selectors(listener)
        else:
            asyncio.run(serve_asyncio(listener))
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.socket_dir / "stream.sock")
    return 0


if __name__ == "__main__":
    sys.exit(main())
