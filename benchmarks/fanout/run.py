"""One round of the fan-out: a publisher and N subscribers against one server.

Theory of operation
-------------------
The subscribers connect and subscribe first, spread over a few processes
(one per core, at most two: a C process holds many connections); then the
harness picks a start time, tells it to the subscribers and starts the
publisher, which sleeps until then. The harness samples the server's CPU
(from /proc, all its processes) and the machine's at the edges of the
measured window, which everyone computes from the same start time on the
system-wide monotonic clock, so deliveries, server CPU and the clients' own
CPU all cover the same interval. After the window the publisher waits for
the subscribers to catch up and runs the paced latency phase; then the
harness tells the subscribers how many messages there were, and each checks
every connection got all of them.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from pathlib import Path
from typing import Final, Literal

from benchmarks.echo import Settings
from benchmarks.fanout import clients, ipcd, redis
from benchmarks.servers import Server

Target = Literal["ipcd", "redis"]
PAYLOAD: Final = 32  # bytes of message text (fixed in fanout_client.c)
WINDOW: Final = 64  # unanswered publishes
MAX_LAG: Final = 2048  # messages the publisher may run ahead of the slowest subscriber
PACED_RATE: Final = 200  # messages/s of the latency phase
DRAIN_TIMEOUT: Final = 5.0  # as DRAIN_NS in fanout_client.c
_TICK: Final = os.sysconf("SC_CLK_TCK")


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


def subscriber_procs(subs: int = 1 << 30) -> int:
    return max(1, min(2, os.cpu_count() or 1, subs))


def measure(
    binary: Path, server: Server, target: Target, subs: int, name: str, s: Settings, problems: list[str]
) -> Run:
    procs = subscriber_procs(subs)
    paced = 0.5 if s.duration < 2 else 1.0
    lag_file = Path(server.socket_dir).parent / f"lag-{name}"
    lag_file.write_bytes(bytes(8 * procs))
    where = [str(binary), "", target, server.stream_path, name]
    timing = [repr(s.warmup), repr(s.duration)]
    children: list[subprocess.Popen[bytes]] = []
    with clients.reaped(children):
        deadline = time.monotonic() + 15
        for i in range(procs):
            share = subs // procs + (i < subs % procs)
            where[1] = "sub"
            children.append(clients.spawn([*where, str(share), str(lag_file), str(i), *timing]))
        for child in children:
            clients.ready(child, deadline)
        spread = (ipcd.spread if target == "ipcd" else redis.spread)(server, subs, name, problems)
        start_at = time.monotonic() + 0.3
        for child in children:
            clients.tell(child, start_at)
        where[1] = "pub"
        pub_argv = [*where, str(subs), str(lag_file), str(procs), repr(start_at), *timing, repr(paced)]
        publisher = clients.spawn([*pub_argv, str(WINDOW), str(MAX_LAG), str(PACED_RATE)])
        children.append(publisher)
        marks = []
        for edge in (start_at + s.warmup, start_at + s.warmup + s.duration):
            time.sleep(max(0.0, edge - time.monotonic()))
            marks.append((time.monotonic(), server.cpu_seconds(), _machine_busy()))
        pub = clients.result(publisher, timeout=paced + 3 * DRAIN_TIMEOUT + 10)
        for child in children[:-1]:
            clients.tell(child, pub["published"])
        results = [clients.result(child, DRAIN_TIMEOUT + 10) for child in children[:-1]]
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
    return Run(
        deliveries_per_s=deliveries / s.duration,
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
