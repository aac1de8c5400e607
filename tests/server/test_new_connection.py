"""A new connection is read as soon as its worker adopts it: the request a
client wrote right after connect (nearly always queued by then) is answered
without waiting for another readiness event. What a client sees must not
depend on when its bytes arrive: before the adoption, after it, or with the
end of file right behind them."""

from __future__ import annotations

import socket
from pathlib import Path

from ipcd.protocol import Op, encode_frame
from tests.daemon import Daemon, raw_connect, running_daemon

ECHO = encode_frame(Op.ECHO, 7, b"first words")
REPLY = encode_frame(Op.ECHO_REPLY, 7, b"first words")


def read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the daemon closed the connection"
        data += chunk
    return data


def test_request_and_end_of_file_sent_before_adoption_are_both_served(daemon: Daemon) -> None:
    """The first read may bring the request and the end of file together."""
    for _ in range(50):
        with raw_connect(daemon) as sock:
            sock.sendall(ECHO)
            sock.shutdown(socket.SHUT_WR)
            assert read_to_eof(sock) == REPLY


def test_a_connection_that_speaks_only_later_is_served(socket_dir: Path) -> None:
    """Nothing to read at adoption: the worker waits for readiness as before."""
    with running_daemon(socket_dir, workers=1) as daemon, raw_connect(daemon) as silent:
        # One worker takes its connections in the order they were passed:
        # once a later one is answered, the silent one was adopted (and
        # its first read found nothing).
        with raw_connect(daemon) as later:
            later.sendall(ECHO)
            assert read_exactly(later, len(REPLY)) == REPLY
        silent.sendall(ECHO)
        assert read_exactly(silent, len(REPLY)) == REPLY


def test_connections_closed_before_adoption_leave_nothing_behind(daemon: Daemon) -> None:
    """A client gone before its worker read anything: end of file at the first
    read, the connection is dropped quietly, none stays counted."""
    for _ in range(200):
        raw_connect(daemon).close()
    status = daemon.settled_status(lambda s: sum(w["connections"] for w in s["workers"]) == 1)
    assert sum(w["received"] for w in status["workers"]) >= 201
    assert "Traceback" not in daemon.log()
    assert "ERROR" not in daemon.log()
