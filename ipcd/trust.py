"""Is it the daemon? What a client checks before it sends anything.

Theory of operation: the socket dir and every directory on the way to it
must be changeable only by root, the caller or the daemon's user
(:func:`ipcd.safepath.check_path`: ``lstat`` of each, symlinks followed by
hand), and the peer's uid from the kernel (``SO_PEERCRED``; for datagrams
the owner of the socket file) must be root or the daemon's. The daemon's
uid is the one given, or ``$IPCD_DAEMON_UID``, or the socket dir's owner,
which must then be root or the caller. A refusal is an
:class:`~ipcd.clienterrors.UntrustedDaemon` naming the user.
"""

from __future__ import annotations

import os
from pathlib import Path

from ipcd.clienterrors import ClientError, UntrustedDaemon, unreachable
from ipcd.paths import DAEMON_UID_ENV
from ipcd.safepath import WRITABLE_BY_OTHERS, UnsafePath, check_path, describe_uid


def uid_of(user: str) -> int:
    """A uid given as digits or a user name (looked up only then: start-up
    time). Raises KeyError for an unknown name."""
    if user.isdigit():
        return int(user)
    import pwd  # noqa: PLC0415 - only a name needs it

    return pwd.getpwnam(user).pw_uid


def daemon_uid_from_env() -> int | None:
    """``$IPCD_DAEMON_UID`` (a uid or a user name), if set."""
    value = os.environ.get(DAEMON_UID_ENV, "")
    if not value:
        return None
    try:
        return uid_of(value)
    except KeyError:
        raise ClientError(f"{DAEMON_UID_ENV}={value}: no such user; give a user name or a uid") from None


class DaemonTrust:
    """Whom a client takes for the daemon, found before it connects: the
    uids that may serve its sockets (root and the daemon's user)."""

    def __init__(self, socket_dir: Path, path: Path, daemon_uid: int | None) -> None:
        if daemon_uid is None:
            daemon_uid = daemon_uid_from_env()
        self.named = daemon_uid is not None  # given, not the socket dir's owner
        trusted = {0, os.geteuid()} if daemon_uid is None else {0, os.geteuid(), daemon_uid}
        try:
            st = check_path(str(socket_dir), trusted)
            if st.st_mode & WRITABLE_BY_OTHERS:  # sticky or not: the daemon itself refuses it
                raise UnsafePath(str(socket_dir), st, writable=True)
        except UnsafePath as exc:
            raise self._unsafe(path, exc, trusted) from None
        except OSError as exc:
            raise unreachable(path, exc) from None
        self.daemon_uid = st.st_uid if daemon_uid is None else daemon_uid
        self.path = path

    @staticmethod
    def _unsafe(path: Path, exc: UnsafePath, trusted: set[int]) -> UntrustedDaemon:
        if exc.writable:
            return UntrustedDaemon(
                f"cannot trust {path}: {exc.problem}, so {exc.who_could} could replace the daemon's "
                f"sockets; ask its owner to run 'chmod go-w {exc.where}', or choose another --socket-dir"
            )
        others = sorted(trusted - {0, os.geteuid()})
        whom = f"root, you or {describe_uid(others[0])}" if others else "root or you"
        return UntrustedDaemon(
            f"cannot trust {path}: {exc.problem}, not by {whom}: that user could put an impostor "
            f"in the daemon's place; pass --daemon-uid {exc.owner} (or set IPCD_DAEMON_UID) "
            "if you trust them, "
            "or choose another --socket-dir",
            exc.owner,
        )

    def allows(self, uid: int) -> bool:
        return uid in (0, self.daemon_uid)

    def refuse(self, uid: int, what: str = "served") -> UntrustedDaemon:
        """The error for a peer (or socket file) of ``uid``, which :meth:`allows` not."""
        expected = "root"
        if self.daemon_uid:
            source = "the --daemon-uid" if self.named else "the socket dir's owner"
            expected = f"root or {describe_uid(self.daemon_uid)}, {source}"
        return UntrustedDaemon(
            f"{self.path} is {what} by {describe_uid(uid)}, not by {expected}; it may be an impostor, "
            f"nothing was sent to it: pass --daemon-uid {uid} (or set IPCD_DAEMON_UID) "
            "if you trust that user",
            uid,
        )
