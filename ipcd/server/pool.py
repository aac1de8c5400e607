"""The worker pool: spawning, states, reaping and the crash-loop policy.

Theory of operation (states, after supervisor)::

    STARTING --READY--> RUNNING --reload--> DRAINING --exit--> (gone)
        |                  |
        +--exit--> boot failure   +--exit--> crash: respawn at once

A worker is constructed in the master and forked; the child closes what is
the master's (``child_setup``) and runs :class:`Worker` until it returns,
then ``os._exit``s, never unwinding into the master's code. A worker that
exits before READY is a boot failure (a crash after READY is respawned at
once, whatever its exit code); after
``MAX_BOOT_FAILURES`` in a row the pool gives up and the master
stops with an error instead of forking forever. Boot failures back off
exponentially. Reaping is ``waitpid(-1, WNOHANG)`` until nothing is left.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable

from ipcd.link.ops import ChannelOp
from ipcd.server.channel import Channel, ChannelClosed
from ipcd.settings import Settings

log = logging.getLogger("ipcd.master")

EXIT_BOOT_FAILED = 3  # the worker cannot start at all: retrying will not help
MAX_BOOT_FAILURES = 5
_BACKOFF_BASE = 0.1
_BACKOFF_MAX = 5.0


class WorkerState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"


@dataclasses.dataclass(eq=False)
class WorkerHandle:
    pid: int
    channel: Channel
    generation: int
    state: WorkerState = WorkerState.STARTING
    started: float = dataclasses.field(default_factory=time.monotonic)
    started_wall: float = dataclasses.field(default_factory=time.time)
    passed: int = 0  # connections the master sent it
    load: dict[str, int] = dataclasses.field(default_factory=dict)  # its last LOAD report
    last_heartbeat: float = dataclasses.field(default_factory=time.monotonic)
    channel_open: bool = True

    @property
    def connections(self) -> int:
        """Open connections, counting the ones passed but not yet reported."""
        in_flight = self.passed - self.load.get("received", 0)
        return self.load.get("connections", 0) + max(in_flight, 0)


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


class WorkerPool:
    def __init__(
        self,
        settings: Settings,
        dgram: socket.socket | None,
        child_setup: Callable[[], None],
        on_channel: Callable[[WorkerHandle], None],
        remove_channel: Callable[[WorkerHandle], None],
        on_gone: Callable[[WorkerHandle], None] = lambda handle: None,
    ) -> None:
        self.settings = settings
        self.dgram = dgram
        self._child_setup = child_setup
        self._on_channel = on_channel
        self._remove_channel = remove_channel
        self._on_gone = on_gone
        self.workers: dict[int, WorkerHandle] = {}
        self.generation = 0
        self.boot_failures = 0
        self.respawns = 0
        self.gave_up: str | None = None
        self.stopping = False
        self._pending_spawns = 0
        self._respawn_after = 0.0
        self._retiring: list[WorkerHandle] = []  # old generation, serving until the new one is up

    # -- spawning ----------------------------------------------------------

    def spawn_generation(self, count: int) -> None:
        self.generation += 1
        for _ in range(count):
            self.spawn()

    def spawn(self) -> WorkerHandle:
        master_end, worker_end = Channel.pair()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                master_end.close()
                for other in self.workers.values():
                    other.channel.close()
                self._child_setup()
                from ipcd.server.worker import Worker  # noqa: PLC0415 - only children need it

                code = Worker(self.settings, worker_end, self.dgram, self.generation).run()
            except BaseException:
                traceback.print_exc()
                code = EXIT_BOOT_FAILED
            finally:
                os._exit(code)
        worker_end.close()
        handle = WorkerHandle(pid, master_end, self.generation)
        self.workers[pid] = handle
        self._on_channel(handle)
        log.debug("spawned worker %d (generation %d)", pid, self.generation)
        return handle

    # -- events from workers -----------------------------------------------

    def mark_ready(self, handle: WorkerHandle) -> None:
        if handle.state is WorkerState.STARTING:
            handle.state = WorkerState.RUNNING
            self.boot_failures = 0
        self._retire_if_ready()

    def channel_closed(self, handle: WorkerHandle) -> None:
        """EOF on the channel: the worker is dying. Stop routing to it now;
        the reap that follows decides what to do."""
        if handle.channel_open:
            handle.channel_open = False
            self._remove_channel(handle)
            handle.channel.close()
            self._on_gone(handle)

    def reap(self, on_change: Callable[[], None]) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            handle = self.workers.pop(pid, None)
            if handle is None:
                continue
            self.channel_closed(handle)
            self._after_exit(handle, status)
            on_change()

    def _after_exit(self, handle: WorkerHandle, status: int) -> None:
        how = describe_exit(status)
        if self.stopping or handle.state is WorkerState.DRAINING:
            log.info("worker %d %s", handle.pid, how)
            return
        if handle.state is WorkerState.STARTING:
            self.boot_failures += 1
            log.error("worker %d failed to boot: %s (%d in a row)", handle.pid, how, self.boot_failures)
            if self.boot_failures >= MAX_BOOT_FAILURES:
                self.gave_up = (
                    f"workers keep failing to boot ({self.boot_failures} in a row, last {how}); "
                    "see the log above for the cause"
                )
                return
            self._pending_spawns += 1
            delay = min(_BACKOFF_BASE * 2 ** (self.boot_failures - 1), _BACKOFF_MAX)
            self._respawn_after = time.monotonic() + delay
            return
        log.warning("worker %d %s; its connections are lost; respawning", handle.pid, how)
        self.respawns += 1
        self.spawn()

    def spawn_due(self) -> float | None:
        """Spawn workers waiting out a boot backoff; return seconds until the
        next is due (None: none pending)."""
        if not self._pending_spawns or self.stopping:
            return None
        wait = self._respawn_after - time.monotonic()
        if wait > 0:
            return wait
        while self._pending_spawns:
            self._pending_spawns -= 1
            self.respawns += 1
            self.spawn()
        return None

    # -- routing -----------------------------------------------------------

    def running(self) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.state is WorkerState.RUNNING and w.channel_open]

    @staticmethod
    def is_clear(handle: WorkerHandle) -> bool:
        """Running, and nothing queued for it: it may be handed a connection now."""
        return handle.state is WorkerState.RUNNING and handle.channel_open and not handle.channel.has_backlog

    def choose(self) -> WorkerHandle | None:
        """The least-loaded running worker whose channel is clear, if any.
        The master accepts only while there is one, so a burst waits in the
        kernel's listen backlog instead of piling up in the master (or being
        closed). One pass, no lists: it runs once per accepted connection."""
        best: WorkerHandle | None = None
        best_key = (0, 0)
        for handle in self.workers.values():
            if self.is_clear(handle):
                key = (handle.connections, handle.passed)
                if best is None or key < best_key:
                    best, best_key = handle, key
        return best

    def can_take(self) -> bool:
        """Whether :meth:`choose` would find a worker (asked once per loop
        pass, so it skips the load comparison)."""
        return any(self.is_clear(handle) for handle in self.workers.values())

    def pass_connection(
        self, fd: int, handle: WorkerHandle | None = None, creds: bytes = b""
    ) -> WorkerHandle | None:
        """Hand ``fd`` to ``handle``, or the worker :meth:`choose` picks, or
        else the least-loaded running one, where it waits its turn in the
        channel's order. The channel owns ``fd`` from here on: it closes it
        once sent, or at once if the worker turns out to be gone (then the
        connection is lost with it, as a crashed worker's are, and None is
        returned). None too, ``fd`` closed, if no worker runs. ``creds``: the
        peer's raw SO_PEERCRED, so that the worker need not ask again."""
        target = handle or self.choose() or min(self.running(), key=lambda w: w.connections, default=None)
        if target is None:
            os.close(fd)
            return None
        try:
            target.channel.send(ChannelOp.CONN, creds, fds=(fd,))
        except ChannelClosed:
            self.channel_closed(target)
            return None
        target.passed += 1
        return target

    def broadcast(self, op: ChannelOp, body: bytes = b"", states: tuple[WorkerState, ...] = ()) -> None:
        for handle in list(self.workers.values()):
            if handle.channel_open and (not states or handle.state in states):
                try:
                    handle.channel.send(op, body)
                except ChannelClosed:
                    pass  # its EOF is being handled

    # -- reload and stop ---------------------------------------------------

    def replace_all(self, settings: Settings) -> None:
        """Start a new generation. The old one keeps taking connections until
        every new worker is READY, and only then drains: a reload must never
        leave the master with no worker to hand a connection to."""
        self._retiring += [
            w
            for w in self.workers.values()
            if w.state is not WorkerState.DRAINING and w not in self._retiring
        ]
        self.settings = settings
        self.spawn_generation(settings.workers)

    def _retire_if_ready(self) -> None:
        current = [w for w in self.workers.values() if w.generation == self.generation]
        if not self._retiring or not current or any(w.state is WorkerState.STARTING for w in current):
            return
        retiring, self._retiring = self._retiring, []
        for handle in retiring:
            if self.workers.get(handle.pid) is not handle:
                continue  # it died meanwhile
            handle.state = WorkerState.DRAINING
            if handle.channel_open:
                try:
                    handle.channel.send(ChannelOp.DRAIN, f"{self.settings.drain_timeout}".encode())
                except ChannelClosed:
                    self._signal(handle.pid, signal.SIGTERM)

    def stop_all(self) -> None:
        self.stopping = True
        self.broadcast(ChannelOp.STOP)
        for handle in self.workers.values():
            if not handle.channel_open:
                self._signal(handle.pid, signal.SIGTERM)

    def kill_all(self) -> None:
        for pid in list(self.workers):
            self._signal(pid, signal.SIGKILL)

    def kill(self, handle: WorkerHandle, why: str) -> None:
        log.error("worker %d %s; killing it", handle.pid, why)
        self._signal(handle.pid, signal.SIGKILL)

    @staticmethod
    def _signal(pid: int, signum: signal.Signals) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
