"""Memory is bounded by configuration, not by the clients: a live check.

A real daemon with small budgets is pushed to the budgets a test can reach
quickly, all at once, by one uid (the test's own, which is the daemon's:
``--privileged-budget-factor 1`` gives it the plain budgets): parked
waiters past ``--waiters-per-uid``, rooms past ``--rooms-per-uid`` each
with a full history of messages whose every byte JSON escapes (past
``--history-bytes-per-uid``, so its oldest rooms are trimmed), connections
each holding an almost complete frame past ``--partial-bytes-per-uid``,
stored entries at the fd quota, each as large as an entry can be, got
twice from both workers (their GET copies) and listed, and members of a
room that never read what it delivers. Another client is served
meanwhile. Each process's RSS growth (from /proc) must stay under what
ipcd.server.flow computes for the terms the attack pushed, plus an
allocator slack, and the full bound. The second test pushes the master's
64 MiB fan-out kill line; a worker's requests waiting for a master that
does not read it are pushed by tests/handoff/test_forward_budget_live.py.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
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
from tests.daemon import Daemon, children, rss_kib, running_daemon, wait_for

FRAME = 64 << 10
OUTBUF = 256 << 10
PARTIAL = 1 << 20
HISTORY = 10
MESSAGE = 4 << 10
WAITERS = 200
ROOMS = 50
HISTORY_BYTES = 2 << 20  # of the 4.2 MB the rooms below would keep
SETTINGS = Settings(
    workers=2,
    max_outbuf=OUTBUF,
    max_frame_size=FRAME,
    partial_bytes_per_uid=PARTIAL,
    history_size=HISTORY,
    max_message=MESSAGE,
    waiters_per_uid=WAITERS,
    rooms_per_uid=ROOMS,
    history_bytes_per_uid=HISTORY_BYTES,
    joins_per_uid=2 * ROOMS,
    connections_per_uid=200,
    privileged_budget_factor=1,
)
FLAGS = (
    "--max-outbuf", "256K", "--max-frame-size", "64K", "--partial-bytes-per-uid", "1M",
    "--history-size", str(HISTORY), "--max-message", "4K", "--waiters-per-uid", str(WAITERS),
    "--rooms-per-uid", str(ROOMS), "--joins-per-uid", str(2 * ROOMS), "--history-bytes-per-uid", "2M",
    "--connections-per-uid", "200", "--privileged-budget-factor", "1",
)  # fmt: skip
WAITER_CONNECTIONS = 55
GETS_PER_CONNECTION = 4  # the fd budget (64) over --max-fds (16): 220 in all, 20 past the budget
PARTIAL_CONNECTIONS = 60  # 60 almost complete 64 KiB frames: 3.75 MiB without the budget
SLOW_READERS = 40
PRIVATE_READERS = 40
PRIVATE_MESSAGES = (
    44  # x 8.4 KiB: 370 KiB each, the kernel's share and most of the 256 KiB outbuf (56 cut them off)
)
FLOOD_MESSAGES = 10_000  # x 8 KB to a worker that stopped reading: past the 64 MiB kill line
ENTRIES = 63  # of the default --fd-quota (64): one fd each; the last is the bystander's hand-off
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

        # Stored entries at the fd quota, each as large as an entry can be,
        # got twice (so both workers may answer from their own copy), and
        # listed: past the quota a PUT is refused.
        keeper = Client(daemon.socket_dir, timeout=10)
        clients.append(keeper)
        read, write = os.pipe()
        try:
            for e in range(ENTRIES):
                keeper.put(
                    f"{e:03d}".ljust(128, "e"),
                    [read],
                    names=[f"{e:03d}".ljust(255, "n")],
                    allow_uids=range(70000, 70064),
                    allow_gids=range(70000, 70064),
                )
            with pytest.raises(ServerError, match="the quota is 64"):
                keeper.put("two-fds-too-many", [read, read])  # the bystander's one still fits
        finally:
            os.close(read)
            os.close(write)
        getters = [Client(daemon.socket_dir, timeout=10) for _ in range(2)]
        clients.extend(getters)
        for getter in getters:
            for e in range(ENTRIES):
                for _ in range(2):
                    fdpass.close_fds(getter.get(f"{e:03d}".ljust(128, "e")).fds)
        assert len(keeper.ls()["entries"]) == ENTRIES

        # Slow readers: members of a room who never read, sent more than the
        # kernel and --max-outbuf hold (past it they are cut off).
        readers = [Client(daemon.socket_dir, timeout=10) for _ in range(SLOW_READERS)]
        clients.extend(readers)
        for reader in readers:
            reader.join("full-0")
        for _ in range(DELIVERIES):
            chatter.say("full-0", text)

        # Private readers: each is sent its own messages (no buffer shared
        # with another member), more than the kernel takes, short of the
        # --max-outbuf cut-off: each connection's output term, for real.
        private = [Client(daemon.socket_dir, timeout=10) for _ in range(PRIVATE_READERS)]
        clients.extend(private)
        for r, reader in enumerate(private):
            nick = reader.nick(f"private-{r}")
            for _ in range(PRIVATE_MESSAGES):
                chatter.msg(nick, text)

        status = wait_for(
            lambda: s if (s := daemon.status()) and _held(s, "waiters") == WAITERS else None,
            what="the waiters parked",
        )
        assert _held(status, "rooms") >= ROOMS
        assert HISTORY_BYTES - 9000 < _held(status, "history_bytes") <= HISTORY_BYTES + 9000
        assert PARTIAL <= _held(status, "partial_bytes") <= SETTINGS.workers * (PARTIAL + 256 * 1024)
        _served(daemon, "full-0")
        after = _rss([daemon.pid, *workers])
        for reader in private:  # they were held, not cut off: each reads all it was sent
            texts = [reader.next_event(timeout=10).data["text"] for _ in range(PRIVATE_MESSAGES)]
            assert texts == [text] * PRIVATE_MESSAGES
    finally:
        for sock in held:
            sock.close()
        for client in clients:
            client.close()

    connections = len(held) + len(clients) + 1
    master = master_memory_bound(SETTINGS, workers=2, rooms=ROOMS + 1)
    master_pushed = (
        master.fixed["rooms (daemon-wide; their history is charged to its posters)"]
        + master.per_uid["history it posted (--history-bytes-per-uid, plus its newest message)"]
        + master.per_uid["parked waiters"]
        + master.per_uid["chat sessions"]
        + master.per_uid["room memberships"]
        + master.per_uid["stored entries"]
    )
    grown = after[daemon.pid] - before[daemon.pid]
    assert grown <= master_pushed + SLACK, f"master grew {grown} bytes, pushed terms {master_pushed}"
    assert grown <= master.total(1)

    worker = worker_memory_bound(SETTINGS, connections)
    # Of the output term, only the connections that were sent output
    # without reading it (the rest hold none).
    worker_pushed = (
        worker_memory_bound(SETTINGS, PRIVATE_READERS + SLOW_READERS).fixed[
            "output per connection (--max-outbuf)"
        ]
        + worker.fixed["connection objects"]
        + worker.fixed["message from the master being reassembled"]
        + worker.per_uid["frames received, not served (partial or held)"]
        + worker.per_uid["GET replicas of its entries"]
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


def _peak_rss(pid: int) -> int:
    """The process's high-water RSS (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def _served_by(client: Client) -> int:
    return int(client.status()["served_by"])


def test_the_master_holds_at_most_the_kill_line_for_a_worker_that_stopped_reading(socket_dir: Path) -> None:
    """The channel-backlog term, pushed for real: a worker that stops taking
    its channel (SIGSTOP) while a room it has a member in is flooded makes
    the master queue fan-out for it until the kill line, then kill it. The
    master's peak RSS stays under that term plus the slack; the poster on
    the other worker is served throughout, and the room's sequence goes on."""
    with running_daemon(socket_dir, "--workers", "2") as daemon:
        reader = Client(daemon.socket_dir, timeout=10)
        poster = Client(daemon.socket_dir, timeout=10)
        spare: list[Client] = []
        try:
            stopped = _served_by(reader)
            while _served_by(poster) == stopped:  # the poster on the other worker
                spare.append(poster)
                poster = Client(daemon.socket_dir, timeout=10)
            reader.join("flood")
            assert poster.say("flood", "warm") == 1
            baseline = rss_kib(daemon.pid) * 1024
            os.kill(stopped, signal.SIGSTOP)
            try:
                text = "k" * 8000
                posted = 0
                # 80 MB for the stopped worker, past the 64 MiB kill line.
                for seq in poster.say_many("flood", (text for _ in range(FLOOD_MESSAGES))):
                    posted = seq
                wait_for(lambda: stopped not in children(daemon.pid), what="the stopped worker to be killed")
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stopped, signal.SIGCONT)
            peak = _peak_rss(daemon.pid) - baseline
            assert posted == FLOOD_MESSAGES + 1  # after "warm": every post answered, in order
            assert poster.say("flood", "after") == posted + 1  # and the room goes on
            bound = master_memory_bound(Settings(workers=2), workers=2).fixed
            kill_line = bound["channel backlog per worker (64 MiB kill line + one message)"] // 2
            assert peak <= kill_line + SLACK, f"master peaked {peak} bytes above its baseline"
            assert "channel backlog" in daemon.log() or "behind" in daemon.log()
            print(f"master peaked {peak} bytes above its baseline, kill line term {kill_line}")
        finally:
            for client in (reader, poster, *spare):
                client.close()
