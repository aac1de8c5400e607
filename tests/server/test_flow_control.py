"""Flow control: a client that pipelines requests and never reads their
replies stops being served; it never makes the master dup, queue or
allocate without bound, and never costs other clients their worker.

Each scenario runs a real daemon with real users: the flooding client
is root (the test), the bystander another user (a forked child that
dropped to ``ipcd-fd-other``), served while the flood sits blocked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import selectors
import socket
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipcd import fdpass
from ipcd.client import Client, ConnectionLost
from ipcd.handoff.store import OUT_OF_FDS, Store, StoreLimits
from ipcd.link.ops import ChannelOp
from ipcd.link.records import Answer, Forward, Sender
from ipcd.protocol import (
    ErrorCode,
    Frame,
    Op,
    decode_error,
    decode_record,
    encode_frame,
    encode_json,
    reply_op,
)
from ipcd.server.channel import Channel
from ipcd.server.flow import ChannelBudget, FdBudget, largest_reply, master_fd_bound, worker_fd_bound
from ipcd.server.master import Master
from ipcd.server.pool import WorkerHandle, WorkerPool
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
    def unread(self) -> int:
        """Bytes sent that the daemon has not read yet (SIOCOUTQ)."""
        queued = fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
        return int.from_bytes(queued, sys.byteorder, signed=True)

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
    # One worker: the other user's requests share the flooded worker and its channel.
    daemon = start_daemon("--send-timeout", "60", workers=1)
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
    master's and the worker's fds stay within the bounds computed from the
    settings, another user on the same worker is served throughout, and
    afterwards every dup is closed."""
    daemon = flood_daemon
    ledger = FdLedger(daemon)
    limits = daemon.status()["limits"]
    settings = Settings(max_fds=limits["max_fds"], max_outbuf=limits["max_outbuf"])
    assert limits["channel_fd_budget"] == settings.channel_fd_budget
    assert limits["connection_fd_budget"] == settings.connection_fd_budget
    bound = master_fd_bound(settings, workers=1, stored=ENTRY_FDS, baseline=ledger.master)
    # Connections at once: the flood, the bystander's, a status query, the owner's.
    worker_bound = worker_fd_bound(settings, connections=4, baseline=ledger.worker, stored=ENTRY_FDS)
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
        # Once the worker has read the flood (or cut it off), the flooder's
        # requests are on their way to the master (256 of them; the in-flight
        # cap holds the rest), and every request of the others below travels
        # behind them on the worker's channel.
        wait_for(lambda: flood.unread == 0 or "cut off" in daemon.log(), 15, "the worker to read the flood")
        for delivered in range(20):
            seq = talker.say("other", f"news {delivered}")
            event = listener.next_event(timeout=15)
            assert (event.kind, event.data["seq"], event.data["text"]) == (
                "message",
                seq,
                f"news {delivered}",
            )
            assert echoer.echo(b"ping %d" % delivered) == b"ping %d" % delivered
            master_peak = max(master_peak, rss_kib(daemon.pid))
            worker_peak = max(worker_peak, rss_kib(worker))
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


# -- the master's channel budget, in-process ---------------------------------------

FAKE_WORKER = 1 << 22  # a pid no process has (pid_max is at most 2**22)


class MasterUnderTest:
    """A real :class:`Master` with one channel to a worker that is this
    test: it sends FORWARD records itself and reads the master's answers
    only when it chooses to."""

    def __init__(self, settings: Settings, budget: ChannelBudget) -> None:
        self.master = Master(settings, {})
        self.master.hublink.budget = budget
        master_end, self.worker_end = Channel.pair()
        self.channel = master_end
        self.handle = WorkerHandle(FAKE_WORKER, master_end, generation=1)
        pool = WorkerPool(settings, None, lambda: None, lambda h: None, self.master._remove_channel)
        pool.workers[FAKE_WORKER] = self.handle
        self.master.pool = self.master.hublink.pool = pool
        self.master.loop.add_reader(master_end, lambda mask: self.master._on_channel(self.handle, mask))

    def forward(self, op: Op, rid: int, args: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
        forward = Forward(1, rid, op, 0, 0, os.getpid(), encode_json(args))
        self.worker_end.post(ChannelOp.FORWARD, forward.encode(), fds=fds)

    def turns(self, count: int = 50) -> None:
        """Let the master run (it never blocks: epoll waits 0 s)."""
        for _ in range(count):
            self.worker_end.flush()
            self.worker_end.flush_backlog()
            self.master.loop.run_once(0)
            self.master.hublink.flush_all()

    def answers(self) -> list[tuple[Answer, Frame]]:
        """Every answer the master has sent so far (their fds stay open).
        Copies of entries for GETs (ipcd.handoff.replica) are closed, and an
        UNREPLICA answered, as a worker does."""
        got: list[tuple[Answer, Frame]] = []
        while True:
            try:
                record = self.worker_end.recv()
            except BlockingIOError:
                return got
            if record.op == ChannelOp.REPLICA:
                fdpass.close_fds(record.fds)
                continue
            if record.op == ChannelOp.UNREPLICA:
                self.worker_end.post(ChannelOp.UNREPLICATED, record.body)
                continue
            assert record.op == ChannelOp.ANSWER
            answer = Answer.decode(record.body)
            got.append((answer, decode_record(answer.frame, record.fds)))

    @property
    def reading(self) -> bool:
        return bool(self.master.loop.events_of(self.channel) & selectors.EVENT_READ)

    def close(self) -> None:
        self.master.store.close_all()
        self.worker_end.close()
        self.channel.close()
        self.master.loop.close()


def test_master_stops_reading_a_worker_whose_channel_holds_its_fd_budget(short_tmp: Path) -> None:
    """The worker does not take its answers: the master dups for GETs only
    until its channel holds the fd budget (plus one answer's fds), stops
    reading that worker, and serves the rest in order as the worker reads."""
    settings = Settings(socket_dir=short_tmp / "s", max_fds=4)
    budget = ChannelBudget(max_bytes=8 << 20, max_fds=32)
    link = MasterUnderTest(settings, budget)
    gets = 1500
    try:
        with Pipes(4) as pipes:
            link.forward(Op.PUT, 1, {"name": "e"}, tuple(os.dup(fd) for fd in pipes.write_ends))
            pipes.drop_write_ends()
            link.turns()
            ((_, put_reply),) = link.answers()
            assert put_reply.op == reply_op(Op.PUT)
            # Enough that the kernel's buffer fills even with answers batched
            # 4 to a record (the master batches up to MASTER_BATCH_FDS fds).
            for rid in range(2, 2 + gets):
                link.forward(Op.GET, rid, {"name": "e"})
            link.turns()
            assert not link.reading, "the master reads on with its channel over budget"
            assert 0 < link.channel.backlog_fds <= budget.max_fds + 4
            # A worker that takes its records is alive, though the master does not read it.
            link.handle.last_heartbeat = 0.0
            waiting = link.answers()
            link.master.hublink.flush(link.handle)
            assert link.handle.last_heartbeat > 0.0
            served = []
            for _, frame in waiting:
                for fd in frame.fds:
                    os.close(fd)
                served.append(frame.request_id)
            deadline = time.monotonic() + 10
            while len(served) < gets and time.monotonic() < deadline:
                for answer, frame in link.answers():
                    assert (frame.op, len(frame.fds), answer.handout) == (reply_op(Op.GET), 4, True)
                    for fd in frame.fds:
                        os.close(fd)
                    served.append(frame.request_id)
                link.turns(5)
                assert link.channel.backlog_fds <= budget.max_fds + 4
            assert served == list(range(2, 2 + gets))
            assert link.reading
            link.forward(Op.RM, 2 + gets, {"name": "e"})
            link.turns()
            removed = link.answers()  # the RM waits for the worker to close its copy ...
            link.turns()
            removed += link.answers()  # ... which it has now said
            assert [frame.op for _, frame in removed] == [reply_op(Op.RM)]
            pipes.assert_closed_elsewhere()
    finally:
        link.close()


def test_a_get_the_kernel_cannot_dup_is_refused_and_leaks_nothing() -> None:
    """Out of fds in the middle of a GET's dups: the ones made are closed
    again and the requester is told UNAVAILABLE, marked as a hand-out."""
    store = Store(StoreLimits(max_entry_fds=16))
    sender = Sender(worker=1, conn=1, request_id=7, uid=0, gid=0, pid=os.getpid())
    with Pipes(16) as pipes:
        fds = tuple(os.dup(fd) for fd in pipes.write_ends)
        pipes.drop_write_ends()
        store.handle(sender, Op.PUT, encode_json({"name": "e"}), fds)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        highest = max(int(name) for name in os.listdir("/proc/self/fd"))
        fillers = []  # every free fd number up to the highest: the dups can only go above it
        while (fd := os.open(os.devnull, os.O_RDONLY)) < highest:
            fillers.append(fd)
        os.close(fd)
        open_fds = len(os.listdir("/proc/self/fd")) - 1  # listdir's own fd is closed again
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1 + 3, hard))  # room for 3 dups of 16
        try:
            (answer,) = store.handle(sender, Op.GET, encode_json({"name": "e"}), ())
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        left = len(os.listdir("/proc/self/fd")) - 1
        fdpass.close_fds(fillers)
        decoded = Answer.decode(answer.body)
        frame = decode_record(decoded.frame, answer.fds)
        assert (frame.op, frame.request_id, decoded.handout, answer.fds) == (Op.ERROR, 7, True, ())
        assert decode_error(frame.body) == (ErrorCode.UNAVAILABLE, OUT_OF_FDS)
        assert left == open_fds
        store.close_all()
        pipes.assert_closed_elsewhere()


# -- the budgets' arithmetic ----------------------------------------------------------


def test_fd_budget_admits_a_get_while_its_fds_fit() -> None:
    budget = FdBudget(budget=64, per_request=16)
    assert budget.admits(queued=0, reserved=0)
    assert budget.admits(queued=0, reserved=3)  # the fourth GET in flight
    assert not budget.admits(queued=0, reserved=4)
    assert budget.admits(queued=48, reserved=0)
    assert not budget.admits(queued=49, reserved=0)
    assert not budget.admits(queued=32, reserved=2)
    # However small the budget, one GET always goes while nothing is pending.
    assert FdBudget.from_settings(Settings(max_fds=253)).admits(queued=0, reserved=0)


def test_a_held_connection_resumes_once_half_its_fd_budget_is_free() -> None:
    budget = FdBudget(budget=64, per_request=16)
    assert not budget.admits(queued=0, reserved=4)  # held at four GETs in flight
    assert not budget.resumes(queued=0, reserved=3)  # one answer back: not yet
    assert not budget.resumes(queued=0, reserved=2)
    assert budget.resumes(queued=0, reserved=1)  # half free: read on, a run of GETs goes
    assert not budget.resumes(queued=17, reserved=0)  # fds the client has not read count too
    # Whatever the settings, a connection with nothing pending always resumes.
    for max_fds in (1, 16, 253):
        assert FdBudget.from_settings(Settings(max_fds=max_fds)).resumes(queued=0, reserved=0)


def test_channel_budget_counts_bytes_and_fds() -> None:
    budget = ChannelBudget(max_bytes=1000, max_fds=10)
    assert budget.admits(999, 9)
    assert not budget.admits(1000, 0)
    assert not budget.admits(0, 10)


def test_budgets_follow_the_settings() -> None:
    default = Settings()
    assert (default.connection_fd_budget, default.channel_fd_budget) == (64, 256)
    assert default.channel_byte_budget == 8 << 20
    assert Settings(max_fds=100).connection_fd_budget == 400
    assert Settings(max_outbuf=16 << 20).channel_byte_budget == 32 << 20
    assert master_fd_bound(default, workers=2, stored=16, baseline=11) == 11 + 16 + 2 * (256 + 16)
    assert worker_fd_bound(default, connections=3, baseline=8) == 8 + 3 * (1 + 64 + 16)
    assert worker_fd_bound(default, connections=3, baseline=8, stored=5) == 8 + 5 + 3 * (1 + 64 + 16)
    assert largest_reply(default) == 100 * (16 * 1024 * 2 + 256)  # `"` sent as `\"`: controls are stripped
