"""What an open file descriptor is, for ``ipcctl ls``.

Theory of operation: the daemon holds the fds it stores, so it can look at
them itself rather than trust what the putter says: ``fstat`` gives the
kind, ``/proc/self/fd`` the path (or ``pipe:[...]``, ``/memfd:...``),
``/proc/self/fdinfo`` the open flags, and for sockets ``getsockopt`` the
family, type and whether it listens. Nothing here changes the fd (no read,
no seek, no close of the original).
"""

from __future__ import annotations

import os
import socket
import stat
from typing import Any

_FAMILIES = {socket.AF_UNIX: "unix", socket.AF_INET: "inet", socket.AF_INET6: "inet6"}
_TYPES = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "dgram", socket.SOCK_SEQPACKET: "seqpacket"}
_ACCESS = {os.O_RDONLY: "r", os.O_WRONLY: "w", os.O_RDWR: "rw"}


def _open_flags(fd: int) -> int | None:
    try:
        with open(f"/proc/self/fdinfo/{fd}") as fh:
            for line in fh:
                if line.startswith("flags:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _socket_info(fd: int) -> dict[str, Any]:
    info: dict[str, Any] = {}
    sock = socket.socket(fileno=os.dup(fd))  # a duplicate: closing it leaves ours open
    try:
        info["family"] = _FAMILIES.get(sock.family, str(int(sock.family)))
        info["type"] = _TYPES.get(sock.type, str(int(sock.type)))
        info["listening"] = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        try:
            address = sock.getsockname()
        except OSError:
            address = None
        if isinstance(address, tuple):
            info["address"] = (
                f"[{address[0]}]:{address[1]}"
                if sock.family == socket.AF_INET6
                else (f"{address[0]}:{address[1]}")
            )
        elif isinstance(address, str) and address:
            info["address"] = address
        elif isinstance(address, bytes) and address:
            info["address"] = "@" + address[1:].decode(errors="replace")
    finally:
        sock.close()
    return info


def describe(fd: int) -> dict[str, Any]:
    """Kind, path and flags of ``fd`` (plus socket details for sockets)."""
    info: dict[str, Any] = {}
    try:
        st = os.fstat(fd)
    except OSError as exc:
        return {"kind": "invalid", "error": exc.strerror}
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        target = ""
    mode = st.st_mode
    if stat.S_ISSOCK(mode):
        info["kind"] = "socket"
        info.update(_socket_info(fd))
    elif stat.S_ISFIFO(mode):
        info["kind"] = "pipe"
    elif stat.S_ISDIR(mode):
        info["kind"] = "directory"
        info["path"] = target
    elif stat.S_ISREG(mode):
        info["kind"] = "memfd" if target.startswith("/memfd:") else "file"
        info["path"] = target
        info["size"] = st.st_size
    elif stat.S_ISCHR(mode):
        info["kind"] = "tty" if os.isatty(fd) else "char-device"
        info["path"] = target
    elif stat.S_ISBLK(mode):
        info["kind"] = "block-device"
        info["path"] = target
    else:
        info["kind"] = "other"
        info["path"] = target
    flags = _open_flags(fd)
    if flags is not None:
        info["access"] = _ACCESS.get(flags & os.O_ACCMODE, "?")
        extra = [name for name, bit in (("append", os.O_APPEND), ("nonblock", os.O_NONBLOCK)) if flags & bit]
        if extra:
            info["flags"] = extra
    return info
