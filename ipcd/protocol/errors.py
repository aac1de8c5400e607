"""Protocol errors, split by who is at fault (the h11 convention).

``LocalProtocolError``: our own code misused the API (encoding a body over the
limit, too many fds). It is a bug or a caller mistake, never the peer's.

``RemoteProtocolError``: the peer sent something that is not valid protocol.
It is raised only where bytes come in (the decoders). ``fatal`` says whether
the byte stream is still in sync: after a fatal error the connection must be
closed (after sending an ERROR frame, best effort); after a non-fatal one the
decoder has consumed the bad frame and can go on. ``fds`` are descriptors
that arrived with the bad frame: the caller owns them and must close them.
"""

from __future__ import annotations

from ipcd.protocol.ops import ErrorCode


class ProtocolError(Exception):
    """Base of every ipcd protocol error."""

    def __init__(self, message: str, code: ErrorCode) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""

    def __init__(
        self,
        message: str,
        code: ErrorCode,
        *,
        fatal: bool,
        request_id: int = 0,
        fds: tuple[int, ...] = (),
    ) -> None:
        super().__init__(message, code)
        self.fatal = fatal
        self.request_id = request_id
        self.fds = fds
