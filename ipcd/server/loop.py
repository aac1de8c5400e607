"""A minimal single-threaded event loop: epoll readiness plus timers.

Theory of operation: ipcd uses epoll directly rather than asyncio.
Measured with ``make bench`` (scenario ``loop``, the same framed echo on
both), ``selectors`` and asyncio are about equal in throughput and CPU per
message, and the plain selector loop has a few to 30 percent lower
per-request latency: each readiness event costs one dict lookup and one call
here, against asyncio's handle objects and ready queue. This loop goes one
step further and talks to ``select.epoll`` itself: ``selectors`` builds a
key object for every registration and a list of (key, mask) pairs for every
wake-up, and a short connection (registered, read, unregistered) paid for
that several times. Callbacks still get ``selectors.EVENT_READ`` and
``EVENT_WRITE`` masks. Timers are a heap of (deadline, seq, handle);
cancelled ones are skipped lazily when they reach the top.

After a fork the child must only close its copy of the epoll fd: the
registrations belong to the shared epoll instance, so unregistering in the
child would unregister the parent's sockets too.
"""

from __future__ import annotations

import heapq
import itertools
import select
import selectors
import time
from collections.abc import Callable
from typing import Any

Callback = Callable[[int], None]  # receives the ready mask

_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
_EPOLL_IN = select.EPOLLIN
_EPOLL_OUT = select.EPOLLOUT
_NOT_OUT = ~select.EPOLLOUT
_NOT_IN = ~select.EPOLLIN


def _fd(fileobj: Any) -> int:
    return fileobj if isinstance(fileobj, int) else int(fileobj.fileno())


def _epoll_events(events: int) -> int:
    return (_EPOLL_IN if events & _READ else 0) | (_EPOLL_OUT if events & _WRITE else 0)


class Timer:
    __slots__ = ("callback", "cancelled", "deadline")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callback] = {}  # fd -> callback
        self._interest: dict[int, int] = {}  # fd -> EVENT_READ | EVENT_WRITE
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self.running = False
        self.now = time.monotonic()  # refreshed once per iteration: cheap "now" for callbacks

    def fileno(self) -> int:
        return self._epoll.fileno()

    def events_of(self, fileobj: Any) -> int:
        """The interest registered for ``fileobj`` (0: none)."""
        return self._interest.get(_fd(fileobj), 0)

    def add_reader(self, fileobj: Any, callback: Callback) -> None:
        self.set_events(fileobj, _READ, callback)

    def set_events(self, fileobj: Any, events: int, callback: Callback) -> None:
        """Register or change interest; ``events == 0`` unregisters."""
        fd = _fd(fileobj)
        current = self._interest.get(fd)
        if current is None:
            if events:
                try:
                    self._epoll.register(fd, _epoll_events(events))
                except FileExistsError:  # registered behind our back (a dup of a watched fd)
                    self._epoll.modify(fd, _epoll_events(events))
                self._interest[fd] = events
                self._callbacks[fd] = callback
            return
        if not events:
            self._forget(fd)
            return
        if events != current:
            try:
                self._epoll.modify(fd, _epoll_events(events))
            except FileNotFoundError:
                # The fd was closed without remove() and its number reused:
                # the kernel had dropped the old registration, so make one.
                self._epoll.register(fd, _epoll_events(events))
            self._interest[fd] = events
        self._callbacks[fd] = callback

    def remove(self, fileobj: Any) -> None:
        """Stop watching ``fileobj`` (call it before closing the fd)."""
        try:
            fd = _fd(fileobj)
        except (OSError, ValueError):
            return
        if fd in self._interest:
            self._forget(fd)

    def _forget(self, fd: int) -> None:
        del self._interest[fd]
        del self._callbacks[fd]
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass  # already closed: the kernel dropped it from the epoll set

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + delay, callback)
        heapq.heappush(self._timers, (timer.deadline, next(self._seq), timer))
        return timer

    def _run_timers(self) -> float | None:
        """Fire due timers; return seconds until the next one (None: none)."""
        timers = self._timers
        now = time.monotonic()
        while timers:
            deadline, _, timer = timers[0]
            if timer.cancelled:
                heapq.heappop(timers)
                continue
            if deadline > now:
                return deadline - now
            heapq.heappop(timers)
            timer.callback()
        return None

    def run_once(self, max_wait: float | None = None) -> None:
        wait = self._run_timers()
        if max_wait is not None:
            wait = max_wait if wait is None else min(wait, max_wait)
        try:
            ready = self._epoll.poll(-1 if wait is None else max(wait, 0.0))
        except InterruptedError:
            ready = []
        self.now = time.monotonic()
        callbacks = self._callbacks
        interest = self._interest
        for fd, happened in ready:
            callback = callbacks.get(fd)
            if callback is None:
                continue  # removed by an earlier callback of this pass
            # As selectors does: anything but plain EPOLLOUT reads as readable
            # (errors and hang-ups are found by reading), anything but plain
            # EPOLLIN as writable; then only what was asked for.
            mask = (_READ if happened & _NOT_OUT else 0) | (_WRITE if happened & _NOT_IN else 0)
            callback(mask & interest[fd])

    def run(self) -> None:
        self.running = True
        while self.running:
            self.run_once()

    def stop(self) -> None:
        self.running = False

    def close(self) -> None:
        self._epoll.close()
