"""Requests waiting in a worker to reach the master stop at the uid's
``--forward-bytes-per-uid``, not at 256 frames per connection; two real users.

User "a" (``other``) opens connections, then, while the master is stopped
(SIGSTOP: the honest way to make a worker's channel back up, since nothing
then reads it), pipelines large requests on all of them. Without the budget
the worker reads and queues all of them (connections x frames x size);
with it the worker stops reading a's connections once a's bytes waiting
pass the budget: the kernel sees every one of them dropped from the
worker's epoll, and the worker's RSS grew by at most the budget, the
request that crossed it and what a's connections had read. Then the master
goes on (SIGCONT): everything a sent is answered, once, while user b
(``owner``) echoes, chats and hands an fd off; afterwards STATUS shows
nothing waiting for a.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import struct
import termios
import time
from typing import Any

from ipcd.protocol import NEED_DATA, ErrorCode, FrameDecoder, Op, decode_error, encode_frame
from ipcd.protocol.messages import encode_json
from ipcd.server.forwarded import forward_bound
from ipcd.settings import READ_BUFFER_SIZE, Settings
from tests.daemon import rss_kib, wait_for
from tests.handoff.test_connection_budgets_live import holdings_of
from tests.handoff.test_uid_budgets_live import b_is_served, warm_up
from tests.handoff.users import FdUsers, StartDaemon, start_as

pytest_plugins = ["tests.handoff.users"]

BUDGET = 2 << 20
CONNECTIONS = 16
PER_CONNECTION = 32  # requests pipelined on each: 64 MiB in all, 32x the budget
BODY = 128 << 10  # each fits one read of the worker's, as a client writing whole frames makes them
SETTINGS = Settings(forward_bytes_per_uid=BUDGET)
# What the allocator and the interpreter may add beyond the terms (arenas,
# RSS's page granularity, the code paths the attack warms up).
SLACK = 8 << 20


# -- what the attacker's child does -------------------------------------------------


def _request(request_id: int) -> bytes:
    """A HISTORY of the default room, padded: the worker forwards it as it is."""
    pad = "p" * (BODY - 64)
    return encode_frame(Op.HISTORY, request_id, encode_json({"count": 1, "pad": pad}))


def flood(socket_dir: str, ready_w: int, go_r: int, sent_w: int) -> dict[str, Any]:
    """Open the connections (each served once, so the worker has them), say
    so, wait for the word, then pipeline every request on every connection
    and read the answers until each request has one."""
    socks = []
    for _ in range(CONNECTIONS):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(f"{socket_dir}/stream.sock")
        sock.sendall(encode_frame(Op.ECHO, 1 << 30, b"hello"))
        assert sock.recv(64)  # the echo: this connection is in a worker
        sock.setblocking(False)
        socks.append(sock)
    os.write(ready_w, b"connected")
    os.close(ready_w)
    os.read(go_r, 1)
    data = {sock: memoryview(b"".join(_request(i + 1) for i in range(PER_CONNECTION))) for sock in socks}
    offsets = dict.fromkeys(socks, 0)
    decoders = {sock: FrameDecoder(1 << 24) for sock in socks}
    answers: dict[socket.socket, list[int]] = {sock: [] for sock in socks}
    told = False
    deadline = time.monotonic() + 40
    while sum(map(len, answers.values())) < CONNECTIONS * PER_CONNECTION and time.monotonic() < deadline:
        writing = [sock for sock in socks if offsets[sock] < len(data[sock])]
        if not writing and not told:
            with contextlib.suppress(BrokenPipeError):  # the test may have stopped looking
                os.write(sent_w, b"sent")  # the daemon has taken every byte: the test may look
            told = True
        readable, writable, _ = select.select(socks, writing, [], 1)
        for sock in writable:
            try:
                offsets[sock] += sock.send(data[sock][offsets[sock] : offsets[sock] + (1 << 20)])
            except BlockingIOError:
                pass
        for sock in readable:
            chunk = sock.recv(1 << 20)
            assert chunk, "the daemon closed a connection of a's"
            decoder = decoders[sock]
            decoder.receive_data(chunk)
            while (frame := decoder.next_event()) is not NEED_DATA:
                answers[sock].append(frame.request_id)
    for sock in socks:
        sock.close()
    expected = list(range(1, PER_CONNECTION + 1))
    return {
        "sent": sum(offsets.values()),
        "answered": sum(map(len, answers.values())),
        "in_order_once": all(ids == expected for ids in answers.values()),
    }


# -- the test's side --------------------------------------------------------------------


def connections_in(pid: int, stream_path: str) -> tuple[int, int]:
    """How many client connections worker ``pid`` holds, and how many of them
    its epoll watches (it reads or writes them): the kernel's word. A client
    connection is a connected socket that shares the stream socket's name."""
    accepted = set()
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[7:8] == [stream_path] and fields[4:6] == ["0001", "03"]:
                accepted.add(int(fields[6]))
    held: set[int] = set()
    watched: set[int] = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            if target.startswith("socket:["):
                held.add(int(target[8:-1]))
            elif target == "anon_inode:[eventpoll]":
                with open(f"/proc/{pid}/fdinfo/{name}") as info:
                    watched.update(
                        int(field[4:], 16)
                        for field in info.read().split()
                        if field.startswith("ino:")
                        and len(field) > 4  # a watched fd's; the epoll's own is "ino:\t.."
                    )
        except OSError:
            continue  # closed meanwhile
    mine = held & accepted
    return len(mine), len(mine & watched)


def test_requests_waiting_for_the_master_stop_at_the_uid_budget(
    start_daemon: StartDaemon, fd_users: FdUsers
) -> None:
    daemon = start_daemon("--forward-bytes-per-uid", str(BUDGET), workers=1)
    a, b = fd_users.other, fd_users.owner
    assert daemon.status()["limits"]["forward_bytes_per_uid"] == BUDGET
    warm_up(daemon, b)
    (worker,) = daemon.worker_pids()
    stream = str(daemon.stream_path)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    sent_r, sent_w = os.pipe()
    pending = start_as(a, flood, str(daemon.socket_dir), ready_w, go_r, sent_w, keep=(ready_w, go_r, sent_w))
    for fd in (ready_w, go_r, sent_w):
        os.close(fd)
    try:
        assert select.select([ready_r], [], [], 30)[0], "a did not connect in 30 s"
        assert os.read(ready_r, 64) == b"connected", f"a failed: {pending.result(5)}"
        every = (CONNECTIONS, CONNECTIONS)
        wait_for(lambda: connections_in(worker, stream) == every, what="the worker reading a's connections")
        before = rss_kib(worker) * 1024
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            os.close(go_w)
            go_w = -1
            # Either the worker stops reading every one of a's connections, or
            # (without the budget) it reads all a sent.
            wait_for(
                lambda: (
                    connections_in(worker, stream) == (CONNECTIONS, 0)
                    or select.select([sent_r], [], [], 0)[0]
                ),
                timeout=20,
                what="the worker to stop reading a, or to take all of it",
            )
            grown = rss_kib(worker) * 1024 - before
            # The budget, the request that crossed it, and per connection a
            # held request and the rest of the read it came in.
            bound = forward_bound(SETTINGS) + CONNECTIONS * (BODY + READ_BUFFER_SIZE)
            total = CONNECTIONS * PER_CONNECTION * BODY
            assert grown <= bound + SLACK, (
                f"the worker grew {grown} bytes while a's requests waited for the master "
                f"(bound {bound}; a sent {total})"
            )
            assert connections_in(worker, stream) == (CONNECTIONS, 0), "the worker still reads a"
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        # a goes on flooding (most of its requests are still to come): b is served.
        b_is_served(daemon, b, "b-during")
        held = holdings_of(daemon.status(), a.pw_uid) or {}
        assert held.get("forward_bytes", 0) <= forward_bound(SETTINGS), held
    finally:
        for fd in (ready_r, go_w, sent_r):
            if fd >= 0:
                os.close(fd)
    outcome = pending.result(60)
    assert outcome.ok, outcome
    assert outcome.value == {
        "sent": CONNECTIONS * PER_CONNECTION * len(_request(1)),
        "answered": CONNECTIONS * PER_CONNECTION,
        "in_order_once": True,
    }
    try:
        gone = daemon.settled_status(lambda s: holdings_of(s, a.pw_uid) is None)
    except TimeoutError:
        raise AssertionError(json.dumps(daemon.status()["uids"])) from None
    assert all(held.get("forward_bytes", 0) == 0 for held in gone["uids"]), gone["uids"]
    print(f"worker grew {grown} bytes with a's {total} bytes of requests")


STATUS_BUDGET = 256 << 10
STATUS_QUERIES = 3000  # 256 bytes each against the budget: 1024 fit


def pipeline_status(socket_dir: str, ready_w: int, go_r: int) -> dict[str, Any]:
    """Send every STATUS query at once, say so, then read the answers once
    the test lets the master go on."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(f"{socket_dir}/stream.sock")
    sock.sendall(encode_frame(Op.ECHO, 1 << 30, b"hello"))
    assert sock.recv(64)
    os.write(ready_w, b"connected")
    os.read(go_r, 1)  # the master is stopped now
    sock.sendall(b"".join(encode_frame(Op.STATUS, i + 1, b"") for i in range(STATUS_QUERIES)))
    os.write(ready_w, b"sent")
    os.close(ready_w)
    decoder = FrameDecoder(1 << 24)
    ids: list[int] = []
    while len(ids) < STATUS_QUERIES:
        chunk = sock.recv(1 << 20)
        assert chunk, "the daemon closed a's connection"
        decoder.receive_data(chunk)
        while (frame := decoder.next_event()) is not NEED_DATA:
            assert frame.op == Op.STATUS_REPLY, frame
            ids.append(frame.request_id)
    sock.close()
    return {"in_order_once": ids == list(range(1, STATUS_QUERIES + 1))}


def test_status_queries_waiting_for_the_master_count_against_the_budget(
    start_daemon: StartDaemon, fd_users: FdUsers
) -> None:
    """STATUS is answered by the master too, and was counted nowhere: one
    connection could pipeline queries without end while the master did not
    read its worker."""
    daemon = start_daemon("--forward-bytes-per-uid", str(STATUS_BUDGET), workers=1)
    a, b = fd_users.other, fd_users.owner
    (worker,) = daemon.worker_pids()
    stream = str(daemon.stream_path)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pending = start_as(a, pipeline_status, str(daemon.socket_dir), ready_w, go_r, keep=(ready_w, go_r))
    os.close(ready_w)
    os.close(go_r)
    try:
        assert select.select([ready_r], [], [], 30)[0], "a did not connect in 30 s"
        assert os.read(ready_r, 9) == b"connected", f"a failed: {pending.result(5)}"
        wait_for(lambda: connections_in(worker, stream) == (1, 1), what="the worker reading a")
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            os.close(go_w)
            go_w = -1
            assert select.select([ready_r], [], [], 20)[0], "a could not send its queries"
            wait_for(lambda: connections_in(worker, stream) == (1, 0), what="the worker to stop reading a")
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        b_is_served(daemon, b, "b-status")
    finally:
        os.close(ready_r)
        if go_w >= 0:
            os.close(go_w)
    outcome = pending.result(60)
    assert outcome.ok, outcome
    assert outcome.value == {"in_order_once": True}


HELD_CONNECTIONS = 256
LARGE = 200 << 10  # a frame that fits one read of the worker's: it is never partly received for long
PARTIAL_BUDGET = 4 << 20
FORWARDED = (1 << 20) // LARGE + 1  # requests forwarded before the 1 MiB forward budget holds a


def _unread(sock: socket.socket) -> int:
    """Bytes sent on ``sock`` that its peer has not read (SIOCOUTQ)."""
    try:
        (unread,) = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))
    except OSError:
        return 0  # closed by the daemon: nothing more will be read
    return int(unread)


def one_large_request_each(socket_dir: str, ready_w: int, go_r: int) -> dict[str, Any]:
    """On each connection one large request (200 KiB), sent while the
    master is stopped; then what became of each: answered, or cut off."""
    socks = []
    for _ in range(HELD_CONNECTIONS):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(f"{socket_dir}/stream.sock")
        sock.sendall(encode_frame(Op.ECHO, 1 << 30, b"hello"))
        assert sock.recv(64)
        socks.append(sock)
    os.write(ready_w, b"connected")
    os.read(go_r, 1)  # the master is stopped now
    request = encode_frame(Op.HISTORY, 1, encode_json({"count": 1, "pad": "p" * (LARGE - 64)}))
    for sock in socks:
        with contextlib.suppress(OSError):  # cut off while sending: read below
            sock.sendall(request)
    # Once the worker has read every byte sent (or closed the connection),
    # what it holds is final: say so.
    deadline = time.monotonic() + 20
    while any(_unread(sock) for sock in socks) and time.monotonic() < deadline:
        time.sleep(0.01)  # the kernel has no event for "the peer read it all"
    os.write(ready_w, b"sent")
    os.close(ready_w)
    fates: dict[str, int] = {}
    for sock in socks:
        sock.settimeout(30)  # answered once the master goes on
        decoder = FrameDecoder(1 << 24)
        fate = "EOF"
        while fate == "EOF":
            try:
                chunk = sock.recv(1 << 20)
            except ConnectionResetError:
                break
            except TimeoutError:
                fate = "no answer"
                break
            if not chunk:
                break
            decoder.receive_data(chunk)
            while (frame := decoder.next_event()) is not NEED_DATA:
                fate = (
                    "answered"
                    if frame.op != Op.ERROR
                    else f"ERROR {ErrorCode(decode_error(frame.body)[0]).name}"
                )
        fates[fate] = fates.get(fate, 0) + 1
        sock.close()
    return fates


def test_frames_held_on_many_connections_count_against_the_partial_budget(
    start_daemon: StartDaemon, fd_users: FdUsers
) -> None:
    """Every connection held back keeps the frame it could not pass on.
    Past the forward budget each of a's connections holds one, up to
    --max-frame-size: uncounted, 256 connections with a 200 KiB request
    each made the worker grow by 52.8 MB. They count with the partial
    frames, so past that budget the connection whose read brought it there
    is cut off (OVER_BUDGET); the others are answered once the master goes on."""
    daemon = start_daemon(
        "--forward-bytes-per-uid", "1M", "--partial-bytes-per-uid", str(PARTIAL_BUDGET), workers=1
    )
    a, b = fd_users.other, fd_users.owner
    warm_up(daemon, b)
    (worker,) = daemon.worker_pids()
    stream = str(daemon.stream_path)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pending = start_as(a, one_large_request_each, str(daemon.socket_dir), ready_w, go_r, keep=(ready_w, go_r))
    os.close(ready_w)
    os.close(go_r)
    settings = Settings(forward_bytes_per_uid=1 << 20, partial_bytes_per_uid=PARTIAL_BUDGET)
    try:
        assert select.select([ready_r], [], [], 30)[0], "a did not connect in 30 s"
        assert os.read(ready_r, 9) == b"connected", f"a failed: {pending.result(5)}"
        every = (HELD_CONNECTIONS, HELD_CONNECTIONS)
        wait_for(lambda: connections_in(worker, stream) == every, what="the worker reading a's connections")
        before = rss_kib(worker) * 1024
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            os.close(go_w)
            go_w = -1
            assert select.select([ready_r], [], [], 20)[0], "a could not send its requests"
            # Each of a's connections is forwarded (the first few: it waits for
            # its answer, watched), held (not watched) or cut off (closed).
            kept, watched = connections_in(worker, stream)
            # The ones forwarded wait for their answers; the held ones are not read.
            assert watched < kept, (kept, watched)
            grown = rss_kib(worker) * 1024 - before
            bound = forward_bound(settings) + PARTIAL_BUDGET + READ_BUFFER_SIZE
            assert grown <= bound + SLACK, f"the worker grew {grown} bytes holding a's frames (bound {bound})"
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        b_is_served(daemon, b, "b-held")
    finally:
        os.close(ready_r)
        if go_w >= 0:
            os.close(go_w)
    outcome = pending.result(60)
    assert outcome.ok, outcome
    fates = outcome.value
    assert fates == {"answered": kept, "ERROR OVER_BUDGET": HELD_CONNECTIONS - kept}, fates
    # Forwarded (and a couple more the channel's socket buffer took from the
    # ledger), plus those held within the partial-frame budget.
    assert kept <= FORWARDED + 2 + (PARTIAL_BUDGET + READ_BUFFER_SIZE) // LARGE + 1, fates
    print(f"worker grew {grown} bytes; a's connections: {fates}")
