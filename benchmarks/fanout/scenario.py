"""The fan-out scenario: rounds of ipcd and Redis in turn, and the table.

Theory of operation
-------------------
Both servers run during the whole scenario and take turns, round after
round (who goes first rotates), 10 subscribers and then 100 in each, so a burst of load from
elsewhere on the machine hits both columns alike; the table gives the
median of the rounds. Every round uses a fresh room (ipcd's sequence
numbers start at 1 in it) and channel. The notes give, per server, the
cores busy by role in the measured window, so it shows whether the server
or a client was the limit.

A second ipcd runs beside them with ``--state-dir ''`` (no history
journal), in the same rounds: the ``fanout-retention`` table is what
keeping history across restarts costs fan-out (the journal write per loop
pass), ipcd as configured by default against ipcd without it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Final, Literal

from benchmarks.echo import Settings, progress
from benchmarks.fanout import clients, ipcd, redis
from benchmarks.fanout.run import MAX_LAG, PACED_RATE, PAYLOAD, WINDOW, Run, Target, measure, subscriber_procs
from benchmarks.load import BenchError
from benchmarks.report import Table
from benchmarks.servers import Server

SUBSCRIBERS: Final = (10, 100)


def _rounds(s: Settings) -> int:
    return 3 if s.duration < 2 else 5


def _pct(samples: list[int], q: float) -> float:
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] / 1000


def _median(runs: list[Run], pick: Callable[[Run], float]) -> float:
    return statistics.median(pick(r) for r in runs)


NO_STATE: Final = "ipcd, no journal"  # the second ipcd: --state-dir ''


def _play(
    binary: Path, servers: list[tuple[str, Target, Server]], s: Settings, problems: list[str]
) -> dict[tuple[str, int], list[Run]]:
    runs: dict[tuple[str, int], list[Run]] = {}
    rounds = _rounds(s)
    for i in range(1, rounds + 1):
        turn = servers[(i - 1) % len(servers) :] + servers[: (i - 1) % len(servers)]  # who goes first rotates
        for subs in SUBSCRIBERS:
            for key, target, server in turn:
                label = f"{key}, {subs} subscribers, round {i} of {rounds}"
                try:
                    run = measure(binary, server, target, subs, f"fanout{subs}-{i}", s, problems)
                except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
                    problems.append(f"fanout: {label}: {exc}")
                    continue
                runs.setdefault((key, subs), []).append(run)
                where = f" (subscribers per worker: {run.spread})" if target == "ipcd" else ""
                progress(
                    f"fanout: {label}: {run.deliveries_per_s:,.0f} deliveries/s, "
                    f"server {run.server_cpu:.2f} cores, clients {run.sub_cpu + run.pub_cpu:.2f}{where}"
                )
    return runs


def scenario(work: Path, s: Settings, problems: list[str], ipcd_command: list[str]) -> list[Table]:
    """``ipcd_command`` serves ipcd (``ipcd serve``); options are appended.
    The fan-out table, and the retention table (ipcd with and without its
    history journal)."""
    binary = clients.compile_client(work)
    table = Table(
        "fanout",
        f"chat fan-out, 1 C publisher (window {WINDOW}), C subscribers in {subscriber_procs()} processes, "
        f"{PAYLOAD}-byte messages, {s.duration:g} s after {s.warmup:g} s warm-up, "
        f"median of {_rounds(s)} interleaved rounds",
        columns=("ipcd", "redis"),
    )
    with contextlib.ExitStack() as stack:
        sock_dir = work / "fanout-ipcd"
        argv = ipcd.argv(ipcd_command, sock_dir, s.workers)
        progress(f"fanout: starting ipcd: {shlex.join(argv)}")
        ipcd_server = stack.enter_context(Server("ipcd", argv, sock_dir, work / "fanout-ipcd.log"))
        bare_dir = work / "fanout-ipcd-nostate"
        bare_argv = [*ipcd.argv(ipcd_command, bare_dir, s.workers), "--state-dir", ""]
        bare = stack.enter_context(Server(NO_STATE, bare_argv, bare_dir, work / "fanout-ipcd-nostate.log"))
        redis_server = redis.start(work, stack)
        servers: list[tuple[str, Target, Server]] = [("ipcd", "ipcd", ipcd_server), (NO_STATE, "ipcd", bare)]
        if isinstance(redis_server, str):
            progress(f"fanout: {redis_server}; ipcd alone")
            table.notes.append(f"no Redis column: {redis_server}")
        else:
            servers.append(("redis", "redis", redis_server))
        runs = _play(binary, servers, s, problems)
        for name, server in (("ipcd", ipcd_server), (NO_STATE, bare)):
            code = server.stop()
            if code != 0:
                problems.append(f"fanout: {name} exited with {code} on SIGTERM (expected 0)")
            problems += [f"fanout: {name} log: {line}" for line in server.complaints()]
    _fill(table, runs)
    return [table, _retention(runs, s)]


def _retention(runs: dict[tuple[str, int], list[Run]], s: Settings) -> Table:
    table = Table(
        "fanout-retention",
        "what keeping history across restarts costs fan-out: the same rounds, ipcd as configured "
        f"(its history journal in a state dir) beside ipcd with --state-dir '', median of {_rounds(s)}",
        columns=("ipcd", "no journal"),
    )
    for subs in SUBSCRIBERS:
        a, b = runs.get(("ipcd", subs)), runs.get((NO_STATE, subs))
        if a is None or b is None:
            continue
        table.add(
            f"{subs} subs: deliveries/s",
            "msg/s",
            _median(a, lambda r: r.deliveries_per_s),
            _median(b, lambda r: r.deliveries_per_s),
            "higher",
        )
        table.add(
            f"{subs} subs: server CPU per delivery",
            "us",
            _median(a, lambda r: r.cpu_us_per_delivery),
            _median(b, lambda r: r.cpu_us_per_delivery),
            "lower",
        )
    table.notes.append("the target (issue 11): retention costs fan-out less than 10%, a ratio of 0.9 or more")
    return table


def _fill(table: Table, runs: dict[tuple[str, int], list[Run]]) -> None:
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
            table.add(
                f"{subs} subs: {metric}", unit, _median(a, pick), _median(b, pick) if b else None, better
            )
    for subs in SUBSCRIBERS:
        for target in ("ipcd", "redis"):
            got = runs.get((target, subs))
            if got is None:
                continue
            machine, server = _median(got, lambda r: r.machine_cpu), _median(got, lambda r: r.server_cpu)
            subscribers, publisher = _median(got, lambda r: r.sub_cpu), _median(got, lambda r: r.pub_cpu)
            rest = max(0.0, machine - server - subscribers - publisher)
            published = _median(got, lambda r: r.published_per_s)
            table.notes.append(
                f"{target}, {subs} subs: {published:,.0f} messages/s published; "
                f"cores busy {machine:.2f} of {os.cpu_count()}: server {server:.2f}, "
                f"subscribers {subscribers:.2f}, publisher {publisher:.2f}, anything else {rest:.2f}; "
                f"publisher held back by subscribers {_median(got, lambda r: r.held):.0%} of the time"
                + (f"; subscribers per worker (from status): {got[-1].spread}" if target == "ipcd" else "")
            )
    table.notes.append(
        f"closed loop: the publisher runs at most {MAX_LAG} messages ahead of the slowest subscriber; "
        "every subscriber checked for every message, once, in order; cores: medians of the rounds, "
        "server from /proc of all its processes, clients their own CPU time"
    )
    table.notes.append(
        f"ipcd runs with --rate-limit {ipcd.RATE_LIMIT} (the default, 5000 posts/s per uid, would cap the "
        f"publisher); latency: publish to subscriber recv() at {PACED_RATE} messages/s, after the window"
    )
