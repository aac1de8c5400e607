"""Real test users shared by concurrent pytest sessions.

Several pytest sessions may run on the machine at once (CI beside a
developer's run), and they use the same user names. Each session holds
``USERS_LOCK`` shared while it uses its users, and at the end removes the
users it created only if it can then take the lock alone: one session's
teardown never deletes a user under another's running tests (a user left
behind is reused by the next session, and removed by the last one that
made it).
"""

from __future__ import annotations

import contextlib
import fcntl
import pwd
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

USERS_LOCK = Path("/run/ipcd-test-users.lock")
ALREADY_EXISTS = 9  # useradd/groupadd exit code
_LOCKED = (1, 10)  # another useradd holds /etc/passwd or /etc/group: try again


def admin(*argv: str) -> int:
    """Run useradd/groupadd/usermod; retry while another one holds the lock."""
    deadline = time.monotonic() + 20
    while True:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode in (0, ALREADY_EXISTS):
            return result.returncode
        if result.returncode not in _LOCKED or time.monotonic() > deadline:
            raise AssertionError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr}")
        time.sleep(0.1)  # a lock held by another process: nothing to wait on but time


def add_user(name: str, *extra: str) -> bool:
    """Create system user ``name`` if missing; True if this call made it."""
    argv = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", *extra, name]
    return admin(*argv) == 0


@contextlib.contextmanager
def shared(make: Callable[[], tuple[T, Callable[[], None]]]) -> Iterator[T]:
    """Hold the users lock shared around ``make()``'s users; run the cleanup
    it returned at the end only if no other session holds the lock."""
    with open(USERS_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        value, cleanup = make()
        try:
            yield value
        finally:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # another session still runs tests as them
            else:
                cleanup()


@contextlib.contextmanager
def users(names: list[str]) -> Iterator[list[pwd.struct_passwd]]:
    """The users ``names``, made if missing, shared as above."""

    def make() -> tuple[list[pwd.struct_passwd], Callable[[], None]]:
        made = [name for name in names if add_user(name)]

        def remove() -> None:
            for name in made:
                subprocess.run(["userdel", name], capture_output=True, check=False)

        return [pwd.getpwnam(name) for name in names], remove

    with shared(make) as made_users:
        yield made_users
