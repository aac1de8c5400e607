"""systemd glue: socket activation, sd_notify, the watchdog and the fd store.

Theory of operation: everything here is a no-op outside systemd, so the
daemon runs the same by hand. Passed sockets are taken only when
``LISTEN_PID`` is ours (systemd-python checks it), and told apart by socket
type: the socket unit names both the same. Other passed fds are what this
daemon pushed into systemd's fd store before a restart (named ``meta`` and
``s<N>``, and ``history``: the chat history journal). The environment
variables are removed once read, so workers and anything they spawn never
see ``LISTEN_*``, ``NOTIFY_SOCKET`` or ``WATCHDOG_*``.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import socket
import time
from collections.abc import Sequence

log = logging.getLogger("ipcd.master")

_MANAGER_VARIABLES = (
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
)


@dataclasses.dataclass
class Passed:
    """What systemd passed us at start."""

    stream: socket.socket | None = None
    dgram: socket.socket | None = None
    stored: dict[str, int] = dataclasses.field(default_factory=dict)  # fd-store name -> fd


def take_passed_fds() -> Passed:
    """The fds systemd passed (socket activation and our own fd store)."""
    passed = Passed()
    if not os.environ.get("LISTEN_FDS"):
        return passed
    daemon = importlib.import_module("systemd.daemon")  # only under a manager

    for fd, name in daemon.listen_fds_with_names(unset_environment=False).items():
        os.set_inheritable(fd, False)
        kind = _socket_type(fd)
        if (name.startswith("s") and name[1:].isdigit()) or name in ("meta", "history"):
            passed.stored[name] = fd
        elif kind == socket.SOCK_STREAM and passed.stream is None:
            passed.stream = socket.socket(fileno=fd)
        elif kind == socket.SOCK_DGRAM and passed.dgram is None:
            passed.dgram = socket.socket(fileno=fd)
        else:
            log.warning("closing an unexpected passed fd %d (%s)", fd, name)
            os.close(fd)
    for sock in (passed.stream, passed.dgram):
        if sock is not None:
            sock.setblocking(False)
    return passed


def _socket_type(fd: int) -> int | None:
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            return int(sock.type)
    except OSError:
        return None


class Manager:
    """sd_notify and the watchdog; inert when not started by systemd."""

    def __init__(self) -> None:
        self.notify_socket = os.environ.get("NOTIFY_SOCKET")
        usec = os.environ.get("WATCHDOG_USEC")
        watchdog_pid = os.environ.get("WATCHDOG_PID")
        mine = watchdog_pid is None or watchdog_pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 1e6 / 2 if usec and usec.isdigit() and mine else None
        for name in _MANAGER_VARIABLES:  # workers and their children must not inherit them
            os.environ.pop(name, None)

    @property
    def active(self) -> bool:
        return self.notify_socket is not None

    def notify(self, message: str, fds: Sequence[int] = ()) -> bool:
        if self.notify_socket is None:
            return False
        daemon = importlib.import_module("systemd.daemon")

        os.environ["NOTIFY_SOCKET"] = self.notify_socket  # sd_notify reads it; it is removed again below
        try:
            # systemd-python 235 takes len(fds) whenever fds is passed, even None.
            sent = daemon.notify(message, fds=list(fds)) if fds else daemon.notify(message)
            return bool(sent)
        except Exception as exc:  # telling the manager must never take the daemon down
            log.warning("sd_notify failed: %s", exc)
            return False
        finally:
            os.environ.pop("NOTIFY_SOCKET", None)

    def ready(self, status: str) -> None:
        self.notify(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def reloading(self) -> None:
        usec = time_monotonic_usec()
        self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading")

    def stopping(self) -> None:
        self.notify("STOPPING=1\nSTATUS=stopping")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def store_fds(self, name: str, fds: Sequence[int]) -> bool:
        return self.notify(f"FDSTORE=1\nFDNAME={name}", fds)

    def remove_fds(self, name: str) -> bool:
        return self.notify(f"FDSTOREREMOVE=1\nFDNAME={name}")


def time_monotonic_usec() -> int:
    return time.monotonic_ns() // 1000
