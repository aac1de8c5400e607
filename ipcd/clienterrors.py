"""The client library's exceptions, each with a message fit to show a user.

Theory of operation: every failure of :mod:`ipcd.client` is a
:class:`ClientError`; which one says what a caller (``ipcctl`` picks its
exit status from it) can do: no daemon (:class:`DaemonUnreachable`), maybe
not the daemon (:class:`UntrustedDaemon`), no answer in time
(:class:`RequestTimeout`), refused (:class:`ServerError`, with the
protocol's error code) or gone (:class:`ConnectionLost`).
"""

from __future__ import annotations

import errno
from pathlib import Path

from ipcd.protocol import ErrorCode, Frame, decode_error


class ClientError(Exception):
    """Base of every client error."""


class DaemonUnreachable(ClientError):
    """No daemon answers at the socket path; ``errno`` says why (ENOENT,
    ECONNREFUSED: none runs; EACCES: one may run, but not for us)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class UntrustedDaemon(ClientError):
    """What listens at the socket path may not be the daemon: the way to it
    can be changed by someone untrusted, or someone else serves it. Nothing
    was sent. ``uid`` is the user to blame, when it is one user."""

    def __init__(self, message: str, uid: int | None = None) -> None:
        super().__init__(message)
        self.uid = uid


class RequestTimeout(ClientError):
    """The daemon did not answer in time."""


class ConnectionLost(ClientError):
    """The daemon closed the connection (its reason, if it sent one, is the
    message, and its error code, such as SHUTTING_DOWN, is ``code``)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code

    @property
    def code_name(self) -> str | None:
        return None if self.code is None else _code_name(self.code)


class ServerError(ClientError):
    """The daemon answered with an ERROR frame."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def code_name(self) -> str:
        return _code_name(self.code)


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)


def connection_error(frame: Frame) -> ClientError:
    """An ERROR about the connection itself (request id 0): codes 40-49 mean
    the daemon is closing it; the others refuse something we did."""
    code, message = decode_error(frame.body)
    return ConnectionLost(message, code) if code >= ErrorCode.SLOW_CONSUMER else ServerError(code, message)


def unreachable(path: Path, exc: OSError) -> DaemonUnreachable:
    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
        hint = "is ipcd running? start it with 'ipcd serve' or check --socket-dir"
    elif exc.errno == errno.EACCES:
        hint = "ask the admin for access (the daemon's --socket-mode and --socket-group)"
    else:
        hint = "check that ipcd is running"
    return DaemonUnreachable(f"cannot connect to {path}: {exc.strerror}; {hint}", exc.errno)
