"""Flow control: a client that pipelines requests and never reads their
replies stops being served; it never makes the master dup, queue or
allocate without bound, and never costs other clients their worker.

Each scenario runs a real daemon with real users: the flooding client
is root (the test), the bystander another user (a forked child that
dropped to ``ipcd-fd-other``), served while the flood sits blocked.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ipcd.client import Client, ConnectionLost
from ipcd.protocol import Op, encode_frame, encode_json
from ipcd.server.flow import master_fd_bound, worker_fd_bound
from ipcd.settings import Settings
from tests.daemon import Daemon, Pipes, fd_count, rss_kib, wait_for
from tests.handoff.users import FdLedger, FdUsers, StartDaemon, start_as

pytest_plugins = ["tests.handoff.users"]

FLOOD_GETS = 30_000
ENTRY_FDS = 16


class Flood:
    """One connection that sends ``payload`` (pipelined requests) from a
    thread and never reads a byte of what comes back."""

    def __init__(self, daemon: Daemon, payload: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(daemon.stream_path))
        self.sent_all = False
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._send, args=(payload,), daemon=True)
        self._thread.start()

    def _send(self, payload: bytes) -> None:
        try:
            self.sock.sendall(payload)
            self.sent_all = True
        except OSError as exc:  # the daemon cut us off, or close() shut us down
            self.error = exc

    @property
    def blocked(self) -> bool:
        """Still sending: the daemon stopped reading us."""
        return self._thread.is_alive()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the sending thread
        self._thread.join(10)
        assert not self._thread.is_alive(), "the flood's sender did not stop"
        self.sock.close()


def pipelined(op: Op, body: dict[str, Any], count: int) -> bytes:
    one = encode_json(body)
    return b"".join(encode_frame(op, rid, one) for rid in range(1, count + 1))


def held(daemon: Daemon) -> int:
    return sum(w["held"] for w in daemon.status()["workers"])


def bystander_round(socket_dir: str, round_no: int) -> dict[str, Any]:
    """What another user does while the flood runs: an echo, a chat SAY,
    and a PUT, GET and RM of an entry of its own."""
    read_end, write_end = os.pipe()
    try:
        with Client(socket_dir, timeout=10) as client:
            echoed = client.echo(b"still here %d" % round_no)
            seq = client.say("bystanders", f"round {round_no}")
            client.put(f"mine-{round_no}", [write_end])
            got = client.get(f"mine-{round_no}")
            same = os.fstat(got.fds[0]).st_ino == os.fstat(write_end).st_ino
            for fd in got.fds:
                os.close(fd)
            client.rm(f"mine-{round_no}")
            return {"echo": echoed, "seq": seq, "got_own_pipe": same}
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.fixture
def flood_daemon(start_daemon: StartDaemon) -> Iterator[Daemon]:
    daemon = start_daemon("--send-timeout", "60", workers=2)
    yield daemon
    for line in daemon.log().splitlines():
        # No traceback, no record lost (a worker out of fds drops what it cannot receive).
        assert "Traceback" not in line, daemon.log()
        assert "Too many open files" not in line, line
        assert " ERROR " not in line, line


def test_pipelined_gets_never_read_keep_the_master_within_its_fd_bound(
    flood_daemon: Daemon, fd_users: FdUsers
) -> None:
    """Issue 9: 16 fds put, 30,000 GETs pipelined and never read. The
    master's fds stay within the bound computed from its settings, another
    user is served throughout, and afterwards every dup is closed."""
    daemon = flood_daemon
    ledger = FdLedger(daemon)
    limits = daemon.status()["limits"]
    settings = Settings(max_fds=limits["max_fds"], max_outbuf=limits["max_outbuf"])
    assert limits["channel_fd_budget"] == settings.channel_fd_budget
    assert limits["connection_fd_budget"] == settings.connection_fd_budget
    bound = master_fd_bound(settings, workers=2, stored=ENTRY_FDS, baseline=ledger.master)
    # Connections at once: the flood, the bystander's, a status query, the owner's.
    worker_bound = worker_fd_bound(settings, connections=4, baseline=ledger.worker)
    with Pipes(ENTRY_FDS) as pipes:
        with daemon.client() as owner:
            owner.put("flood", pipes.write_ends, public=True)
        pipes.drop_write_ends()
        flood = Flood(daemon, pipelined(Op.GET, {"name": "flood"}, FLOOD_GETS))
        try:
            highest = busiest_worker = 0

            def sample() -> None:
                nonlocal highest, busiest_worker
                highest = max(highest, fd_count(daemon.pid))
                busiest_worker = max(busiest_worker, *(fd_count(pid) for pid in ledger.workers))

            sample()
            wait_for(lambda: held(daemon) > 0, 15, "the flooding connection to be held")
            for round_no in range(4):
                pending = start_as(fd_users.other, bystander_round, str(daemon.socket_dir), round_no)
                while not pending.channel.poll(0.01):  # sample while the other user is being served
                    sample()
                outcome = pending.result()
                assert outcome.ok, outcome
                assert outcome.value["echo"] == b"still here %d" % round_no
                assert outcome.value["got_own_pipe"]
            sample()
            assert flood.blocked, "the daemon read all 30,000 GETs: nothing held the flood back"
            assert highest <= bound, f"the master held {highest} fds; the bound is {bound}"
            assert busiest_worker <= worker_bound, f"a worker held {busiest_worker} fds, over {worker_bound}"
            with daemon.client() as owner:
                owner.rm("flood")
        finally:
            flood.close()
        ledger.expect(0)
        pipes.assert_closed_elsewhere()


def test_pipelined_history_kills_no_worker_and_starves_no_other_client(start_daemon: StartDaemon) -> None:
    """Issue 9: a client pipelines HISTORY of a full room (100 messages of
    16 KiB) without reading, on the one worker that also serves a listener
    of another room and an echo loop. The worker survives, the others keep
    being served, the flooder is at worst cut off as a slow consumer, and
    the master's and the worker's memory stay within their bounds."""
    daemon = start_daemon("--rate-limit", "1000000", workers=1)
    (worker,) = daemon.worker_pids()
    limits = daemon.status()["limits"]
    settings = Settings(max_outbuf=limits["max_outbuf"])
    with daemon.client(timeout=30) as filler:
        for i in range(100):
            filler.say("full", f"{i:03d}" + "h" * (16 * 1024 - 3))
    listener = daemon.client(timeout=10)
    listener.join("other")
    talker = daemon.client(timeout=10)
    echoer = daemon.client(timeout=10)
    master_before, worker_before = rss_kib(daemon.pid), rss_kib(worker)
    master_peak, worker_peak = master_before, worker_before
    flood = Flood(daemon, pipelined(Op.HISTORY, {"room": "full"}, 2000))
    try:
        delivered = 0
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            seq = talker.say("other", f"news {delivered}")
            event = listener.next_event(timeout=10)
            assert (event.kind, event.data["seq"], event.data["text"]) == (
                "message",
                seq,
                f"news {delivered}",
            )
            assert echoer.echo(b"ping %d" % delivered) == b"ping %d" % delivered
            delivered += 1
            master_peak = max(master_peak, rss_kib(daemon.pid))
            worker_peak = max(worker_peak, rss_kib(worker))
            if delivered >= 50 and not flood.blocked:
                break  # the flooder was cut off and its replies are all drained
        assert daemon.worker_pids() == [worker], daemon.log()
        assert "killing it" not in daemon.log()
    finally:
        flood.close()
    with contextlib.suppress(ConnectionLost):
        listener.close()
    # The master queues at most its budget plus one reply for the worker;
    # the worker holds at most the flooder's outbuf plus one reply being
    # reassembled and one being queued. Python's allocator keeps some
    # slack: 16 MiB on top.
    reply = 100 * (16 * 1024 + 256)
    slack = 16 << 20
    master_bound = settings.channel_byte_budget + 2 * reply + slack
    worker_bound = settings.max_outbuf + 3 * reply + slack
    assert (master_peak - master_before) * 1024 <= master_bound, (master_before, master_peak)
    assert (worker_peak - worker_before) * 1024 <= worker_bound, (worker_before, worker_peak)
    for conn in (talker, echoer):
        assert conn.echo(b"after") == b"after"
        conn.close()
    if "cut off" in daemon.log():
        assert "the client is not reading" in daemon.log()
