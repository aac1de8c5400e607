"""The echo scenarios: ipcd against the raw baseline, side by side in one run.

Theory of operation
-------------------
Both servers run at once for the whole benchmark (an idle epoll loop costs
nothing), each in its own socket dir; every scenario measures ipcd, then the
baseline, with the same client, the same bytes and the same settings, so the
ratio compares like with like on the same machine at the same moment.

- ``throughput``: many pipelining connections over several client
  processes; messages/s, MB/s, and the servers' CPU time per message (clients
  and servers share the cores, so CPU per message is the fairer efficiency
  figure when the machine is saturated).
- ``latency``: one stream connection, one request at a time.
- ``dgram``: one autobound datagram socket, one request at a time.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from benchmarks.load import BenchError, Target, Throughput, dgram_latency, run_throughput, stream_latency
from benchmarks.report import Table, latency_rows
from benchmarks.servers import Server, pinned

TARGETS: tuple[Target, Target] = ("ipcd", "raw")
CHUNKS = 5  # latency runs alternate between the servers this many times
_START = time.monotonic()


def progress(message: str) -> None:
    print(f"[bench {time.monotonic() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class Settings:
    workers: int
    conns: int
    client_procs: int
    window: int
    body: int
    warmup: float
    duration: float
    rounds: int
    startup_rounds: int


@dataclass(slots=True)
class Loaded:
    """A throughput run and the server's CPU time during its measured window."""

    result: Throughput
    cpu_s: float
    wall_s: float
    problems: list[str] = field(default_factory=list)

    @property
    def cpu_us_per_msg(self) -> float:
        messages = self.result.messages_per_s * self.wall_s
        return self.cpu_s / messages * 1e6 if messages else 0.0

    @property
    def fairness(self) -> float:
        """Slowest connection over the mean: 1.0 when every connection got the same."""
        counts = self.result.per_conn
        mean = sum(counts) / len(counts) if counts else 0
        return min(counts) / mean if mean else 0.0


def measure_throughput(server: Server, target: Target, s: Settings) -> Loaded:
    marks: list[tuple[float, float]] = []

    def on_window(_opening: bool) -> None:
        marks.append((time.monotonic(), server.cpu_seconds()))

    result = run_throughput(
        server.stream_path,
        target,
        conns=s.conns,
        procs=s.client_procs,
        window=s.window,
        body=s.body,
        warmup=s.warmup,
        duration=s.duration,
        on_window=on_window,
    )
    if not result.messages_per_s:
        raise BenchError(f"{server.name}: no reply completed in the window: {'; '.join(result.errors)}")
    (t0, cpu0), (t1, cpu1) = marks
    loaded = Loaded(result, cpu1 - cpu0, t1 - t0)
    loaded.problems += [f"{server.name} throughput: {e}" for e in result.errors]
    return loaded


def throughput(ipcd: Server, raw: Server, s: Settings, problems: list[str]) -> Table:
    table = Table(
        "throughput",
        f"echo, {s.conns} connections x window {s.window}, {s.body}-byte bodies, "
        f"{s.client_procs} client processes, {s.duration:g} s",
    )
    runs: dict[str, Loaded] = {}
    for server, target in zip((ipcd, raw), TARGETS, strict=True):
        progress(f"throughput: {server.name} ({s.warmup:g} s warm-up + {s.duration:g} s)")
        runs[target] = run = measure_throughput(server, target, s)
        problems += run.problems
        progress(f"throughput: {server.name}: {run.result.messages_per_s:,.0f} msg/s")
    a, b = runs["ipcd"], runs["raw"]
    unit = 16 + s.body
    table.add("messages/s", "msg/s", a.result.messages_per_s, b.result.messages_per_s, "higher")
    table.add(
        "MB/s each way",
        "MB/s",
        a.result.messages_per_s * unit / 1e6,
        b.result.messages_per_s * unit / 1e6,
        "higher",
    )
    table.add("server CPU per message", "us", a.cpu_us_per_msg, b.cpu_us_per_msg, "lower")
    table.add("slowest conn / mean conn", "", a.fairness, b.fairness, "higher")
    table.notes.append(
        f"server CPU busy during the window: ipcd {a.cpu_s / a.wall_s:.2f} cores, "
        f"raw {b.cpu_s / b.wall_s:.2f} cores (clients use the rest)"
    )
    table.notes.append(f"bytes per message each way: {unit} (16-byte header + body) for both servers")
    return table


def placements() -> list[tuple[str, int, int]]:
    """(label, server CPU, client CPU): same CPU, and across CPUs when there are two."""
    cpus = sorted(os.sched_getaffinity(0))
    out = [("same CPU", cpus[0], cpus[0])]
    if len(cpus) > 1:
        out.append(("cross CPU", cpus[1], cpus[0]))
    return out


PLACEMENT_NOTE = (
    "latency runs pin client and servers to CPUs (same / different): an unpinned pair lands on one or "
    f"two CPUs at random and a cross-CPU wake-up dominates the round trip; the two servers take turns "
    f"in {CHUNKS} chunks each, so drift and neighbours' load hit both alike"
)


def round_trips(
    pair: Sequence[tuple[Server, Target]], s: Settings, *, dgram: bool
) -> list[dict[str, list[int]]]:
    """Round-trip samples (ns) per placement, for each server of ``pair``, interleaved."""
    measure = dgram_latency if dgram else stream_latency
    per_chunk = max(1, s.rounds // CHUNKS)
    warmup = max(50, per_chunk // 20)
    body = b"x" * s.body
    results: list[dict[str, list[int]]] = [{} for _ in pair]
    for label, server_cpu, client_cpu in placements():
        with pinned([server for server, _ in pair], server_cpu, client_cpu):
            for _ in range(CHUNKS):
                for samples, (server, target) in zip(results, pair, strict=True):
                    path = server.dgram_path if dgram else server.stream_path
                    try:
                        got = measure(path, per_chunk, warmup, body, target)
                    except (BenchError, OSError) as exc:
                        raise BenchError(f"{server.name}, {label}: {exc}") from exc
                    samples.setdefault(label, []).extend(got)
    return results


def _latency(name: str, title: str, ipcd: Server, raw: Server, s: Settings, *, dgram: bool) -> Table:
    table = Table(name, title)
    progress(f"{name}: {s.rounds} round trips x {len(placements())} placements x 2 servers")
    a, b = round_trips(list(zip((ipcd, raw), TARGETS, strict=True)), s, dgram=dgram)
    for label in a:
        latency_rows(table, label, a[label], b[label])
    table.notes.append(PLACEMENT_NOTE)
    return table


def latency(ipcd: Server, raw: Server, s: Settings, problems: list[str]) -> Table:
    title = f"stream round trip, 1 connection, 1 request in flight, {s.body}-byte body, {s.rounds} rounds"
    return _latency("latency", title, ipcd, raw, s, dgram=False)


def dgram(ipcd: Server, raw: Server, s: Settings, problems: list[str]) -> Table:
    title = f"datagram round trip, autobound client, {s.body}-byte body, {s.rounds} rounds"
    return _latency("dgram", title, ipcd, raw, s, dgram=True)


def _idle(ipcd: Server, raw: Server, s: Settings, problems: list[str]) -> Table:
    from benchmarks.idle import idle  # noqa: PLC0415 - idle imports this module

    return idle(ipcd, raw, s, problems)


def _startup(ipcd: Server, raw: Server, s: Settings, problems: list[str]) -> Table:
    from benchmarks.startup import startup  # noqa: PLC0415 - startup imports this module

    return startup(ipcd, raw, s, problems)


def _handoff(ipcd: Server, raw: Server, s: Settings, problems: list[str]) -> Table:
    from benchmarks.handoff import handoff  # noqa: PLC0415 - handoff imports this module

    return handoff(ipcd, raw, s, problems)


def _connect(ipcd: Server, raw: Server, s: Settings, problems: list[str]) -> Table:
    from benchmarks.connect import connect  # noqa: PLC0415 - connect imports this module

    return connect(ipcd, raw, s, problems)


SCENARIOS: dict[str, Callable[[Server, Server, Settings, list[str]], Table]] = {
    "throughput": throughput,
    "latency": latency,
    "dgram": dgram,
    "idle": _idle,
    "handoff": _handoff,
    "startup": _startup,
    "connect": _connect,
}
