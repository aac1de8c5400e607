"""``send-pipe``: how fast a pipe of lines reaches a listener through ipcd.

What a script does: ``seq N | ipcctl send --room R`` while ``ipcctl listen
--json -n N --room R`` prints every message. The figure is N over the time
from starting the pipe to the listener's last line, so it includes
``ipcctl``'s start-up and the listener's printing, as a user would see it.
The baseline is the same lines posted one blocking round trip each (the
client library's ``say`` in a loop), the way ``ipcctl send`` used to post;
the ratio says what pipelining (a window of 128 in flight) buys. It runs
against a daemon with the default settings, whose per-uid rate limit
(5000 posts/s, bursts of 10000) is part of the figure, and again against one
with ``--rate-limit`` out of reach, which shows what the daemon sustains.
Two figures per run: until the sender exits (every line acknowledged) and
until the listener printed the last line. Every run checks that the
listener got all N lines, in order.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Final, NamedTuple

from benchmarks.echo import Settings, progress
from benchmarks.load import BenchError
from benchmarks.report import Table
from benchmarks.servers import Server
from ipcd.client import Client, ClientError

LINES: Final = 20_000
QUICK_LINES: Final = 5_000
NO_LIMIT: Final = "1000000000"
ROUND_TRIPS: Final = """\
import sys
from ipcd.client import Client
with Client(sys.argv[1]) as client:
    for line in sys.stdin:
        if line.strip():
            client.say(sys.argv[2], line.rstrip("\\n"))
"""
IPCCTL: Final = str(Path(sys.executable).parent / "ipcctl")


def _listening(socket_dir: Path, room: str) -> bool:
    try:
        with Client(socket_dir, timeout=5) as client:
            return bool(client.who(room))
    except ClientError:
        return False  # no such room yet


class Timing(NamedTuple):
    acked: float  # seconds until the sender exited: every line acknowledged
    delivered: float  # seconds until the listener printed the last line


def _deliver(socket_dir: Path, room: str, lines: int, sender: list[str]) -> Timing:
    """Timings of ``seq lines | sender`` posting to ``room`` while a listener prints it."""
    printed = socket_dir.parent / f"{socket_dir.name}-{room}.jsonl"
    with printed.open("w") as out:  # a file, not a pipe: the listener must never wait for us
        listener = subprocess.Popen(
            [IPCCTL, "--socket-dir", str(socket_dir), "listen", "--json", "-n", str(lines), "--room", room],
            stdout=out,
        )
    try:
        deadline = time.monotonic() + 10
        while not _listening(socket_dir, room):
            if time.monotonic() > deadline or listener.poll() is not None:
                raise BenchError(f"send-pipe: the listener did not join {room}")
            time.sleep(0.005)
        started = time.monotonic()
        seq = subprocess.Popen(["seq", str(lines)], stdout=subprocess.PIPE)
        posting = subprocess.Popen(sender, stdin=seq.stdout, stderr=subprocess.PIPE, text=True)
        assert seq.stdout is not None
        seq.stdout.close()  # the sender holds the read end now
        _, err = posting.communicate(timeout=300)
        acked = time.monotonic() - started
        listener.wait(timeout=300)
        delivered = time.monotonic() - started
        seq.wait(10)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    if posting.returncode != 0:
        raise BenchError(f"send-pipe: {shlex.join(sender)} exited {posting.returncode}: {err.strip()}")
    texts = [json.loads(line)["text"] for line in printed.read_text().splitlines()]
    if texts != [str(n) for n in range(1, lines + 1)]:
        raise BenchError(f"send-pipe: the listener got {len(texts)} of {lines} lines, or out of order")
    return Timing(acked, delivered)


def _measure(
    ipcd_command: list[str], work: Path, name: str, extra: list[str], lines: int, problems: list[str]
) -> tuple[Timing, Timing]:
    """``ipcctl send`` and one round trip per line, on a fresh daemon."""
    socket_dir = work / f"send-pipe-{name}"
    argv = [*ipcd_command, "--socket-dir", str(socket_dir), *extra]
    progress(f"send-pipe: starting ipcd: {shlex.join(argv)}")
    send = [IPCCTL, "--socket-dir", str(socket_dir), "send", "-r", "pipe"]
    trips = [sys.executable, "-c", ROUND_TRIPS, str(socket_dir), "trips"]
    with Server("ipcd", argv, socket_dir, work / f"send-pipe-{name}.log") as server:
        piped = _deliver(socket_dir, "pipe", lines, send)
        progress(f"send-pipe: {name}: ipcctl send {lines / piped.delivered:,.0f} lines/s")
        one_by_one = _deliver(socket_dir, "trips", lines, trips)
        progress(f"send-pipe: {name}: one round trip per line {lines / one_by_one.delivered:,.0f} lines/s")
        code = server.stop()
    if code != 0:
        problems.append(f"send-pipe: ipcd exited with {code} on SIGTERM (expected 0)")
    problems += [f"send-pipe: ipcd log: {line}" for line in server.complaints()]
    return piped, one_by_one


def scenario(work: Path, s: Settings, problems: list[str], ipcd_command: list[str]) -> Table:
    lines = QUICK_LINES if s.duration < 2 else LINES
    table = Table(
        "send-pipe",
        f"seq {lines} | ipcctl send, to an ipcctl listen (idle daemon, {s.workers} workers)",
        columns=("ipcctl send", "1 per trip"),
    )
    workers = ["--workers", str(s.workers)]
    runs: list[tuple[str, str, list[str]]] = [
        ("default", "default settings", []),
        ("no-limit", "--rate-limit out of reach", ["--rate-limit", NO_LIMIT]),
    ]
    for name, label, extra in runs:
        piped, one_by_one = _measure(ipcd_command, work, name, [*workers, *extra], lines, problems)
        table.add(
            f"{label}: acknowledged", "lines/s", lines / piped.acked, lines / one_by_one.acked, "higher"
        )
        table.add(
            f"{label}: at the listener",
            "lines/s",
            lines / piped.delivered,
            lines / one_by_one.delivered,
            "higher",
        )
    table.notes.append(
        "timed from starting the pipe, ipcctl's start-up included: 'acknowledged' until the sender exits, "
        "'at the listener' until ipcctl listen --json printed the last line (every line checked, once, in "
        "order); baseline: the client library's say() in a loop, one round trip per line"
    )
    return table
