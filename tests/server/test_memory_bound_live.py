"""Memory is bounded by configuration, not by the clients: a live check.

A real daemon with small budgets is pushed to the budgets a test can reach
quickly, all at once, by one uid (the test's own, which is the daemon's:
``--privileged-budget-factor 1`` gives it the plain budgets): parked
waiters past ``--waiters-per-uid``, rooms past ``--rooms-per-uid`` each
with a full history of messages whose every byte JSON escapes, connections
each holding an almost complete frame past ``--partial-bytes-per-uid``,
and members of a room that never read what it delivers. Another client is served
meanwhile. Each process's RSS growth (from /proc) must stay under what
ipcd.server.flow computes for the terms the attack pushed, plus an
allocator slack; the terms it cannot push quickly (the 64 MiB fan-out
kill line, listings) are in the full bound, which the growth is checked
against too. A worker's requests waiting for a master that does not read
it are pushed by tests/handoff/test_forward_budget_live.py.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipcd import fdpass
from ipcd.client import Client, ServerError
from ipcd.protocol import NEED_DATA, Op, encode_header
from ipcd.protocol.messages import encode_json
from ipcd.server.flow import master_memory_bound, worker_memory_bound
from ipcd.settings import Settings
from tests.daemon import Daemon, rss_kib, running_daemon, wait_for

FRAME = 64 << 10
OUTBUF = 256 << 10
PARTIAL = 1 << 20
HISTORY = 10
MESSAGE = 4 << 10
WAITERS = 200
ROOMS = 50
SETTINGS = Settings(
    workers=2,
    max_outbuf=OUTBUF,
    max_frame_size=FRAME,
    partial_bytes_per_uid=PARTIAL,
    history_size=HISTORY,
    max_message=MESSAGE,
    waiters_per_uid=WAITERS,
    rooms_per_uid=ROOMS,
    joins_per_uid=2 * ROOMS,
    connections_per_uid=200,
    privileged_budget_factor=1,
)
FLAGS = (
    "--max-outbuf", "256K", "--max-frame-size", "64K", "--partial-bytes-per-uid", "1M",
    "--history-size", str(HISTORY), "--max-message", "4K", "--waiters-per-uid", str(WAITERS),
    "--rooms-per-uid", str(ROOMS), "--joins-per-uid", str(2 * ROOMS),
    "--connections-per-uid", "200", "--privileged-budget-factor", "1",
)  # fmt: skip
WAITER_CONNECTIONS = 55
GETS_PER_CONNECTION = 4  # the fd budget (64) over --max-fds (16): 220 in all, 20 past the budget
PARTIAL_CONNECTIONS = 60  # 60 almost complete 64 KiB frames: 3.75 MiB without the budget
SLOW_READERS = 40
DELIVERIES = 80  # 80 x 8.4 KiB to each reader: more than the kernel and the outbuf hold
# What the allocator may add beyond the pushed terms: arenas, the page
# granularity of RSS, interpreter caches warmed by new code paths.
SLACK = 6 << 20


def _connect(daemon: Daemon) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(daemon.stream_path))
    return sock


def _rss(pids: list[int]) -> dict[int, int]:
    return {pid: rss_kib(pid) * 1024 for pid in pids}


def _served(daemon: Daemon, room: str) -> None:
    """What another client checks meanwhile: echo, chat, a hand-off. (The
    same uid as the attack: past its room budget it chats in a room that
    exists; another uid's service is tests/handoff/test_uid_budgets_live.py.)"""
    with Client(daemon.socket_dir, timeout=10) as client:
        assert client.echo(b"still served") == b"still served"
        client.join(room)
        assert client.say(room, "hello") >= 1
        read, write = os.pipe()
        try:
            client.put("bystander-fd", [read])
            got = client.get("bystander-fd")
            fdpass.close_fds(got.fds)
            assert len(got.fds) == 1
            client.rm("bystander-fd")
        finally:
            os.close(read)
            os.close(write)
        client.part(room)


@pytest.fixture
def small_daemon(socket_dir: Path) -> Iterator[Daemon]:
    with running_daemon(socket_dir, *FLAGS) as daemon:
        yield daemon


def test_each_process_stays_under_its_computed_bound_with_every_budget_pushed(small_daemon: Daemon) -> None:
    daemon = small_daemon
    _served(daemon, "warm-up")  # warm every code path before the baseline
    workers = daemon.worker_pids()
    before = _rss([daemon.pid, *workers])
    held: list[socket.socket] = []
    clients: list[Client] = []
    try:
        # Parked waiters: the budget's worth parked, the rest refused at once
        # (spread over connections: each holds only a few GETs in flight).
        waiters = [Client(daemon.socket_dir, timeout=10) for _ in range(WAITER_CONNECTIONS)]
        clients.extend(waiters)
        for c, waiter in enumerate(waiters):
            for i in range(GETS_PER_CONNECTION):
                waiter.send(Op.GET, encode_json({"name": f"never-{c}-{i}", "wait": 60}))
        assert _refusals(waiters, WAITER_CONNECTIONS * GETS_PER_CONNECTION - WAITERS) == {Op.ERROR}

        # Rooms, each with a full history of messages that escape 2 to 1.
        chatter = Client(daemon.socket_dir, timeout=10)
        clients.append(chatter)
        text = '"' * MESSAGE  # each byte sent as \", the worst JSON escape (controls are stripped)
        for r in range(ROOMS):
            chatter.join(f"full-{r}")
            for _ in range(HISTORY):
                chatter.say(f"full-{r}", text)
        with pytest.raises(ServerError, match="rooms-per-uid"):
            chatter.join("one-too-many")
        kept = chatter.history(f"full-{ROOMS - 1}")
        assert [len(m["text"]) for m in kept] == [MESSAGE] * HISTORY

        # Almost complete frames, past the partial-frame budget of each worker.
        body = b"p" * (FRAME - 16 - 1024)
        for _ in range(PARTIAL_CONNECTIONS):
            sock = _connect(daemon)
            held.append(sock)
            try:
                sock.sendall(encode_header(Op.ECHO, 1, FRAME - 16) + body)
            except OSError:
                pass  # cut off already: that is the budget at work

        # Slow readers: members of a room who never read, sent more than the
        # kernel and --max-outbuf hold (past it they are cut off).
        readers = [Client(daemon.socket_dir, timeout=10) for _ in range(SLOW_READERS)]
        clients.extend(readers)
        for reader in readers:
            reader.join("full-0")
        for _ in range(DELIVERIES):
            chatter.say("full-0", text)

        status = wait_for(
            lambda: s if (s := daemon.status()) and _held(s, "waiters") == WAITERS else None,
            what="the waiters parked",
        )
        assert _held(status, "rooms") >= ROOMS
        assert PARTIAL <= _held(status, "partial_bytes") <= SETTINGS.workers * (PARTIAL + 256 * 1024)
        _served(daemon, "full-0")
        after = _rss([daemon.pid, *workers])
    finally:
        for sock in held:
            sock.close()
        for client in clients:
            client.close()

    connections = len(held) + len(clients) + 1
    master = master_memory_bound(SETTINGS, workers=2, rooms=ROOMS + 1)
    master_pushed = (
        master.fixed["rooms with full history (daemon-wide)"]
        + master.per_uid["parked waiters"]
        + master.per_uid["chat sessions"]
        + master.per_uid["room memberships"]
    )
    grown = after[daemon.pid] - before[daemon.pid]
    assert grown <= master_pushed + SLACK, f"master grew {grown} bytes, pushed terms {master_pushed}"
    assert grown <= master.total(1)

    worker = worker_memory_bound(SETTINGS, connections)
    worker_pushed = (
        worker.fixed["output per connection (--max-outbuf)"]
        + worker.fixed["connection objects"]
        + worker.fixed["message from the master being reassembled"]
        + worker.per_uid["frames received, not served (partial or held)"]
    )
    for pid in workers:
        grown = after[pid] - before[pid]
        assert grown <= worker_pushed + SLACK, (
            f"worker {pid} grew {grown} bytes, pushed terms {worker_pushed}"
        )
        assert grown <= worker.total(1)
    # So that the figures can be read off a -s run.
    print(f"master grew {after[daemon.pid] - before[daemon.pid]} of {master_pushed} pushed")
    print(f"workers grew {[after[p] - before[p] for p in workers]} of {worker_pushed} pushed")


def _refusals(clients: list[Client], count: int) -> set[int]:
    """The ops of the first ``count`` frames the clients get back."""
    by_fd = {client.fileno(): client for client in clients}
    ops: list[int] = []
    while len(ops) < count:
        readable = select.select(list(by_fd), [], [], 10)[0]
        assert readable, f"{len(ops)} of {count} refusals came"
        for fd in readable:
            client = by_fd[fd]
            ops.append(client.receive().op)
            while (frame := client.decoder.next_event()) is not NEED_DATA:
                ops.append(frame.op)
    return set(ops)


def _held(status: dict[str, object], what: str) -> int:
    uids = status.get("uids") or []
    assert isinstance(uids, list)
    return sum(int(entry.get(what, 0)) for entry in uids if entry.get("uid") == os.geteuid())
