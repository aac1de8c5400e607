"""Load generators: the pipelining throughput client and the round-trip clients.

Theory of operation
-------------------
Every client sends the *same bytes* to ipcd and to the raw baseline: ECHO
frames of ``HEADER_SIZE + body`` bytes. ipcd answers each with an ECHO_REPLY
frame of the same size; the raw server echoes the frame verbatim. Only the
expected reply differs (the op byte), so both servers see the same bytes on
the wire and the client does the same work for both: it never decodes, it
compares what arrives against the expected byte stream (a ``memcmp``) and
counts whole messages by byte count. A reply that differs (an ERROR frame,
a wrong request id) is reported, decoded, as an error of the server.

The throughput client keeps ``window`` requests in flight on each of its
non-blocking connections, in one ``selectors`` loop. Request ids cycle over
``1..window`` so ids in flight are distinct; the request stream is thus
periodic and a single pre-built buffer serves every connection, sliced at
the connection's offset. Several client processes run in parallel (see
:func:`run_throughput`); they start together at an agreed
``time.monotonic()`` instant (the clock is system-wide), warm up, then count
only the replies that complete inside the measured window, and finally drain
what is in flight so the server never sees a reset mid-reply.

Run by the harness as ``python -m benchmarks.load ...``; prints one JSON
object on stdout.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

from benchmarks import ROOT
from ipcd.protocol import (
    HEADER_SIZE,
    Frame,
    FrameDecoder,
    Op,
    RemoteProtocolError,
    decode_error,
    encode_frame,
)

Target = Literal["ipcd", "raw"]
RECV_SIZE: Final = 65536
_OP_INDEX: Final = 3  # offset of the op byte in a frame header
_IO_TIMEOUT: Final = 5.0


class BenchError(Exception):
    """The server under test misbehaved (wrong reply, closed, timed out)."""


def expected_reply(request: bytes, target: Target) -> bytes:
    """What ``target`` sends back for a stream of ECHO request frames."""
    if target == "raw":
        return request
    out = bytearray(request)
    pos = 0
    while pos < len(out):
        out[pos + _OP_INDEX] = Op.ECHO_REPLY
        pos += HEADER_SIZE + int.from_bytes(out[pos + 12 : pos + 16], "big")  # + body length
    return bytes(out)


def describe(data: bytes) -> str:
    """A readable account of unexpected bytes from the server."""
    decoder = FrameDecoder()
    decoder.receive_data(data)
    try:
        event = decoder.next_event()
    except RemoteProtocolError as exc:
        return f"undecodable bytes {data[:32]!r}: {exc}"
    if not isinstance(event, Frame):
        return f"partial frame {data[:32]!r}"
    if event.op == Op.ERROR:
        try:
            code, message = decode_error(event.body)
        except RemoteProtocolError:
            return f"ERROR frame with a bad body {event.body[:32]!r}"
        return f"ERROR frame code {code}: {message}"
    return f"frame op=0x{event.op:02x} id={event.request_id} body={event.body[:32]!r}"


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


# --- round trips, one at a time -------------------------------------------------


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = sock.recv(size)
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            raise BenchError(f"server closed the connection after {len(data)} of {size} bytes")
        data += more
    return data


def _round_trips(
    exchange: Callable[[bytes, int], bytes], rounds: int, warmup: int, body: bytes, target: Target
) -> list[int]:
    samples: list[int] = []
    clock = time.perf_counter_ns
    for i in range(warmup + rounds):
        request = encode_frame(Op.ECHO, i + 1, body)
        want = expected_reply(request, target)
        start = clock()
        got = exchange(request, len(want))
        elapsed = clock() - start
        if got != want:
            raise BenchError(f"round trip {i + 1}: expected an echo, got {describe(got)}")
        if i >= warmup:
            samples.append(elapsed)
    return samples


def stream_latency(path: str, rounds: int, warmup: int, body: bytes, target: Target) -> list[int]:
    """Round-trip times in ns over one stream connection, one request at a time."""
    with connect(path) as sock:
        sock.settimeout(_IO_TIMEOUT)

        def exchange(request: bytes, size: int) -> bytes:
            sock.sendall(request)
            return _recv_exactly(sock, size)

        try:
            return _round_trips(exchange, rounds, warmup, body, target)
        except TimeoutError as exc:
            raise BenchError(f"no reply within {_IO_TIMEOUT} s on the stream socket") from exc


def dgram_latency(path: str, rounds: int, warmup: int, body: bytes, target: Target) -> list[int]:
    """Round-trip times in ns of datagrams from an autobound socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("")  # autobind: an abstract address the server can answer to
        sock.settimeout(_IO_TIMEOUT)

        def exchange(request: bytes, size: int) -> bytes:
            sock.sendto(request, path)
            return sock.recv(RECV_SIZE)

        try:
            return _round_trips(exchange, rounds, warmup, body, target)
        except TimeoutError as exc:
            raise BenchError(f"no datagram reply within {_IO_TIMEOUT} s") from exc


# --- pipelined throughput: the client process --------------------------------------


@dataclass(slots=True)
class _Conn:
    sock: socket.socket
    send_off: int = 0  # offset in the periodic request stream
    recv_off: int = 0  # offset in the periodic reply stream
    sent: int = 0  # bytes sent in total
    received: int = 0  # bytes received in total
    owed: int = 0  # bytes to send as soon as the socket takes them
    counted: int = 0  # messages completed inside the measured window
    failed: bool = False


@dataclass(slots=True)
class _Client:
    request: bytes  # the periodic request stream, several periods long
    reply: bytes
    period: int
    unit: int
    sel: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)
    counting: bool = False
    sending: bool = True
    errors: list[str] = field(default_factory=list)

    def pump(self, conn: _Conn) -> None:
        """Send what is owed; wait for writability only when the socket is full."""
        if conn.owed and not conn.failed:
            try:
                n = conn.sock.send(memoryview(self.request)[conn.send_off : conn.send_off + conn.owed])
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self.fail(conn, f"send failed: {exc}")
                return
            conn.owed -= n
            conn.sent += n
            conn.send_off = (conn.send_off + n) % self.period
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.owed else 0)
        if self.sel.get_key(conn.sock).events != events:
            self.sel.modify(conn.sock, events, conn)

    def on_read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(conn, f"recv failed: {exc}")
            return
        if not data:
            self.fail(conn, f"server closed the connection after {conn.received} bytes")
            return
        n = len(data)
        if data != self.reply[conn.recv_off : conn.recv_off + n]:
            start = conn.recv_off - conn.recv_off % self.unit
            self.fail(conn, f"unexpected reply: {describe(self.reply[start : conn.recv_off] + data)}")
            return
        done = (conn.received + n) // self.unit - conn.received // self.unit
        conn.received += n
        conn.recv_off = (conn.recv_off + n) % self.period
        if self.counting:
            conn.counted += done
        if self.sending:
            conn.owed += done * self.unit
            self.pump(conn)

    def fail(self, conn: _Conn, reason: str) -> None:
        if len(self.errors) < 5:
            self.errors.append(reason)
        conn.failed = True
        self.sel.unregister(conn.sock)
        conn.sock.close()


def _client_main(args: argparse.Namespace) -> dict[str, object]:
    body = b"x" * args.body
    one_period = b"".join(encode_frame(Op.ECHO, i + 1, body) for i in range(args.window))
    reps = RECV_SIZE // len(one_period) + 3
    request = one_period * reps
    client = _Client(request, expected_reply(request, args.target), len(one_period), HEADER_SIZE + args.body)
    conns = [_Conn(connect(args.path)) for _ in range(args.conns)]
    late = time.monotonic() > args.start_at
    for conn in conns:
        conn.sock.setblocking(False)
        client.sel.register(conn.sock, selectors.EVENT_READ, conn)
    measure_from = args.start_at + args.warmup
    measure_to = measure_from + args.duration
    time.sleep(max(0.0, args.start_at - time.monotonic()))
    for conn in conns:
        conn.owed = len(one_period)
        client.pump(conn)
    t_from = t_to = 0.0
    while True:
        now = time.monotonic()
        if not client.counting and not t_from and now >= measure_from:
            client.counting, t_from = True, now
        elif client.counting and now >= measure_to:
            client.counting, t_to = False, now
            break
        next_edge = measure_to if client.counting else measure_from
        for key, mask in client.sel.select(max(0.0, min(0.1, next_edge - now))):
            conn = key.data
            if mask & selectors.EVENT_READ:
                client.on_read(conn)
            if mask & selectors.EVENT_WRITE and not conn.failed:
                client.pump(conn)
    _drain(client, conns)
    for conn in conns:
        if not conn.failed:
            conn.sock.close()
    return {
        "messages": sum(c.counted for c in conns),
        "elapsed": t_to - t_from,
        "per_conn": [c.counted for c in conns],
        "errors": client.errors,
        "late": late,
    }


def _drain(client: _Client, conns: list[_Conn]) -> None:
    """Collect the replies still in flight, so nothing is cut off mid-frame."""
    client.sending = False
    deadline = time.monotonic() + _IO_TIMEOUT
    while any(not c.failed and c.received < c.sent for c in conns):
        if time.monotonic() > deadline:
            client.errors.append(f"replies still missing {_IO_TIMEOUT} s after the run")
            return
        for key, mask in client.sel.select(0.1):
            if mask & selectors.EVENT_READ:
                client.on_read(key.data)


# --- pipelined throughput: the harness side ------------------------------------------


@dataclass(frozen=True, slots=True)
class Throughput:
    messages_per_s: float
    per_conn: list[int]
    errors: list[str]


def run_throughput(
    path: str,
    target: Target,
    *,
    conns: int,
    procs: int,
    window: int,
    body: int,
    warmup: float,
    duration: float,
    on_window: Callable[[bool], None] | None = None,
) -> Throughput:
    """Spread ``conns`` connections over ``procs`` client processes and measure.

    ``on_window(True)`` is called when the measured window opens and
    ``on_window(False)`` when it closes, so the caller can sample the server.
    """
    procs = max(1, min(procs, conns))
    start_at = time.monotonic() + 0.5 + 0.1 * procs
    children: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(procs):
            share = conns // procs + (i < conns % procs)
            argv = [sys.executable, "-m", "benchmarks.load", "--path", path, "--target", target]
            argv += ["--conns", str(share), "--window", str(window), "--body", str(body)]
            argv += ["--start-at", repr(start_at), "--warmup", repr(warmup), "--duration", repr(duration)]
            children.append(
                subprocess.Popen(
                    argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True, cwd=ROOT
                )
            )
        if on_window is not None:
            time.sleep(max(0.0, start_at + warmup - time.monotonic()))
            on_window(True)
            time.sleep(max(0.0, start_at + warmup + duration - time.monotonic()))
            on_window(False)
        results = []
        for child in children:
            out, _ = child.communicate(timeout=warmup + duration + 30)
            if child.returncode != 0:
                raise BenchError(f"client process exited with {child.returncode}")
            results.append(json.loads(out))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    errors = [e for r in results for e in r["errors"]]
    errors += ["a client process connected after the start time"] * any(r["late"] for r in results)
    rate = sum(r["messages"] / r["elapsed"] for r in results if r["elapsed"] > 0)
    return Throughput(rate, [n for r in results for n in r["per_conn"]], errors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load")
    parser.add_argument("--path", required=True)
    parser.add_argument("--target", choices=["ipcd", "raw"], required=True)
    parser.add_argument("--conns", type=int, required=True)
    parser.add_argument("--window", type=int, required=True)
    parser.add_argument("--body", type=int, required=True)
    parser.add_argument("--start-at", type=float, required=True, help="time.monotonic() to start at")
    parser.add_argument("--warmup", type=float, required=True)
    parser.add_argument("--duration", type=float, required=True)
    args = parser.parse_args(argv)
    try:
        result = _client_main(args)
    except KeyboardInterrupt:
        return 130
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
