"""fd passing and credentials over real Unix sockets.

Every fd a test opens or receives is registered with the ``fds`` fixture,
which closes what the test has not; leak checks count ``/proc/self/fd``.
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from ipcd.fdpass import (
    Credentials,
    close_fds,
    enable_credentials,
    peer_credentials,
    recv_into_with_fds,
    recv_with_fds,
    send_with_fds,
)
from ipcd.protocol import NEED_DATA, Frame, FrameDecoder, Op, encode_frame

TIMEOUT = 10.0
Pair = tuple[socket.socket, socket.socket]


class OpenFds:
    """The fds a test owns; those still open at teardown are closed."""

    def __init__(self) -> None:
        self.open: set[int] = set()

    def add(self, *fds: int) -> tuple[int, ...]:
        self.open.update(fds)
        return fds

    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        self.add(r, w)
        return r, w

    def memfd(self, content: bytes) -> int:
        fd = os.memfd_create("ipcd-test")
        self.add(fd)
        os.write(fd, content)
        return fd

    def forget(self, fd: int) -> None:
        """The test closed ``fd`` itself (or had it closed)."""
        self.open.remove(fd)

    def close_all(self) -> None:
        for fd in self.open:
            os.close(fd)
        self.open.clear()


@pytest.fixture
def fds() -> Iterator[OpenFds]:
    owned = OpenFds()
    try:
        yield owned
    finally:
        owned.close_all()


def pair(kind: socket.SocketKind) -> Iterator[Pair]:
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    with a, b:
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        yield a, b


@pytest.fixture
def stream() -> Iterator[Pair]:
    yield from pair(socket.SOCK_STREAM)


@pytest.fixture
def dgram() -> Iterator[Pair]:
    yield from pair(socket.SOCK_DGRAM)


@pytest.fixture(params=[socket.SOCK_STREAM, socket.SOCK_DGRAM], ids=["stream", "dgram"])
def any_pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    yield from pair(request.param)


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def our_credentials() -> Credentials:
    return Credentials(os.getpid(), os.getuid(), os.getgid())


# -- fds ------------------------------------------------------------------------


def test_received_fd_is_the_same_pipe(any_pair: Pair, fds: OpenFds) -> None:
    a, b = any_pair
    r, w = fds.pipe()
    assert send_with_fds(a, [b"frame"], [w]) == 5
    got = recv_with_fds(b, 64)
    fds.add(*got.fds)
    assert (got.data, got.truncated, got.creds) == (b"frame", False, None)
    assert len(got.fds) == 1
    assert got.fds[0] not in (r, w)
    os.write(got.fds[0], b"through the copy")
    assert os.read(r, 100) == b"through the copy"


def test_several_fds_arrive_in_order(any_pair: Pair, fds: OpenFds) -> None:
    a, b = any_pair
    r, w = fds.pipe()
    memfd = fds.memfd(b"shared memory")
    send_with_fds(a, [b"three"], [r, w, memfd])
    got = recv_with_fds(b, 64)
    got_r, got_w, got_memfd = fds.add(*got.fds)
    os.write(got_w, b"ab")
    assert os.read(got_r, 2) == b"ab"
    assert os.pread(got_memfd, 13, 0) == b"shared memory"
    os.pwrite(got_memfd, b"S", 0)
    assert os.pread(memfd, 1, 0) == b"S"


def test_received_fds_are_close_on_exec(any_pair: Pair, fds: OpenFds) -> None:
    a, b = any_pair
    _, w = fds.pipe()
    os.set_inheritable(w, True)  # the sender's flag is not what we check
    send_with_fds(a, [b"x"], [w])
    (got,) = fds.add(*recv_with_fds(b, 64).fds)
    assert fcntl.fcntl(got, fcntl.F_GETFD) & fcntl.FD_CLOEXEC


@pytest.mark.parametrize(
    ("sent", "passcred"),
    [(3, False), (10, False), (10, True), (253, False)],
    ids=["3", "10", "10-with-creds", "253"],
)
def test_more_fds_than_maxfds_are_all_closed(stream: Pair, fds: OpenFds, sent: int, passcred: bool) -> None:
    a, b = stream
    _, w = fds.pipe()
    if passcred:
        enable_credentials(b)
    before = open_fd_count()
    send_with_fds(a, [b"x"], [w] * sent)
    got = recv_with_fds(b, 64, maxfds=2)
    fds.add(*got.fds)
    assert (got.data, got.fds, got.truncated) == (b"x", (), True)
    assert open_fd_count() == before


def test_exactly_maxfds_fds_are_received(stream: Pair, fds: OpenFds) -> None:
    a, b = stream
    r, w = fds.pipe()
    send_with_fds(a, [b"x"], [r, w])
    got = recv_with_fds(b, 64, maxfds=2)
    fds.add(*got.fds)
    assert not got.truncated
    assert len(got.fds) == 2


def test_recv_into_keeps_the_maxfds_limit_too(dgram: Pair, fds: OpenFds) -> None:
    a, b = dgram
    r, w = fds.pipe()
    buffer = bytearray(64)
    before = open_fd_count()
    send_with_fds(a, [b"over"], [w] * 10)
    got = recv_into_with_fds(b, buffer, maxfds=2)
    fds.add(*got.fds)
    assert (got.nbytes, got.fds, got.truncated) == (4, (), True)
    assert open_fd_count() == before
    send_with_fds(a, [b"ok"], [w])
    got = recv_into_with_fds(b, buffer, maxfds=2)
    (received,) = fds.add(*got.fds)
    assert (bytes(buffer[: got.nbytes]), got.truncated, got.data_truncated) == (b"ok", False, False)
    os.write(received, b"!")
    assert os.read(r, 1) == b"!"


def test_recv_into_reports_a_datagram_larger_than_the_buffer(dgram: Pair) -> None:
    a, b = dgram
    a.send(b"0123456789")
    buffer = bytearray(4)
    got = recv_into_with_fds(b, buffer)
    assert (got.nbytes, got.data_truncated, bytes(buffer)) == (4, True, b"0123")


def test_close_fds_ignores_fds_already_closed() -> None:
    before = open_fd_count()
    r, w = os.pipe()
    os.close(r)
    close_fds([r, w])
    close_fds([])
    assert open_fd_count() == before


# -- credentials --------------------------------------------------------------


def test_peer_credentials_of_a_socketpair_are_our_own(stream: Pair) -> None:
    a, b = stream
    assert peer_credentials(a) == our_credentials()
    assert peer_credentials(b) == our_credentials()


CONNECT_AND_WAIT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("\\0" + sys.argv[1])
s.recv(1)
"""

SEND_ONE_DATAGRAM = """
import socket, sys
socket.socket(fileno=int(sys.argv[1])).send(b"from the child")
"""


def run_child(code: str, *args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code, *args], pass_fds=pass_fds)


def test_peer_credentials_name_the_process_that_connected() -> None:
    name = f"ipcd-test-peercred-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind("\0" + name)
        listener.listen(1)
        listener.settimeout(TIMEOUT)
        child = run_child(CONNECT_AND_WAIT, name)
        try:
            conn, _ = listener.accept()
            with conn:
                creds = peer_credentials(conn)
                conn.sendall(b"x")
            assert child.wait(TIMEOUT) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert creds == Credentials(child.pid, os.getuid(), os.getgid())
    assert child.pid != os.getpid()


def test_datagram_carries_our_credentials_once_enabled(dgram: Pair) -> None:
    a, b = dgram
    a.send(b"before")
    assert recv_with_fds(b, 64).creds is None
    enable_credentials(b)
    a.send(b"after")
    got = recv_with_fds(b, 64)
    assert (got.data, got.creds) == (b"after", our_credentials())


def test_datagram_credentials_name_the_sending_process(dgram: Pair) -> None:
    a, b = dgram
    enable_credentials(b)
    child = run_child(SEND_ONE_DATAGRAM, str(a.fileno()), pass_fds=(a.fileno(),))
    try:
        got = recv_with_fds(b, 64)
        assert child.wait(TIMEOUT) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert got.data == b"from the child"
    assert got.creds == Credentials(child.pid, os.getuid(), os.getgid())


def test_credentials_and_fds_in_one_datagram(dgram: Pair, fds: OpenFds) -> None:
    a, b = dgram
    r, w = fds.pipe()
    enable_credentials(b)
    send_with_fds(a, [b"both"], [w])
    got = recv_with_fds(b, 64)
    (received,) = fds.add(*got.fds)
    assert got.creds == our_credentials()
    os.write(received, b"?")
    assert os.read(r, 1) == b"?"


# -- sending -----------------------------------------------------------------------


def test_several_buffers_make_one_datagram(dgram: Pair) -> None:
    a, b = dgram
    assert send_with_fds(a, [b"ab", memoryview(b"cd")]) == 4
    assert recv_with_fds(b, 64).data == b"abcd"


def test_send_to_an_address_and_see_who_sent(fds: OpenFds) -> None:
    server_name = f"\0ipcd-test-dgram-server-{os.getpid()}".encode()
    client_name = f"\0ipcd-test-dgram-client-{os.getpid()}".encode()
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client,
    ):
        server.bind(server_name)
        client.bind(client_name)
        server.settimeout(TIMEOUT)
        r, w = fds.pipe()
        send_with_fds(client, [b"hello"], [w], address=server_name)
        got = recv_with_fds(server, 64)
        (received,) = fds.add(*got.fds)
        assert (got.data, got.address) == (b"hello", client_name)
        os.write(received, b"1")
        assert os.read(r, 1) == b"1"


def test_eof_on_a_stream_is_empty_data(stream: Pair) -> None:
    a, b = stream
    a.shutdown(socket.SHUT_WR)
    assert recv_with_fds(b, 64).data == b""


def test_nothing_to_read_on_a_non_blocking_socket_raises(stream: Pair) -> None:
    _, b = stream
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        recv_with_fds(b, 64)


# -- the kernel behaviour the frame decoder relies on ---------------------------------


def test_stream_read_glues_earlier_bytes_to_the_fd_write_and_stops_after_it(
    stream: Pair, fds: OpenFds
) -> None:
    a, b = stream
    _, w = fds.pipe()
    ping = encode_frame(Op.PING, 1)
    with_fd = encode_frame(Op.ECHO, 2, b"fd", nfds=1)
    after = encode_frame(Op.ECHO, 3, b"after")
    a.sendall(ping)
    send_with_fds(a, [with_fd], [w])
    a.sendall(after)
    first = recv_with_fds(b, 4096)
    fds.add(*first.fds)
    assert (first.data, len(first.fds)) == (ping + with_fd, 1)
    second = recv_with_fds(b, 4096)
    assert (second.data, second.fds) == (after, ())
    decoder = FrameDecoder()
    decoder.receive_data(first.data, first.fds)
    decoder.receive_data(second.data, second.fds)
    assert decoder.next_event() == Frame(Op.PING, 1)
    assert decoder.next_event() == Frame(Op.ECHO, 2, b"fd", first.fds)
    assert decoder.next_event() == Frame(Op.ECHO, 3, b"after")
    assert decoder.next_event() is NEED_DATA
