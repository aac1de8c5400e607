"""Hostile and broken clients against a real daemon, over raw sockets.

Every test speaks the wire protocol by hand (so it can get it wrong on
purpose) and ends the same way: the daemon's fd counts, master and every
worker, are back to what they were before the scenario, and a fresh client
is still served. fds handed to the daemon are pipe write ends: once the
daemon has closed its copy the read end sees EOF, which proves the close
directly instead of inferring it from a count.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from ipcd import fdpass
from ipcd.client import DatagramClient
from ipcd.protocol import (
    NEED_DATA,
    ErrorCode,
    Frame,
    FrameDecoder,
    Op,
    decode_error,
    decode_record,
    encode_frame,
    encode_header,
    op_name,
)
from tests.daemon import Daemon, Pipes, fd_count, fd_targets, rss_kib, server_side_inode, wait_for

StartDaemon = Callable[..., Daemon]

UNKNOWN_OP = 0x3F  # not a defined op, and not a reply (high bit clear)


# -- helpers -------------------------------------------------------------------


def _ss_lines() -> list[list[str]]:
    out = subprocess.run(["ss", "-x", "-a", "-n"], capture_output=True, text=True, check=True).stdout
    return [line.split() for line in out.splitlines()[1:]]


def open_connections(daemon: Daemon) -> int:
    """Accepted (or queued) stream connections of ``daemon``, from ss(8):
    their local address is the listener's path."""
    path = str(daemon.stream_path)
    return sum(1 for f in _ss_lines() if len(f) >= 5 and f[4] == path and f[1] != "LISTEN")


def daemon_has_read_all(client: socket.socket) -> bool:
    """Whether the daemon's end of ``client``'s connection has nothing left
    unread (its Recv-Q in ss(8)). False while that end is not listed yet:
    a just-accepted connection may still be on its way to a worker."""
    try:
        inode = str(server_side_inode(client))
    except LookupError:
        return False
    return any(len(f) >= 6 and f[5] == inode and f[2] == "0" for f in _ss_lines())


class FdBaseline:
    """The daemon's fd counts with no client connected, after a warm-up
    echo; :meth:`assert_restored` waits for them to come back."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.workers = daemon.worker_pids()
        self.pids = [daemon.pid, *self.workers]
        self._wait_idle()
        after_start = self.counts()
        with daemon.client() as client:
            assert client.echo(b"warm-up") == b"warm-up"
        with DatagramClient(daemon.socket_dir, timeout=10) as dgram:
            assert dgram.echo(b"warm-up") == b"warm-up"
        self._wait_idle()
        self.baseline = self.counts()
        assert self.baseline == after_start, (
            f"a plain echo changed the daemon's fd counts: {after_start} -> {self.baseline}"
        )

    def _wait_idle(self) -> None:
        wait_for(lambda: open_connections(self.daemon) == 0, 10, "the daemon to close every connection")

    def counts(self) -> dict[int, int | None]:
        result: dict[int, int | None] = {}
        for pid in self.pids:
            try:
                result[pid] = fd_count(pid)
            except FileNotFoundError:
                result[pid] = None  # the process is gone: a crash
        return result

    def assert_restored(self, timeout: float = 10.0) -> None:
        """fds back to the baseline, same workers, and a fresh client served."""
        try:
            wait_for(lambda: self.counts() == self.baseline, timeout, "fd counts back to baseline")
        except TimeoutError:
            detail = {pid: sorted(fd_targets(pid)) for pid in self.pids if os.path.exists(f"/proc/{pid}")}
            pytest.fail(f"fd counts {self.counts()} != baseline {self.baseline}; fds now: {detail}")
        assert self.daemon.worker_pids() == self.workers, "a worker died and was replaced"
        with self.daemon.client() as client:
            assert client.echo(b"still serving") == b"still serving"
        with DatagramClient(self.daemon.socket_dir, timeout=10) as dgram:
            assert dgram.echo(b"still serving") == b"still serving"


class Raw:
    """A stream connection that sends whatever bytes it is given."""

    def __init__(self, daemon: Daemon, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(daemon.stream_path))
        self.decoder = FrameDecoder(1 << 24)
        self.eof = False

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if fds:
            sent = fdpass.send_with_fds(self.sock, [data], fds)
            if sent < len(data):
                self.sock.sendall(data[sent:])
        else:
            self.sock.sendall(data)

    def next_frame(self) -> Frame | None:
        """The next frame, or None at EOF."""
        while True:
            event = self.decoder.next_event()
            if event is not NEED_DATA:
                return event
            if self.eof:
                assert not self.decoder.buffered, "EOF in the middle of a frame from the daemon"
                return None
            got = fdpass.recv_with_fds(self.sock, 1 << 20)
            fdpass.close_fds(got.fds)
            assert not got.fds, "the daemon sent fds nobody asked for"
            if not got.data:
                self.eof = True
                continue
            self.decoder.receive_data(got.data)

    def frame(self) -> Frame:
        frame = self.next_frame()
        assert frame is not None, "the daemon closed the connection instead of answering"
        return frame

    def expect_eof(self) -> None:
        frame = self.next_frame()
        assert frame is None, f"expected EOF, got {op_name(frame.op)} (request {frame.request_id})"

    def echo(self, request_id: int, body: bytes) -> None:
        """One ECHO on this connection, answered in kind."""
        self.send(encode_frame(Op.ECHO, request_id, body))
        reply = self.frame()
        assert (reply.op, reply.request_id, reply.body) == (Op.ECHO_REPLY, request_id, body), reply


def assert_error(frame: Frame, code: ErrorCode | set[ErrorCode], request_id: int | set[int]) -> str:
    """``frame`` is an ERROR with ``code`` for ``request_id``; returns its message."""
    assert frame.op == Op.ERROR, f"expected ERROR, got {op_name(frame.op)}: {frame.body[:80]!r}"
    got, message = decode_error(frame.body)
    codes = code if isinstance(code, set) else {code}
    ids = request_id if isinstance(request_id, set) else {request_id}
    assert got in codes, f"error code {got} ({message}), expected {sorted(c.name for c in codes)}"
    assert frame.request_id in ids, f"error for request {frame.request_id}, expected {ids}: {message}"
    assert message, "an ERROR frame should say what went wrong"
    return message


@pytest.fixture
def start_daemon(socket_dir: Path) -> Iterator[StartDaemon]:
    """Start a daemon with extra flags; it must stop cleanly afterwards."""
    started: list[Daemon] = []

    def start(*args: str, workers: int = 2) -> Daemon:
        daemon = Daemon(socket_dir, *args, workers=workers)
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            code = daemon.stop()
            assert code == 0, f"ipcd exited {code} on SIGTERM:\n{daemon.log()}"


# -- 1. garbage ----------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="http"),
        pytest.param(b"\x00", id="one-byte"),
        pytest.param(b"IX", id="bad-magic-second-byte"),
        pytest.param(bytes(range(200, 256)) * 3, id="binary"),
        pytest.param(encode_header(Op.ECHO, 1, 0)[:6] + b"\x00\x01" + bytes(8), id="reserved-set"),
    ],
)
def test_garbage_gets_malformed_then_eof(daemon: Daemon, garbage: bytes) -> None:
    base = FdBaseline(daemon)
    with Raw(daemon) as raw:
        raw.send(garbage)
        assert_error(raw.frame(), ErrorCode.MALFORMED, 0)
        raw.expect_eof()
    base.assert_restored()


def test_unsupported_version_gets_bad_version_then_eof(daemon: Daemon) -> None:
    base = FdBaseline(daemon)
    header = bytearray(encode_header(Op.ECHO, 5, 3))
    header[2] = 99  # version byte
    with Raw(daemon) as raw:
        raw.send(bytes(header) + b"abc")
        message = assert_error(raw.frame(), ErrorCode.BAD_VERSION, 0)
        assert "99" in message
        raw.expect_eof()
    base.assert_restored()


# -- 2. frame size limit -------------------------------------------------------


def test_oversized_header_is_refused_before_the_body(start_daemon: StartDaemon) -> None:
    daemon = start_daemon("--max-frame-size", "4096")
    base = FdBaseline(daemon)
    with Raw(daemon) as raw:
        # Only the header: the body never comes, so an answer proves the
        # daemon decided on the header alone.
        raw.send(encode_header(Op.ECHO, 77, 1 << 20))
        message = assert_error(raw.frame(), ErrorCode.TOO_LARGE, 77)
        assert "4096" in message
        raw.expect_eof()
    base.assert_restored()


def test_frame_size_limit_is_exact(start_daemon: StartDaemon) -> None:
    daemon = start_daemon("--max-frame-size", "4096")
    base = FdBaseline(daemon)
    with Raw(daemon) as raw:
        raw.echo(1, b"x" * (4096 - 16))  # header + body == the limit: fine
        raw.send(encode_header(Op.ECHO, 2, 4096 - 15))
        assert_error(raw.frame(), ErrorCode.TOO_LARGE, 2)
        raw.expect_eof()
    base.assert_restored()


# -- 3. frames cut off ---------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 9, 16, 16 + 500])
def test_client_vanishing_mid_frame(daemon: Daemon, cut: int) -> None:
    base = FdBaseline(daemon)
    frame = encode_frame(Op.ECHO, 3, b"y" * 1000)
    with Raw(daemon) as raw:
        raw.send(frame[:cut])
        wait_for(lambda: daemon_has_read_all(raw.sock), 10, "the daemon to read the partial frame")
    wait_for(lambda: "peer closed mid-frame" in daemon.log(), 10, "the mid-frame close to be logged")
    with Raw(daemon) as other:
        other.echo(1, b"second client")
    base.assert_restored()


@pytest.mark.parametrize("cut", [1, 9, 16, 16 + 500])
def test_frame_completed_later_is_answered(daemon: Daemon, cut: int) -> None:
    base = FdBaseline(daemon)
    body = bytes(range(256)) * 4
    frame = encode_frame(Op.ECHO, 42, body)
    with Raw(daemon) as raw:
        raw.send(frame[:cut])
        wait_for(lambda: daemon_has_read_all(raw.sock), 10, "the daemon to read the partial frame")
        readable, _, _ = select.select([raw.sock], [], [], 0)
        assert not readable, "the daemon answered half a frame"
        raw.send(frame[cut:])
        reply = raw.frame()
        assert (reply.op, reply.request_id, reply.body) == (Op.ECHO_REPLY, 42, body)
        raw.echo(43, b"and the next one")
    base.assert_restored()


# -- 4. fd count mismatches ----------------------------------------------------


def test_declared_fds_missing(daemon: Daemon) -> None:
    base = FdBaseline(daemon)
    with Raw(daemon) as raw:
        raw.send(encode_frame(Op.ECHO, 11, b"where are my fds", nfds=2))
        assert_error(raw.frame(), ErrorCode.FD_MISMATCH, 11)
        raw.echo(12, b"same connection")
    base.assert_restored()


def test_fewer_fds_than_declared(daemon: Daemon) -> None:
    base = FdBaseline(daemon)
    with Raw(daemon) as raw, Pipes(1) as pipes:
        raw.send(encode_frame(Op.ECHO, 21, b"one of two", nfds=2), pipes.write_ends)
        pipes.drop_write_ends()
        assert_error(raw.frame(), ErrorCode.FD_MISMATCH, 21)
        pipes.assert_closed_elsewhere()
        raw.echo(22, b"same connection")
    base.assert_restored()


def test_undeclared_fds(daemon: Daemon) -> None:
    base = FdBaseline(daemon)
    with Raw(daemon) as raw, Pipes(2) as pipes:
        raw.send(encode_frame(Op.ECHO, 31, b"surprise"), pipes.write_ends)
        pipes.drop_write_ends()
        # The decoder can only tell the fds were nobody's once it is past
        # them, so the ECHO itself may be answered before the error comes.
        frame = raw.frame()
        if frame.op == Op.ECHO_REPLY:
            assert (frame.request_id, frame.body) == (31, b"surprise")
            frame = raw.frame()
        assert_error(frame, {ErrorCode.FD_MISMATCH, ErrorCode.FDS_NOT_EXPECTED}, {31, 0})
        pipes.assert_closed_elsewhere()
        raw.echo(32, b"same connection")
    base.assert_restored()


# -- 5. too many fds -----------------------------------------------------------


def test_200_fds_are_truncated_and_closed(daemon: Daemon) -> None:
    base = FdBaseline(daemon)
    with Raw(daemon) as raw, Pipes(200) as pipes:
        raw.send(encode_frame(Op.ECHO, 51, b"many", nfds=200), pipes.write_ends)
        pipes.drop_write_ends()
        assert_error(raw.frame(), ErrorCode.FDS_TRUNCATED, 51)
        pipes.assert_closed_elsewhere()
        raw.echo(52, b"same connection")
    base.assert_restored()


def test_fds_just_over_max_fds_are_truncated(start_daemon: StartDaemon) -> None:
    # The kernel may deliver a few more fds than asked for (the control
    # buffer is rounded up); the limit must hold all the same.
    daemon = start_daemon("--max-fds", "4")
    base = FdBaseline(daemon)
    with Raw(daemon) as raw:
        for nfds, request_id in ((5, 61), (8, 62)):
            with Pipes(nfds) as pipes:
                raw.send(encode_frame(Op.ECHO, request_id, b"over", nfds=nfds), pipes.write_ends)
                pipes.drop_write_ends()
                assert_error(raw.frame(), ErrorCode.FDS_TRUNCATED, request_id)
                pipes.assert_closed_elsewhere()
        with Pipes(4) as pipes:  # exactly the limit: received, then refused by ECHO
            raw.send(encode_frame(Op.ECHO, 63, b"at the limit", nfds=4), pipes.write_ends)
            pipes.drop_write_ends()
            assert_error(raw.frame(), ErrorCode.FDS_NOT_EXPECTED, 63)
            pipes.assert_closed_elsewhere()
        raw.echo(64, b"same connection")
    base.assert_restored()


def test_200_fds_within_max_fds_reach_echo_which_refuses_them(start_daemon: StartDaemon) -> None:
    daemon = start_daemon("--max-fds", "253")
    base = FdBaseline(daemon)
    with Raw(daemon) as raw, Pipes(200) as pipes:
        raw.send(encode_frame(Op.ECHO, 71, b"many", nfds=200), pipes.write_ends)
        pipes.drop_write_ends()
        message = assert_error(raw.frame(), ErrorCode.FDS_NOT_EXPECTED, 71)
        assert "200" in message
        pipes.assert_closed_elsewhere()
        raw.echo(72, b"same connection")
    base.assert_restored()


# -- 6. a client that does not read -------------------------------------------


def _worker_stats(daemon: Daemon, pid: int) -> dict[str, int]:
    for worker in daemon.status()["workers"]:
        if worker["pid"] == pid:
            return dict(worker)
    raise LookupError(f"worker {pid} not in status")


def test_slow_consumer_is_cut_off_with_bounded_memory(start_daemon: StartDaemon) -> None:
    # One worker, so the other client is served by the very loop that holds
    # the slow one.
    daemon = start_daemon("--send-timeout", "1", "--max-outbuf", "1M", workers=1)
    base = FdBaseline(daemon)
    (worker,) = base.workers
    assert _worker_stats(daemon, worker)["cut_off"] == 0
    rss_before = rss_kib(worker)
    peak = rss_before

    def sample() -> None:
        nonlocal peak
        peak = max(peak, rss_kib(worker))

    body = os.urandom(64 * 1024)
    limit = 256 << 20  # a daemon without backpressure would take all of it
    with Raw(daemon) as other:
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            slow.connect(str(daemon.stream_path))
            slow.setblocking(False)
            sent = 0
            request_id = 0
            pending = memoryview(b"")
            blocked = False
            while sent < limit:
                if not pending:
                    request_id += 1
                    pending = memoryview(encode_frame(Op.ECHO, request_id, body))
                    if request_id % 16 == 0:
                        sample()
                try:
                    n = slow.send(pending)
                except BlockingIOError:
                    sample()
                    _, writable, _ = select.select([], [slow], [], 0.5)
                    if not writable:
                        blocked = True  # nothing drained for 0.5s: the daemon stopped reading
                        break
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    blocked = True  # cut off already
                    break
                sent += n
                pending = pending[n:]
            blocked_at = time.monotonic()
            assert blocked, f"sent {sent} bytes without ever being blocked: no backpressure"

            def cut_off() -> bool:
                sample()
                other.echo(1000, b"still here")  # the same worker keeps serving others
                return "cut off" in daemon.log()

            wait_for(cut_off, 10, "the slow consumer to be cut off")
            assert time.monotonic() - blocked_at < 5, "cut off, but long after send-timeout 1"
            with pytest.raises((BrokenPipeError, ConnectionResetError)):
                slow.send(b"x")
        finally:
            slow.close()
        other.echo(1001, b"after the cut-off")
    sample()
    assert peak - rss_before < 64 * 1024, f"worker RSS grew by {peak - rss_before} KiB"
    status = daemon.settled_status(lambda s: s["workers"][0]["cut_off"] >= 1)
    assert status["workers"][0]["cut_off"] == 1
    assert "the client is not reading" in daemon.log()
    base.assert_restored()


# -- 7. unknown ops and bad datagrams -----------------------------------------


def test_unknown_op_is_refused_and_the_connection_goes_on(daemon: Daemon) -> None:
    base = FdBaseline(daemon)
    with Raw(daemon) as raw, Pipes(1) as pipes:
        raw.send(encode_frame(UNKNOWN_OP, 81, b"?"))
        assert_error(raw.frame(), ErrorCode.UNKNOWN_OP, 81)
        raw.send(encode_frame(UNKNOWN_OP, 82, b"?", nfds=1), pipes.write_ends)
        pipes.drop_write_ends()
        assert_error(raw.frame(), ErrorCode.UNKNOWN_OP, 82)
        pipes.assert_closed_elsewhere()
        raw.echo(83, b"same connection")
    base.assert_restored()


@contextlib.contextmanager
def dgram_socket() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind("")  # autobind: an address the daemon can answer
        sock.settimeout(5)
        yield sock
    finally:
        sock.close()


def _dgram_reply(sock: socket.socket) -> Frame:
    got = fdpass.recv_with_fds(sock, 1 << 20)
    fdpass.close_fds(got.fds)
    assert not got.fds, "the daemon sent fds in a datagram reply"
    return decode_record(got.data, max_frame_size=1 << 24)


@pytest.mark.parametrize(
    ("datagram", "code", "request_id"),
    [
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", ErrorCode.MALFORMED, 0, id="http"),
        pytest.param(b"short", ErrorCode.MALFORMED, 0, id="shorter-than-header"),
        pytest.param(encode_header(Op.ECHO, 91, 100) + b"x", ErrorCode.MALFORMED, 91, id="length-lies"),
        pytest.param(encode_frame(UNKNOWN_OP, 92, b"?"), ErrorCode.UNKNOWN_OP, 92, id="unknown-op"),
        pytest.param(encode_frame(Op.STATUS, 93), ErrorCode.UNKNOWN_OP, 93, id="stream-only-op"),
    ],
)
def test_bad_datagram_gets_error_reply(
    daemon: Daemon, datagram: bytes, code: ErrorCode, request_id: int
) -> None:
    base = FdBaseline(daemon)
    with dgram_socket() as sock:
        sock.sendto(datagram, str(daemon.dgram_path))
        assert_error(_dgram_reply(sock), code, request_id)
        sock.sendto(encode_frame(Op.ECHO, 94, b"next"), str(daemon.dgram_path))
        reply = _dgram_reply(sock)
        assert (reply.op, reply.request_id, reply.body) == (Op.ECHO_REPLY, 94, b"next")
    base.assert_restored()


def test_datagram_pong_gets_no_reply(socket_dir: Path) -> None:
    """A PONG answers a PING; as on the stream, the daemon takes it silently
    (it once answered UNKNOWN_OP). One worker reads both datagrams in
    order, so a reply to the PONG would come before the ECHO's."""
    daemon = Daemon(socket_dir, workers=1).start()
    try:
        with dgram_socket() as sock:
            sock.sendto(encode_frame(Op.PONG, 97, b"pong"), str(daemon.dgram_path))
            sock.sendto(encode_frame(Op.ECHO, 98, b"after the pong"), str(daemon.dgram_path))
            reply = _dgram_reply(sock)
            assert (reply.op, reply.request_id, reply.body) == (Op.ECHO_REPLY, 98, b"after the pong")
    finally:
        assert daemon.stop() == 0


@pytest.mark.parametrize(
    ("nfds", "code"),
    [(0, ErrorCode.FD_MISMATCH), (2, ErrorCode.FDS_NOT_EXPECTED), (1, ErrorCode.FD_MISMATCH)],
)
def test_datagram_with_fds_gets_error_and_fds_are_closed(daemon: Daemon, nfds: int, code: ErrorCode) -> None:
    base = FdBaseline(daemon)
    with dgram_socket() as sock, Pipes(2) as pipes:
        frame = encode_frame(Op.ECHO, 95, b"fds by datagram", nfds=nfds)
        fdpass.send_with_fds(sock, [frame], pipes.write_ends, str(daemon.dgram_path))
        pipes.drop_write_ends()
        assert_error(_dgram_reply(sock), code, 95)
        pipes.assert_closed_elsewhere()
    base.assert_restored()


@pytest.mark.parametrize("declared", [0, 40])
def test_datagram_with_too_many_fds_gets_fds_truncated(daemon: Daemon, declared: int) -> None:
    base = FdBaseline(daemon)
    with dgram_socket() as sock, Pipes(40) as pipes:  # over the default --max-fds 16
        frame = encode_frame(Op.ECHO, 96, b"fds by datagram", nfds=declared)
        fdpass.send_with_fds(sock, [frame], pipes.write_ends, str(daemon.dgram_path))
        pipes.drop_write_ends()
        assert_error(_dgram_reply(sock), ErrorCode.FDS_TRUNCATED, 96)
        pipes.assert_closed_elsewhere()
    base.assert_restored()


# -- 8. idle timeout -----------------------------------------------------------


def test_idle_connection_is_closed_and_keepalive_keeps_one_open(start_daemon: StartDaemon) -> None:
    daemon = start_daemon("--idle-timeout", "1")
    base = FdBaseline(daemon)
    with Raw(daemon) as silent, Raw(daemon) as lively:
        opened = time.monotonic()
        lively.send(encode_frame(Op.PING, 1, b"hello"))
        assert lively.frame() == Frame(Op.PONG, 1, b"hello")
        request_id = 1
        while time.monotonic() - opened < 2.5:
            time.sleep(0.3)  # the keep-alive interval is what is under test
            request_id += 1
            lively.send(encode_frame(Op.PING, request_id))
            reply = lively.frame()
            assert (reply.op, reply.request_id) == (Op.PONG, request_id), reply
        # The silent one was told why, then closed; 1 s idle + a 1 s sweep.
        message = assert_error(silent.frame(), ErrorCode.IDLE_TIMEOUT, 0)
        assert "idle" in message
        silent.expect_eof()
        readable, _, _ = select.select([lively.sock], [], [], 0)
        assert not readable, "the kept-alive connection got something it did not ask for"
        lively.echo(99, b"still open past 2 s")
    base.assert_restored()


def test_idle_timeout_does_not_fire_early(start_daemon: StartDaemon) -> None:
    daemon = start_daemon("--idle-timeout", "1")
    base = FdBaseline(daemon)
    with Raw(daemon) as silent:
        opened = time.monotonic()
        assert_error(silent.frame(), ErrorCode.IDLE_TIMEOUT, 0)
        elapsed = time.monotonic() - opened
        silent.expect_eof()
    assert 0.9 <= elapsed < 4, f"closed after {elapsed:.2f}s with --idle-timeout 1"
    base.assert_restored()
