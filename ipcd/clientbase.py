"""What both clients share: where the daemon is, whom to trust there, the
rule for seconds, and the context-manager plumbing.

Theory of operation: :class:`ClientBase` finds the socket (the socket dir:
given, ``$IPCD_SOCKET_DIR``, or ``/tmp/ipcd``) and makes the
:class:`~ipcd.trust.DaemonTrust` that each client consults before it sends
a byte; :class:`ipcd.client.Client` (the stream) and
:class:`ipcd.dgramclient.DatagramClient` build on it.
"""

from __future__ import annotations

import socket
from pathlib import Path
from types import TracebackType
from typing import Self

from ipcd.paths import default_socket_dir
from ipcd.protocol import RemoteProtocolError, fields
from ipcd.trust import DaemonTrust

DEFAULT_TIMEOUT = 10.0
RECV_SIZE = 256 * 1024  # one read of replies; also the largest datagram answered


def check_seconds(value: float, what: str, *, positive: bool) -> None:
    """The daemon's rule for a seconds field, applied before sending: NaN or
    inf would not even be JSON, and would break the socket timeout."""
    try:
        fields.seconds(value, what, 0.0, positive=positive)
    except RemoteProtocolError as exc:
        raise ValueError(exc.message) from None


class ClientBase:
    """What both clients share: where the daemon is, whom to trust there,
    and the context-manager plumbing."""

    sock: socket.socket

    def _locate(
        self, socket_dir: str | Path | None, socket_name: str, timeout: float | None, daemon_uid: int | None
    ) -> None:
        self.socket_dir = Path(socket_dir) if socket_dir is not None else default_socket_dir()
        self.path = self.socket_dir / socket_name
        self.timeout = timeout
        self.trust = DaemonTrust(self.socket_dir, self.path, daemon_uid)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()
