"""Signals as loop events: handlers only wake the loop (the trio way).

Theory of operation: a Python signal handler runs between bytecodes, at any
point of the loop's work, so ours do nothing. ``signal.set_wakeup_fd`` makes
the interpreter write each signal number into a non-blocking socketpair; the
loop reads them and calls the registered handler in its normal flow, where
it is safe to fork, reap or touch any state.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable

from ipcd.server.loop import EventLoop

Handler = Callable[[signal.Signals], None]


def _ignore(signum: int, frame: object) -> None:
    """Installed so the default action (death, for most) does not run; the
    wakeup fd carries the signal to the loop."""


class SignalDispatcher:
    def __init__(self, loop: EventLoop) -> None:
        self._loop = loop
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._handlers: dict[int, Handler] = {}
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        loop.add_reader(self._reader, self._on_readable)

    def on(self, signum: signal.Signals, handler: Handler) -> None:
        self._handlers[signum] = handler
        signal.signal(signum, _ignore)

    def _on_readable(self, mask: int) -> None:
        try:
            data = self._reader.recv(4096)
        except BlockingIOError:
            return
        for signum in data:
            handler = self._handlers.get(signum)
            if handler is not None:
                handler(signal.Signals(signum))

    def close(self, forked: bool = False) -> None:
        """Restore default dispositions and drop the wakeup fd.

        ``forked``: we are a child that inherited this dispatcher. The
        epoll instance is shared with the parent across fork, so the child
        must not unregister anything from it (that would unregister it for
        the parent too); closing our copies of the fds is enough.
        """
        for signum in self._handlers:
            signal.signal(signum, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        if not forked:
            self._loop.remove(self._reader)
        self._reader.close()
        self._writer.close()
