"""fd hand-off rate: ipcd's store against raw fd passing over a socketpair.

Theory of operation
-------------------
Both sides do the same job: a client hands an open fd (one end of a pipe)
to a holder and gets it back. ``put+take`` is one round trip each way per
operation (the fd goes to the holder, then comes back and the holder forgets
it); ``get`` asks for a duplicate of a held fd (the holder keeps its copy),
one at a time, and ``get, pipelined`` writes ``PIPELINE`` GETs before it reads
their answers (a client fetching fds for a pool of workers would). The
baseline holder is a forked Python process with a blocking loop on a
``socketpair`` speaking one-byte commands with ``socket.send_fds`` /
``recv_fds``: no framing, no JSON, no access checks, no worker in between.
ipcd's path is client -> worker -> master (the store) and back, with
credentials checked and quotas charged; the ratio says what that costs.

The client is C (``handoff_client.c``, built here with gcc) for both sides,
so that neither figure is the client's speed: a Python client spent more CPU
per GET than the raw holder. Rounds alternate between ipcd and the holder;
the table gives medians of the rounds, and server CPU per operation from
/proc (master and workers; the holder process).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
from pathlib import Path

from benchmarks.cbuild import compile_c
from benchmarks.echo import Settings, progress
from benchmarks.load import BenchError
from benchmarks.report import Table
from benchmarks.servers import Server
from ipcd.server.flow import FdBudget
from ipcd.settings import Settings as DaemonSettings

SOURCE = Path(__file__).with_name("handoff_client.c")
ROUNDS = 5
PIPELINE = 16
_TICK = os.sysconf("SC_CLK_TCK")
# (row label, client mode, requests written before reading)
_CASES = (("put+take pairs/s", "pairs", 1), ("get (dup received)/s", "gets", 1))
_PIPELINED = ("get, {depth} pipelined/s", "gets", PIPELINE)


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


def _compile(work: Path) -> Path:
    return compile_c(SOURCE, work / "handoff_client", "handoff")


def _process_cpu(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime stime


class _RawHolder:
    """The forked baseline holder and our end of its socketpair."""

    def __init__(self) -> None:
        self.ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.pid = os.fork()
        if self.pid == 0:
            self.ours.close()
            try:
                _raw_holder(theirs)
            finally:
                os._exit(0)
        theirs.close()

    def cpu_seconds(self) -> float:
        return _process_cpu(self.pid)

    def close(self) -> None:
        self.ours.close()  # EOF: the holder returns
        os.waitpid(self.pid, 0)


def _round(
    binary: Path, target: Server | _RawHolder, mode: str, depth: int, seconds: float
) -> tuple[float, float]:
    """(operations/s, server CPU seconds per operation) of one client run."""
    pass_fds: tuple[int, ...] = ()
    if isinstance(target, Server):
        argv = [str(binary), "ipcd", target.stream_path]
    else:
        argv, pass_fds = [str(binary), "raw", str(target.ours.fileno())], (target.ours.fileno(),)
    before = target.cpu_seconds()
    proc = subprocess.run(
        [*argv, mode, f"{seconds:g}", str(depth)],
        pass_fds=pass_fds,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    cpu = target.cpu_seconds() - before
    if proc.returncode != 0:
        raise BenchError(f"handoff: the client exited {proc.returncode}: {proc.stderr.strip()}")
    result = json.loads(proc.stdout)
    ops = int(result["ops"])
    if ops <= 0 or int(result["fds"]) < ops:
        raise BenchError(f"handoff: {ops} operations brought {result['fds']} fds")
    return ops / float(result["seconds"]), cpu / ops


def handoff(ipcd: Server, raw: Server, s: Settings, problems: list[str]) -> Table:
    seconds = max(s.duration / 3, 0.3)
    binary = _compile(Path(ipcd.socket_dir).parent)
    holder = _RawHolder()
    label, mode, depth = _PIPELINED
    cases = [*_CASES, (label.format(depth=depth), mode, depth)]
    results: dict[str, dict[str, list[tuple[float, float]]]] = {c[0]: {"ipcd": [], "raw": []} for c in cases}
    try:
        progress(f"handoff: {ROUNDS} rounds of {len(cases)} cases, {seconds:g} s each, ipcd and raw in turn")
        for target in (ipcd, holder):
            _round(binary, target, "gets", 1, 0.2)  # warm up both
        for _ in range(ROUNDS):
            for label, mode, depth in cases:
                for name, target in (("ipcd", ipcd), ("raw", holder)):
                    results[label][name].append(_round(binary, target, mode, depth, seconds))
    finally:
        holder.close()
    table = Table("handoff", f"fd hand-off, one C client, one fd per operation, median of {ROUNDS} rounds")
    for label, mode, _ in cases:
        rates = {name: statistics.median(r[0] for r in rounds) for name, rounds in results[label].items()}
        cpus = {
            name: statistics.median(r[1] for r in rounds) * 1e6 for name, rounds in results[label].items()
        }
        table.add(label, "ops/s", rates["ipcd"], rates["raw"], "higher")
        what = "pair" if mode == "pairs" else "GET"
        table.add(f"  server CPU per {what}", "us", cpus["ipcd"], cpus["raw"], "lower")
    fd_budget = FdBudget.from_settings(DaemonSettings())
    table.notes.append(
        "baseline: a forked Python holder on a socketpair with 1-byte commands and send_fds/recv_fds; "
        "ipcd's PUT and TAKE go client -> worker -> master store and back, with access checks and "
        "quotas; a GET is answered by the worker from its copy of the entry (its first GET of it "
        "through the master)"
    )
    table.notes.append(
        "server CPU: master and workers (ipcd) or the holder (raw), from /proc; by default a connection "
        f"has at most {fd_budget.budget // fd_budget.per_request} GETs' fds on their way to it (its fd "
        "budget), the rest wait in the kernel's buffer"
    )
    return table
