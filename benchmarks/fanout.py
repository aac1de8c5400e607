"""Chat fan-out: one publisher, many subscribers; ipcd rooms beside Redis pub/sub.

Theory of operation
-------------------
One publisher connection pipelines small messages to a room (ipcd: SAY
frames; Redis: PUBLISH over RESP) keeping at most ``WINDOW`` unanswered;
10, then 100, subscribers spread over two subscriber processes count what
arrives. Both servers run during the whole scenario and take turns, so the
ratio compares them on the same machine at the same moment. The figure is
*deliveries per second*: messages received, summed over all subscribers,
inside a fixed window after a warm-up.

Every delivery is checked: each subscriber must see every message exactly
once and in sequence order (ipcd's room ``seq``; Redis has none, so the
payload's own sequence number), and after the run every subscriber must
have the last message. Gaps, repeats and misses are reported as problems.

The loop is closed: subscriber processes publish, in a small shared file,
the lowest sequence number all their subscribers have reached, and the
publisher never runs more than ``MAX_LAG`` messages ahead of it. Without
that, a server faster than the Python subscribers would queue without
bound until it cut them off (ipcd's ``max_outbuf``, Redis's
``client-output-buffer-limit pubsub``), and the figure would say nothing.
The CPU the clients used is printed, so a client-bound figure shows.

Latency is measured apart from throughput, on an unloaded server: after the
window the publisher waits for every subscriber to catch up, then sends
``PACED_RATE`` messages a second, each carrying its ``CLOCK_MONOTONIC`` send
time (the clock is system-wide); a subscriber stamps each recv() it decodes
them from, so a figure includes the whole path to user space of the last
subscriber served.

ipcd slows each uid down to 5000 chat posts a second by default, which
would make this a benchmark of the limiter; the daemon under test (the
harness's ``--ipcd`` command) runs with ``--rate-limit`` raised out of reach
and nothing else changed. Run by the harness; the ``sub`` and ``pub``
subcommands are its client processes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import mmap
import os
import select
import selectors
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, Literal

from benchmarks import ROOT
from benchmarks.echo import Settings, progress
from benchmarks.load import BenchError
from benchmarks.report import Table
from benchmarks.servers import Server, ServerError
from ipcd.protocol import Op, RemoteProtocolError, decode_error, reply_op
from ipcd.protocol.frames import HEADER, HEADER_SIZE, MAGIC, VERSION

Target = Literal["ipcd", "redis"]
SUBSCRIBERS: Final = (10, 100)
PAYLOAD: Final = 32  # bytes of message text: "%010d %020d" % (seq, send time) + marker
WINDOW: Final = 64  # unanswered publishes
MAX_LAG: Final = 2048  # messages the publisher may run ahead of the slowest subscriber
PACED_RATE: Final = 200  # messages/s of the latency phase
DRAIN_TIMEOUT: Final = 5.0
RECV_SIZE: Final = 65536
RATE_LIMIT: Final = "1000000000"  # ipcd's chat posts/s per uid: never reached
_LENGTH: Final = struct.Struct("!I")
_TICK: Final = os.sysconf("SC_CLK_TCK")
_BULK, _PACED = ord("."), ord("L")  # last payload byte: whether to time this message
_TEXT_AT: Final = len(b',"text":"')  # after the comma that ends "seq":N (keys are sorted)
_PONG_PREFIX: Final = HEADER.pack(MAGIC, VERSION, Op.PONG, 0, 0, 0, 0, 0)[:8]


def payload(seq: int, marker: int) -> bytes:
    return b"%010d %020d%c" % (seq, time.monotonic_ns(), marker)


def _error_text(body: bytes) -> str:
    try:
        code, message = decode_error(body)
    except RemoteProtocolError:
        return f"an undecodable ERROR frame {body[:64]!r}"
    return f"error {code}: {message}"


def _resp(*words: bytes) -> bytes:
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)


# --- subscribers -------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Sub:
    sock: socket.socket
    rest: bytes = b""
    next: int = 1  # sequence number expected next
    received: int = 0
    counted: int = 0  # received inside the measured window
    gaps: int = 0  # messages skipped over
    backwards: int = 0  # repeated or out of order
    failed: str = ""


Parser = Callable[[_Sub, bytes, int, bool, list[int]], None]


def _check(sub: _Sub, seq: int, counting: bool) -> None:
    if seq == sub.next:
        sub.next += 1
    elif seq > sub.next:
        sub.gaps += seq - sub.next
        sub.next = seq + 1
    else:
        sub.backwards += 1
    sub.received += 1
    if counting:
        sub.counted += 1


def _parse_ipcd(sub: _Sub, data: bytes, now_ns: int, counting: bool, lat: list[int]) -> None:
    """MESSAGE frames: the header by offset, ``seq`` and the payload from the
    JSON body by search (its keys are sorted: ...,"seq":N,"text":"...")."""
    buf = sub.rest + data if sub.rest else data
    n, pos = len(buf), 0
    while n - pos >= HEADER_SIZE:
        end = pos + HEADER_SIZE + _LENGTH.unpack_from(buf, pos + 12)[0]
        if end > n:
            break
        if not buf.startswith(b"IP\x01", pos):
            sub.failed = f"not an ipcd frame: {buf[pos : pos + 16]!r}"
            return
        op = buf[pos + 3]
        if op == Op.MESSAGE:
            i = buf.find(b'"seq":', pos + HEADER_SIZE, end) + 6
            j = buf.find(b",", i, end)
            _check(sub, int(buf[i:j]), counting)
            text = j + _TEXT_AT
            if buf[text + 31] == _PACED:
                lat.append(now_ns - int(buf[text + 11 : text + 31]))
        elif op == Op.PING:
            sub.sock.sendall(_PONG_PREFIX + buf[pos + 8 : end])
        elif op == Op.ERROR:
            sub.failed = f"cut off: {_error_text(buf[pos + HEADER_SIZE : end])}"
            return
        elif op != Op.NOTICE:
            sub.failed = f"unexpected frame op 0x{op:02x}"
            return
        pos = end
    sub.rest = buf[pos:]


def _redis_parser(channel: bytes) -> Parser:
    prefix = b"*3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$%d\r\n" % (len(channel), channel, PAYLOAD)
    start, size = len(prefix), len(prefix) + PAYLOAD + 2

    def parse(sub: _Sub, data: bytes, now_ns: int, counting: bool, lat: list[int]) -> None:
        buf = sub.rest + data if sub.rest else data
        n, pos = len(buf), 0
        while n - pos >= size:
            if not buf.startswith(prefix, pos):
                sub.failed = f"unexpected reply {buf[pos : pos + 64]!r}"
                return
            p = pos + start
            _check(sub, int(buf[p : p + 10]), counting)
            if buf[p + 31] == _PACED:
                lat.append(now_ns - int(buf[p + 11 : p + 31]))
            pos += size
        sub.rest = buf[pos:]

    return parse


def _recv_until(sock: socket.socket, done: Callable[[bytes], int]) -> bytes:
    """Read until ``done(data)`` returns how many bytes make the answer
    (0: not yet); returns what follows it."""
    data = b""
    while not (used := done(data)):
        chunk = sock.recv(RECV_SIZE)
        if not chunk:
            raise BenchError(f"the server closed a subscriber after {data[:80]!r}")
        data += chunk
    return data[used:]


def _subscribe_ipcd(sock: socket.socket, room: bytes) -> bytes:
    body = b'{"room":"%s"}' % room
    sock.sendall(HEADER.pack(MAGIC, VERSION, Op.JOIN, 0, 0, 0, 1, len(body)) + body)

    def joined(data: bytes) -> int:
        pos = 0
        while len(data) - pos >= HEADER_SIZE:
            end = pos + HEADER_SIZE + int(_LENGTH.unpack_from(data, pos + 12)[0])
            if end > len(data):
                return 0
            if data[pos + 3] == Op.JOIN_REPLY:
                return end
            if data[pos + 3] == Op.ERROR:
                raise BenchError(f"JOIN refused: {_error_text(data[pos + HEADER_SIZE : end])}")
            pos = end  # a NOTICE of someone else's join
        return 0

    return _recv_until(sock, joined)


def _subscribe_redis(sock: socket.socket, channel: bytes) -> bytes:
    sock.sendall(_resp(b"SUBSCRIBE", channel))
    want = b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:1\r\n" % (len(channel), channel)

    def subscribed(data: bytes) -> int:
        if len(data) >= len(want) and not data.startswith(want):
            raise BenchError(f"SUBSCRIBE answered {data[:80]!r}")
        return len(want) if len(data) >= len(want) else 0

    return _recv_until(sock, subscribed)


def _sub_main(args: argparse.Namespace) -> dict[str, Any]:
    name = args.name.encode()
    parse: Parser = _parse_ipcd if args.target == "ipcd" else _redis_parser(name)
    subscribe = _subscribe_ipcd if args.target == "ipcd" else _subscribe_redis
    subs: list[_Sub] = []
    for _ in range(args.conns):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        subs.append(_Sub(sock))
        sock.settimeout(DRAIN_TIMEOUT)
        sock.connect(args.path)
        subs[-1].rest = subscribe(sock, name)
        sock.setblocking(False)
    sel = selectors.DefaultSelector()
    for sub in subs:
        sel.register(sub.sock, selectors.EVENT_READ, sub)
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, None)
    with open(args.lag_file, "r+b") as fh:
        shared = mmap.mmap(fh.fileno(), 0)
    slot = 8 * args.slot
    print("ready", flush=True)

    t_from = t_to = 1 << 62  # until the harness says when the publisher starts
    pending = b""  # from stdin: the start time, then how many messages were published
    cpu: list[float] = []
    lat: list[int] = []
    total: int | None = None
    deadline = 0
    live = subs
    while True:
        events = sel.select(0.05)
        now = time.monotonic_ns()
        counting = t_from <= now < t_to
        if len(cpu) < 2 and now >= (t_to if cpu else t_from):
            cpu.append(time.process_time())
        for key, _ in events:
            sub = key.data
            if sub is None:
                got = os.read(sys.stdin.fileno(), 256)
                if not got:
                    if total is None:
                        return {"error": "the harness went away"}
                    sel.unregister(sys.stdin.fileno())
                pending += got
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    if t_from == 1 << 62:
                        t_from = int((float(line) + args.warmup) * 1e9)
                        t_to = t_from + int(args.duration * 1e9)
                    else:
                        total = int(line)
                        deadline = now + int(DRAIN_TIMEOUT * 1e9)
                continue
            try:
                data = sub.sock.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                sub.failed = f"recv failed: {exc}"
            else:
                if data:
                    parse(sub, data, now, counting, lat)
                else:
                    sub.failed = sub.failed or f"the server closed it after {sub.received} messages"
            if sub.failed:
                sel.unregister(sub.sock)
                live = [s for s in live if not s.failed]
        reached = min((s.next for s in live), default=1 << 62) - 1
        struct.pack_into("<q", shared, slot, reached)
        if total is not None and (reached >= total or now > deadline):
            break
    for sub in subs:
        sub.sock.close()
    total = total or 0
    return {
        "counted": sum(s.counted for s in subs),
        "received": sum(s.received for s in subs),
        "gaps": sum(s.gaps for s in subs),
        "backwards": sum(s.backwards for s in subs),
        "short": sum(1 for s in subs if s.next <= total),
        "missing": sum(max(0, total - (s.next - 1)) for s in subs),
        "failed": [s.failed for s in subs if s.failed][:3],
        "cpu": cpu[1] - cpu[0] if len(cpu) == 2 else 0.0,
        "latency_ns": lat,
    }


# --- the publisher -----------------------------------------------------------------


def _ipcd_publisher(room: bytes) -> tuple[Callable[[int, int], bytes], Callable[[bytes], tuple[int, int]]]:
    """(encode one SAY, count the answers in a buffer: (answers, bytes used))."""
    say_reply = reply_op(Op.SAY)

    def encode(seq: int, marker: int) -> bytes:
        body = b'{"room":"%s","text":"%s"}' % (room, payload(seq, marker))
        return HEADER.pack(MAGIC, VERSION, Op.SAY, 0, 0, 0, seq, len(body)) + body

    def answers(buf: bytes) -> tuple[int, int]:
        n, pos, count = len(buf), 0, 0
        while n - pos >= HEADER_SIZE:
            end = pos + HEADER_SIZE + _LENGTH.unpack_from(buf, pos + 12)[0]
            if end > n:
                break
            if buf[pos + 3] != say_reply:
                raise BenchError(f"SAY answered: {_error_text(buf[pos + HEADER_SIZE : end])}")
            count += 1
            pos = end
        return count, pos

    return encode, answers


def _redis_publisher(
    channel: bytes, subscribers: int
) -> tuple[Callable[[int, int], bytes], Callable[[bytes], tuple[int, int]]]:
    head = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n" % (len(channel), channel, PAYLOAD)
    reply = b":%d\r\n" % subscribers

    def encode(seq: int, marker: int) -> bytes:
        return head + payload(seq, marker) + b"\r\n"

    def answers(buf: bytes) -> tuple[int, int]:
        count = len(buf) // len(reply)
        if buf[: count * len(reply)] != reply * count:
            raise BenchError(f"PUBLISH answered {buf[:80]!r}, expected {reply!r} (receivers)")
        return count, count * len(reply)

    return encode, answers


def _pub_main(args: argparse.Namespace) -> dict[str, Any]:
    name = args.name.encode()
    if args.target == "ipcd":
        encode, answers = _ipcd_publisher(name)
    else:
        encode, answers = _redis_publisher(name, args.subscribers)
    with open(args.lag_file, "r+b") as fh:
        shared = mmap.mmap(fh.fileno(), 0)
    reached_fmt = struct.Struct(f"<{args.procs}q")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(DRAIN_TIMEOUT)
    sock.connect(args.path)
    sent = answered = 0
    rest = b""

    def collect() -> None:
        nonlocal answered, rest
        data = sock.recv(RECV_SIZE)
        if not data:
            raise BenchError(f"the server closed the publisher after {answered} answers")
        buf = rest + data if rest else data
        count, used = answers(buf)
        answered += count
        rest = buf[used:]

    def reached() -> int:
        return int(min(reached_fmt.unpack_from(shared)))

    time.sleep(max(0.0, args.start_at - time.monotonic()))
    window = (args.start_at + args.warmup, args.start_at + args.warmup + args.duration)
    cpu: list[float] = []  # process time at the edges of the measured window
    held = 0.0  # seconds in the window held back by the slowest subscriber
    first = 0  # messages sent before the window
    while (now := time.monotonic()) < window[1]:
        if not cpu and now >= window[0]:
            cpu.append(time.process_time())
            first = sent
        room = min(WINDOW - (sent - answered), MAX_LAG - (sent - reached()))
        if room > 0:
            sock.sendall(b"".join([encode(seq, _BULK) for seq in range(sent + 1, sent + room + 1)]))
            sent += room
        if sent > answered:
            collect()
        else:
            time.sleep(0.0002)  # the subscribers are behind
            if cpu:
                held += time.monotonic() - now
    cpu.append(time.process_time())
    in_window = sent - first
    while answered < sent:
        collect()
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while reached() < sent and time.monotonic() < deadline:
        time.sleep(0.001)
    paced_from = time.monotonic()
    for i in range(int(args.paced * PACED_RATE)):
        time.sleep(max(0.0, paced_from + i / PACED_RATE - time.monotonic()))
        sent += 1
        sock.sendall(encode(sent, _PACED))
        while answered < sent:
            collect()
    sock.close()
    busy = cpu[-1] - cpu[0] if len(cpu) == 2 else 0.0
    duration = args.duration
    return {"published": sent, "rate": in_window / duration, "cpu": busy / duration, "held": held / duration}


# --- the daemon under test -----------------------------------------------------------


def _redis_ping(path: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2)
                sock.connect(path)
                sock.sendall(_resp(b"PING"))
                answer = sock.recv(64)
        except OSError as exc:
            answer = str(exc).encode()
        if answer == b"+PONG\r\n":
            return
        if time.monotonic() > deadline:
            raise ServerError(f"redis did not answer PING: {answer!r}")
        time.sleep(0.05)


def _redis_server(work: Path, stack: contextlib.ExitStack) -> Server | str:
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
        _redis_ping(server.stream_path)
    except (ServerError, OSError) as exc:
        server.stop()
        return f"redis-server did not start: {exc}"
    return server


# --- the harness -------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Run:
    deliveries_per_s: float
    cpu_us_per_delivery: float
    latency_ns: list[int]
    published_per_s: float
    sub_cpu: float  # cores used by the subscriber processes in the window
    server_cpu: float
    machine_cpu: float  # cores busy on the whole machine in the window
    pub_cpu: float
    held: float  # share of the time the publisher waited for the slowest subscriber
    spread: str


def _spawn(kind: str, argv: list[str]) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "benchmarks.fanout", kind, *argv]
    return subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        bufsize=0,
        start_new_session=True,  # a Ctrl-C reaches only the harness, which ends them
        cwd=ROOT,
    )


def _ready(proc: subprocess.Popen[bytes], deadline: float) -> None:
    assert proc.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        readable, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        chunk = proc.stdout.read(1) if readable else b""
        if not chunk:
            raise BenchError(f"a subscriber process did not get ready (exit code {proc.poll()})")
        line += chunk


def _result(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise BenchError(f"a client process exited with {proc.returncode}")
    result: dict[str, Any] = json.loads(out)
    if "error" in result:
        raise BenchError(result["error"])
    return result


@contextlib.contextmanager
def _reaped(procs: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()


def _ipcd_spread(server: Server, subs: int, room: str, problems: list[str]) -> str:
    from ipcd.client import Client  # noqa: PLC0415

    deadline = time.monotonic() + 2
    with Client(server.socket_dir, timeout=5) as client:
        while True:  # a worker reports its count on change; give it a moment
            status = client.status()
            if status["totals"]["connections"] >= subs + 1 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        members = len(client.who(room))
    mine = status.get("served_by")
    per = [w["connections"] - (w["pid"] == mine) for w in status["workers"]]
    if members != subs:
        problems.append(f"ipcd, {subs} subscribers: the room has {members} members")
    if len(per) > 1 and subs >= len(per) and min(per) == 0:
        problems.append(f"ipcd, {subs} subscribers: a worker holds none of them ({per})")
    return " + ".join(map(str, per))


def _redis_spread(server: Server, subs: int, channel: str, problems: list[str]) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(server.stream_path)
        sock.sendall(_resp(b"PUBSUB", b"NUMSUB", channel.encode()))
        answer = sock.recv(256)
    if not answer.endswith(b":%d\r\n" % subs):
        problems.append(f"redis, {subs} subscribers: PUBSUB NUMSUB said {answer!r}")
    return "one event loop"


def measure(server: Server, target: Target, subs: int, s: Settings, work: Path, problems: list[str]) -> Run:
    name = f"fanout{subs}"
    procs = max(1, min(2, os.cpu_count() or 1, subs))
    paced = 0.5 if s.duration < 2 else 1.0
    lag_file = work / f"lag-{target}-{subs}"
    lag_file.write_bytes(bytes(8 * procs))
    where = ["--target", target, "--path", server.stream_path, "--name", name, "--lag-file", str(lag_file)]
    timing = ["--warmup", repr(s.warmup), "--duration", repr(s.duration)]
    children: list[subprocess.Popen[bytes]] = []
    with _reaped(children):
        deadline = time.monotonic() + 15
        for i in range(procs):
            share = subs // procs + (i < subs % procs)
            children.append(_spawn("sub", [*where, *timing, "--conns", str(share), "--slot", str(i)]))
        for child in children:
            _ready(child, deadline)
        spread = (_ipcd_spread if target == "ipcd" else _redis_spread)(server, subs, name, problems)
        start_at = time.monotonic() + 0.3
        for child in children:
            assert child.stdin is not None
            child.stdin.write(b"%r\n" % start_at)
        pub_args = [*where, "--subscribers", str(subs), "--procs", str(procs), "--paced", repr(paced)]
        publisher = _spawn("pub", [*pub_args, "--start-at", repr(start_at), *timing])
        children.append(publisher)
        marks = []
        for edge in (start_at + s.warmup, start_at + s.warmup + s.duration):
            time.sleep(max(0.0, edge - time.monotonic()))
            marks.append((time.monotonic(), server.cpu_seconds(), _machine_busy()))
        pub = _result(publisher, timeout=paced + 3 * DRAIN_TIMEOUT + 10)
        for child in children[:-1]:
            assert child.stdin is not None
            child.stdin.write(b"%d\n" % pub["published"])
        results = [_result(child, DRAIN_TIMEOUT + 10) for child in children[:-1]]
    label = f"{target}, {subs} subscribers"
    for r in results:
        for key, what in (("gaps", "skipped"), ("backwards", "repeated or out of order")):
            if r[key]:
                problems.append(f"{label}: {r[key]} messages {what}")
        if r["short"]:
            problems.append(f"{label}: {r['short']} subscribers missed {r['missing']} messages by the end")
        problems += [f"{label}: {reason}" for reason in r["failed"]]
    (t0, cpu0, busy0), (t1, cpu1, busy1) = marks
    deliveries = sum(r["counted"] for r in results)
    rate = deliveries / s.duration
    return Run(
        deliveries_per_s=rate,
        cpu_us_per_delivery=(cpu1 - cpu0) / deliveries * 1e6 if deliveries else 0.0,
        latency_ns=[n for r in results for n in r["latency_ns"]],
        published_per_s=pub["rate"],
        sub_cpu=sum(r["cpu"] for r in results) / (t1 - t0),
        server_cpu=(cpu1 - cpu0) / (t1 - t0),
        machine_cpu=(busy1 - busy0) / (t1 - t0),
        pub_cpu=pub["cpu"],
        held=pub["held"],
        spread=spread,
    )


def _machine_busy() -> float:
    """CPU seconds the whole machine has been busy since boot (``/proc/stat``)."""
    with open("/proc/stat") as fh:
        fields = [int(f) for f in fh.readline().split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / _TICK  # all but idle and iowait


def _pct(samples: list[int], q: float) -> float:
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] / 1000


def scenario(work: Path, s: Settings, problems: list[str], ipcd_command: list[str]) -> Table:
    """``ipcd_command`` serves ipcd (``ipcd serve``); options are appended."""
    procs = max(1, min(2, os.cpu_count() or 1))
    table = Table(
        "fanout",
        f"chat fan-out, 1 publisher (window {WINDOW}), subscribers in {procs} processes, "
        f"{PAYLOAD}-byte messages, {s.duration:g} s after {s.warmup:g} s warm-up",
        columns=("ipcd", "redis"),
    )
    runs: dict[tuple[Target, int], Run] = {}
    with contextlib.ExitStack() as stack:
        sock_dir = work / "fanout-ipcd"
        argv = [*ipcd_command, "--socket-dir", str(sock_dir), "--workers", str(s.workers)]
        argv += ["--rate-limit", RATE_LIMIT]
        progress(f"fanout: starting ipcd: {shlex.join(argv)}")
        ipcd = stack.enter_context(Server("ipcd", argv, sock_dir, work / "fanout-ipcd.log"))
        redis = _redis_server(work, stack)
        if isinstance(redis, str):
            progress(f"fanout: {redis}; ipcd alone")
            table.notes.append(f"no Redis column: {redis}")
            servers: list[tuple[Target, Server]] = [("ipcd", ipcd)]
        else:
            servers = [("ipcd", ipcd), ("redis", redis)]
        for subs in SUBSCRIBERS:
            for target, server in servers:
                progress(f"fanout: {target}, {subs} subscribers")
                try:
                    runs[target, subs] = run = measure(server, target, subs, s, work, problems)
                except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
                    problems.append(f"fanout: {target}, {subs} subscribers: {exc}")
                    continue
                where = f" (subscribers per worker: {run.spread})" if target == "ipcd" else ""
                progress(
                    f"fanout: {target}, {subs} subscribers: {run.deliveries_per_s:,.0f} deliveries/s{where}"
                )
        code = ipcd.stop()
        if code != 0:
            problems.append(f"fanout: ipcd exited with {code} on SIGTERM (expected 0)")
        problems += [f"fanout: ipcd log: {line}" for line in ipcd.complaints()]
    rows: list[tuple[str, str, Callable[[Run], float], Literal["higher", "lower"]]] = [
        ("deliveries/s", "msg/s", lambda r: r.deliveries_per_s, "higher"),
        ("server CPU per delivery", "us", lambda r: r.cpu_us_per_delivery, "lower"),
        (f"latency p50 @{PACED_RATE} msg/s", "us", lambda r: _pct(r.latency_ns, 0.5), "lower"),
        (f"latency p99 @{PACED_RATE} msg/s", "us", lambda r: _pct(r.latency_ns, 0.99), "lower"),
    ]
    for subs in SUBSCRIBERS:
        a, b = runs.get(("ipcd", subs)), runs.get(("redis", subs))
        if a is None:
            continue  # the reason is among the problems
        for metric, unit, pick, better in rows:
            table.add(f"{subs} subs: {metric}", unit, pick(a), pick(b) if b else None, better)
    for subs in SUBSCRIBERS:
        for target in ("ipcd", "redis"):
            got = runs.get((target, subs))
            if got is not None:
                rest = max(0.0, got.machine_cpu - got.server_cpu - got.sub_cpu - got.pub_cpu)
                table.notes.append(
                    f"{target}, {subs} subs: {got.published_per_s:,.0f} messages/s published; "
                    f"cores busy {got.machine_cpu:.2f} of {os.cpu_count()}: server {got.server_cpu:.2f}, "
                    f"subscribers {got.sub_cpu:.2f}, publisher {got.pub_cpu:.2f}, anything else {rest:.2f}; "
                    f"publisher held back by subscribers {got.held:.0%} of the time"
                    + (f"; subscribers per worker (from status): {got.spread}" if target == "ipcd" else "")
                )
    table.notes.append(
        f"closed loop: the publisher runs at most {MAX_LAG} messages ahead of the slowest subscriber; "
        "every subscriber checked for every message, once, in order"
    )
    table.notes.append(
        f"ipcd runs with --rate-limit {RATE_LIMIT} (the default, 5000 posts/s per uid, would cap the "
        f"publisher); latency: publish to subscriber recv() at {PACED_RATE} messages/s, after the window"
    )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fanout")
    parser.add_argument("kind", choices=["sub", "pub"])
    parser.add_argument("--target", choices=["ipcd", "redis"], required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--name", required=True, help="room or channel")
    parser.add_argument("--lag-file", required=True)
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--slot", type=int, default=0)
    parser.add_argument("--subscribers", type=int, default=0)
    parser.add_argument("--procs", type=int, default=1)
    parser.add_argument("--start-at", type=float, default=0.0, help="publisher: time.monotonic() to start")
    parser.add_argument("--warmup", type=float, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--paced", type=float, default=0.0)
    args = parser.parse_args(argv)
    try:
        result = _sub_main(args) if args.kind == "sub" else _pub_main(args)
    except KeyboardInterrupt:
        return 130
    except (BenchError, OSError) as exc:
        result = {"error": f"{args.kind}: {exc}"}
    sys.stdout.write(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
