"""sendmsg/recvmsg with file descriptors and credentials, done safely.

Theory of operation: every fd we receive is installed close-on-exec
(``MSG_CMSG_CLOEXEC``), so no child we ever spawn inherits a client's fd by
accident. When the control buffer is too small the kernel sets
``MSG_CTRUNC`` and drops what did not fit; the fds that *did* arrive are
still ours, so we close them and report the truncation instead of handing
out a partial set. Any control message we did not ask for is closed or
ignored, never leaked. This module is the only one that parses ancillary
data.
"""

from __future__ import annotations

import _socket
import array
import os
import socket
import struct
from collections.abc import Sequence
from typing import Final, NamedTuple

_INT_SIZE: Final = array.array("i").itemsize
_UCRED: Final = struct.Struct("3i")  # pid, uid, gid

# The kernel's maximum of fds per message, and the room one credentials block takes.
MAX_FDS: Final = 253
CMSG_CREDS: Final = socket.CMSG_SPACE(_UCRED.size)


class Credentials(NamedTuple):
    pid: int
    uid: int
    gid: int


class Received(NamedTuple):
    """What one recvmsg brought. ``data == b""`` on a stream means EOF."""

    data: bytes
    fds: tuple[int, ...]
    truncated: bool  # MSG_CTRUNC: fds were dropped; ``fds`` is empty, all closed
    creds: Credentials | None
    address: str | bytes | None


# Plain ints: the socket module's flags are IntFlags, and IntFlag arithmetic
# (``flags & socket.MSG_CTRUNC``) runs in Python on every read.
_CLOEXEC: Final = int(socket.MSG_CMSG_CLOEXEC)
_CTRUNC: Final = int(socket.MSG_CTRUNC)
_TRUNC: Final = int(socket.MSG_TRUNC)
_ANY_TRUNC: Final = _CTRUNC | _TRUNC
_SOL_SOCKET: Final = int(socket.SOL_SOCKET)
_SO_PEERCRED: Final = int(socket.SO_PEERCRED)
_SCM_RIGHTS: Final = int(socket.SCM_RIGHTS)
_SCM_CREDENTIALS: Final = int(socket.SCM_CREDENTIALS)


def cmsg_space_for(nfds: int) -> int:
    """Control buffer size for up to ``nfds`` fds and one credentials block."""
    return socket.CMSG_SPACE(max(nfds, 1) * _INT_SIZE) + CMSG_CREDS


def close_fds(fds: Sequence[int]) -> None:
    """Close every fd, ignoring ones already closed (EBADF)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _parse_ancillary(ancdata: list[tuple[int, int, bytes]]) -> tuple[list[int], Credentials | None]:
    fds: list[int] = []
    creds: Credentials | None = None
    for level, kind, payload in ancdata:
        if level != _SOL_SOCKET:
            continue
        if kind == _SCM_RIGHTS:
            usable = len(payload) - len(payload) % _INT_SIZE
            fds.extend(array.array("i", payload[:usable]))
        elif kind == _SCM_CREDENTIALS and len(payload) >= _UCRED.size:
            creds = Credentials(*_UCRED.unpack_from(payload))
    return fds, creds


def _take_ancillary(
    ancdata: list[tuple[int, int, bytes]], flags: int, maxfds: int
) -> tuple[tuple[int, ...], Credentials | None, bool]:
    """fds, credentials and whether fds were truncated. On MSG_CTRUNC, or
    more fds than ``maxfds`` (the rounded-up control buffer can hold more),
    every fd that came is closed: a partial set is never handed out."""
    fds, creds = _parse_ancillary(ancdata)
    if flags & _CTRUNC or len(fds) > maxfds:
        close_fds(fds)
        return (), creds, True
    return tuple(fds), creds, False


def recv_with_fds(sock: socket.socket, bufsize: int, maxfds: int = MAX_FDS) -> Received:
    """One recvmsg that also collects fds (close-on-exec) and credentials.

    Raises what ``recvmsg`` raises (``BlockingIOError`` on a non-blocking
    socket with nothing to read). On ``MSG_CTRUNC``, or when more than
    ``maxfds`` fds arrived (the control buffer is rounded up and also holds
    room for credentials, so the kernel may deliver more than asked for),
    every fd that arrived is closed and ``truncated`` is set; the data is
    returned as usual.
    """
    data, ancdata, flags, address = sock.recvmsg(bufsize, cmsg_space_for(maxfds), _CLOEXEC)
    fds, creds, truncated = _take_ancillary(ancdata, flags, maxfds)
    return Received(data, fds, truncated, creds, address or None)


class ReceivedInto(NamedTuple):
    """What one recvmsg_into brought; the bytes are ``buffer[:nbytes]``."""

    nbytes: int
    fds: tuple[int, ...]
    truncated: bool  # as in Received: ``fds`` is empty, all closed
    creds: Credentials | None
    address: str | bytes | None
    data_truncated: bool  # MSG_TRUNC: a datagram or record did not fit the buffer


def recv_into_with_fds(
    sock: socket.socket, buffer: bytearray | memoryview, maxfds: int = MAX_FDS, cmsg_space: int = 0
) -> ReceivedInto:
    """Like :func:`recv_with_fds`, into a caller's reusable buffer (no
    allocation per read on the hot path). ``cmsg_space``, if given, is a
    precomputed ``cmsg_space_for(maxfds)``."""
    nbytes, ancdata, flags, address = sock.recvmsg_into(
        [buffer], cmsg_space or cmsg_space_for(maxfds), _CLOEXEC
    )
    if not ancdata and not flags & _ANY_TRUNC:
        return ReceivedInto(nbytes, (), False, None, address or None, False)  # the common case
    fds, creds, truncated = _take_ancillary(ancdata, flags, maxfds)
    return ReceivedInto(nbytes, fds, truncated, creds, address or None, bool(flags & _TRUNC))


def recv_stream_into(
    sock: socket.socket, buffers: list[bytearray], maxfds: int, cmsg_space: int
) -> tuple[int, tuple[int, ...], bool]:
    """(bytes read, fds, whether fds were truncated): a stream read into a
    caller's reusable ``[buffer]``, as :func:`recv_into_with_fds` does it,
    for the read of every client request (no record built, no list made)."""
    nbytes, ancdata, flags, _ = sock.recvmsg_into(buffers, cmsg_space, _CLOEXEC)
    if not ancdata and not flags & _CTRUNC:
        return nbytes, (), False  # the common case
    fds, _, truncated = _take_ancillary(ancdata, flags, maxfds)
    return nbytes, fds, truncated


def send_with_fds(
    sock: socket.socket,
    buffers: Sequence[bytes | bytearray | memoryview],
    fds: Sequence[int] = (),
    address: str | bytes | None = None,
) -> int:
    """sendmsg of ``buffers`` with ``fds`` attached to their first byte.

    Returns the number of bytes sent (on a stream maybe fewer than offered;
    the fds went with the first byte all the same).
    """
    ancdata = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))] if fds else []
    if address is None:
        return sock.sendmsg(buffers, ancdata)
    return sock.sendmsg(buffers, ancdata, 0, address)


def peer_credentials(sock: socket.socket) -> Credentials:
    """pid, uid and gid of the peer of a connected Unix socket (SO_PEERCRED),
    as the kernel recorded them at connect time: the client cannot forge them."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return Credentials(*_UCRED.unpack(raw))


def fd_peer_credentials(fd: int) -> bytes:
    """The raw SO_PEERCRED of the Unix stream socket ``fd`` (an accepted one
    with no socket object of its own): one getsockopt, no ownership taken.
    The C-level socket type: socket.socket's Python constructor would cost
    three times as much on the accept path."""
    sock = _socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fd)
    try:
        return sock.getsockopt(_SOL_SOCKET, _SO_PEERCRED, _UCRED.size)
    finally:
        sock.detach()


def parse_credentials(raw: bytes) -> Credentials:
    return Credentials(*_UCRED.unpack(raw))


def credentials_uid(raw: bytes) -> int:
    """The uid of raw SO_PEERCRED bytes, without building Credentials."""
    uid: int = _UCRED.unpack(raw)[1]
    return uid


SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+; Python lacks the constant


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """Supplementary groups of a connected peer, as recorded at connect time."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 256 * _INT_SIZE)
    except OSError:
        return ()
    return tuple(array.array("i", raw[: len(raw) - len(raw) % _INT_SIZE]))


def enable_credentials(sock: socket.socket) -> None:
    """Ask the kernel to attach the sender's credentials to every datagram."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
