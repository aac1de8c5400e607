"""The ipcd side of the fan-out: the daemon under test and where its members are.

Theory of operation
-------------------
ipcd slows each uid down to 5000 chat posts a second by default, which
would make this a benchmark of the limiter; the daemon (the harness's
``--ipcd`` command) runs with ``--rate-limit`` raised out of reach and
nothing else changed. Before a round, STATUS and WHO tell whether every
subscriber is in the room and how the workers share them: a round with a
worker holding none would measure one worker, not the daemon.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Final

from benchmarks.servers import Server

RATE_LIMIT: Final = "1000000000"  # chat posts/s per uid: never reached


def argv(command: list[str], socket_dir: Path, workers: int) -> list[str]:
    return [*command, "--socket-dir", str(socket_dir), "--workers", str(workers), "--rate-limit", RATE_LIMIT]


def spread(server: Server, subs: int, room: str, problems: list[str]) -> str:
    """Subscribers per worker, from STATUS ("25 + 25"); problems if the room
    lacks members or a worker holds none."""
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
