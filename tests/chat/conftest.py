"""Fixtures the chat tests share: real users, processes acting as them, and
daemons started with extra flags."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import sharedusers
from tests.chat.users import Actor, ChatUser
from tests.daemon import Daemon

USER_NAMES = ["ipcd-chat-a", "ipcd-chat-b", "ipcd-chat-c"]
Spawn = Callable[[ChatUser | None], Actor]
StartDaemon = Callable[..., Daemon]


@pytest.fixture(scope="session")
def chat_users() -> Iterator[list[ChatUser]]:
    """Three real users (made with useradd if missing; removed at the end
    only if this session made them and no other session uses them)."""
    with sharedusers.users(USER_NAMES) as users:
        yield [ChatUser(user.pw_name, user.pw_uid, user.pw_gid) for user in users]


@pytest.fixture
def actors(short_tmp: Path) -> Iterator[Spawn]:
    """Start processes acting as a user; all are stopped after the test."""
    short_tmp.chmod(0o755)  # mkdtemp made it 0700: other users could not reach the sockets
    started: list[Actor] = []

    def spawn(user: ChatUser | None) -> Actor:
        actor = Actor(user, short_tmp / "s")
        started.append(actor)
        return actor

    yield spawn
    for actor in started:
        actor.close()


@pytest.fixture
def start_daemon(socket_dir: Path) -> Iterator[StartDaemon]:
    """A daemon with extra flags; it must stop cleanly at the end."""
    started: list[Daemon] = []

    def start(*args: str, workers: int = 2) -> Daemon:
        daemon = Daemon(socket_dir, *args, workers=workers).start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            code = daemon.stop()
            assert code == 0, f"ipcd exited {code} on SIGTERM:\n{daemon.log()}"
