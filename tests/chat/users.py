"""Real users for the chat tests, and processes that act as them.

/root is 0700 on the test machine, so another user cannot start the venv's
interpreter: a process *becomes* a user by forking from the test process
and dropping its privileges (``setgroups``, ``setgid``, ``setuid``) before
it connects. Such an :class:`Actor` then serves commands sent over a
socketpair (connect, call a :class:`~ipcd.client.Client` method, post a
run of messages, collect deliveries), so one test drives several users
side by side and asserts on what each of them received.

The child closes every fd it inherited except its command pipe and stdio:
a copy of one of the test's own client sockets would otherwise keep that
connection open after the test closed it.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import time
import traceback
import warnings
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

from ipcd.client import Client, ClientError, DatagramClient, RequestTimeout, ServerError
from tests.daemon import Daemon, holder_of, wait_for

Event = tuple[str, dict[str, Any]]  # a ChatEvent's (kind, data), as pickled back


class ChatUser(NamedTuple):
    name: str
    uid: int
    gid: int


def nicks_in(daemon: Daemon, room: str) -> list[str]:
    """Who is in ``room`` now (none if it does not exist yet)."""
    try:
        with daemon.client() as client:
            return [m["nick"] for m in client.who(room)]
    except ServerError:
        return []  # no such room yet


# -- where a connection landed ------------------------------------------------------


def daemon_end(client_inode: int) -> int | None:
    """Inode of the daemon's end of the connection whose client end is
    ``client_inode``, from ss(8); None if ss does not list it (yet)."""
    out = subprocess.run(["ss", "-x", "-a", "-n"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == str(client_inode):
            return int(fields[5])
    return None


def worker_of(daemon: Daemon, client_inode: int) -> int:
    """The worker pid holding the daemon's end of a connection (after the
    connection's first answered request, so it has left the master)."""
    workers = daemon.worker_pids()
    peer: int = wait_for(lambda: daemon_end(client_inode), 5, "the connection in ss")
    holders = holder_of(peer, workers)
    assert len(holders) == 1, f"socket {peer} held by {holders} of workers {workers}"
    return holders[0]


# -- processes acting as a user -----------------------------------------------------


class ActorError(Exception):
    """A command failed in the actor; ``code`` is the daemon's error code, if any."""

    def __init__(self, kind: str, code: int | None, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.code = code
        self.message = message


class _Agent:
    """The child's side: one stream connection (and datagrams) to the daemon."""

    def __init__(self, socket_dir: str) -> None:
        self.socket_dir = socket_dir
        self.client: Client | None = None

    def identity(self) -> tuple[int, int, list[int]]:
        return os.getuid(), os.getgid(), os.getgroups()

    def connect(self) -> int:
        """(Re)connect; returns the inode of our end of the connection."""
        if self.client is not None:
            self.client.close()
        self.client = Client(self.socket_dir, timeout=10)
        return os.fstat(self.client.fileno()).st_ino

    def call(self, method: str, *args: Any) -> Any:
        assert self.client is not None
        return getattr(self.client, method)(*args)

    def post(self, messages: list[tuple[str, str]]) -> list[int]:
        """SAY each (room, text) in turn; the seqs acknowledged."""
        assert self.client is not None
        return [self.client.say(room, text) for room, text in messages]

    def collect(self, until: dict[str, int], privates: int, timeout: float) -> list[Event]:
        """Deliveries until each room in ``until`` reached that seq and
        ``privates`` private messages came (or ``timeout`` passed)."""
        assert self.client is not None
        deadline = time.monotonic() + timeout
        got: list[Event] = []
        last = dict.fromkeys(until, 0)
        private = 0
        while private < privates or any(last[room] < seq for room, seq in until.items()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                event = self.client.next_event(timeout=remaining)
            except RequestTimeout:
                break
            got.append((event.kind, event.data))
            if event.kind == "message" and event.data["room"] in last:
                last[event.data["room"]] = max(last[event.data["room"]], event.data["seq"])
            elif event.kind == "private":
                private += 1
        return got

    def dgram_say(self, room: str, text: str) -> int:
        with DatagramClient(self.socket_dir, timeout=10) as dgram:
            return dgram.say(room, text)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def _serve(channel: Connection, user: ChatUser | None, socket_dir: str) -> None:  # pragma: no cover - child
    if user is not None:
        os.setgroups([])
        os.setgid(user.gid)
        os.setuid(user.uid)
    agent = _Agent(socket_dir)
    while True:
        try:
            command, args = channel.recv()
        except EOFError:
            return
        if command == "exit":
            agent.close()
            channel.send(("ok", None))
            return
        try:
            reply: tuple[Any, ...] = ("ok", getattr(agent, command)(*args))
        except ServerError as exc:
            reply = ("error", "ServerError", exc.code, exc.message)
        except ClientError as exc:
            reply = ("error", type(exc).__name__, None, str(exc))
        except Exception as exc:
            reply = ("error", type(exc).__name__, None, "".join(traceback.format_exception(exc)))
        channel.send(reply)


class Actor:
    """A forked process acting as ``user`` (None: stay root)."""

    def __init__(self, user: ChatUser | None, socket_dir: Path) -> None:
        self.user = user
        parent, child = socket.socketpair()
        with warnings.catch_warnings():
            # 3.12 warns about fork in a threaded process; the child only
            # makes syscalls and runs this module's plain Python code.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                parent.close()
                keep = child.detach()
                for name in os.listdir("/proc/self/fd"):
                    if int(name) > 2 and int(name) != keep:
                        with contextlib.suppress(OSError):
                            os.close(int(name))
                _serve(Connection(keep), user, str(socket_dir))
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        child.close()
        self.pid = pid
        self.channel = Connection(parent.detach())
        self._waiting = False

    def start(self, command: str, *args: Any) -> None:
        """Send a command without waiting for its result (see :meth:`result`)."""
        assert not self._waiting, "the previous command's result was not read"
        self.channel.send((command, args))
        self._waiting = True

    def result(self, timeout: float = 20.0) -> Any:
        if not self.channel.poll(timeout):
            raise TimeoutError(f"actor {self.pid} gave no answer within {timeout}s")
        self._waiting = False
        reply = self.channel.recv()
        if reply[0] == "error":
            raise ActorError(reply[1], reply[2], reply[3])
        return reply[1]

    def __call__(self, command: str, *args: Any, timeout: float = 20.0) -> Any:
        self.start(command, *args)
        return self.result(timeout)

    def close(self) -> None:
        """Stop the child (its connections close with it) and reap it."""
        if self.channel.closed:
            return
        with contextlib.suppress(OSError, EOFError, TimeoutError, ActorError):
            if self._waiting:
                self.result(5)
            self("exit", timeout=5)
        self.channel.close()
        pidfd = os.pidfd_open(self.pid)
        try:
            if not select.select([pidfd], [], [], 5)[0]:  # readable once the child exited
                os.kill(self.pid, signal.SIGKILL)
        finally:
            os.close(pidfd)
        os.waitpid(self.pid, 0)
