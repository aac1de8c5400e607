"""A poster that outlives its connection and never posts a message twice.

Usage::

    from ipcd.publisher import Publisher

    with Publisher(retry_for=30) as publisher:
        seq = publisher.say_one("jobs", "backup done", None)   # acknowledged, once
        for ack in publisher.say_many("logs", enumerate(lines)):
            print(ack.tag, ack.seq)                              # in order; seq raises if refused

Theory of operation
-------------------
A post whose connection breaks before its acknowledgement arrives (the
worker killed, a reload retiring the worker with ``SHUTTING_DOWN``, the
daemon restarting) may or may not have been made. Every post of a
:class:`Publisher` therefore carries a message id, unique to the publisher
(a random prefix and a counter: ``<prefix>:<n>``), and after a lost
connection the publisher connects again, with exponential backoff (0.05 s
doubling to 2 s), and sends every post not yet acknowledged again, in the
order first sent, with the same ids (:meth:`ipcd.posting.Poster.resume`).
The daemon remembers each uid's recent ids (``--message-ids-per-uid``,
``--message-id-window``) and answers a post it already made with that
post's original reply, marked ``duplicate``: each message is posted once,
and in order, since a connection's posts are sequenced in the order sent
and a resend repeats that order.

An outage is waited out for ``retry_for`` seconds, counted from the first
failure until an acknowledgement comes again (so a daemon that keeps
accepting and dropping the connection does not keep a publisher forever);
then the last failure is raised, and the posts still unacknowledged are in
:meth:`Publisher.unacknowledged`. The first connection's failure is raised
as it is: no daemon at all is a mistake to report, not an outage.

Ids outlive an outage only as long as the daemon's window: a restarted
daemon remembers the ids of the messages it kept (its history), a resend
later than ``--message-id-window`` is posted again.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Final, TypeVar

from ipcd import backoff
from ipcd.client import (
    DEFAULT_TIMEOUT,
    Client,
    ClientError,
    ConnectionLost,
    DaemonUnreachable,
    RequestTimeout,
)
from ipcd.posting import DEFAULT_WINDOW, Ack, Poster

T = TypeVar("T")

DEFAULT_RETRY_FOR: Final = 30.0
# A prefix and ":" and a number must fit a message id (64 characters).
PREFIX_MAX: Final = 40
# Failures that an outage explains: the daemon away, restarting, or between workers.
_OUTAGE = (DaemonUnreachable, ConnectionLost, RequestTimeout)

StatusCallback = Callable[[str], None]


def new_prefix() -> str:
    """A prefix no other publisher of this uid will pick (64 random bits;
    os.urandom, not secrets, which costs a command-line client 5 ms to import)."""
    return os.urandom(8).hex()


class Publisher(Poster[T]):
    """A :class:`~ipcd.posting.Poster` over its own connection to the
    daemon at ``socket_dir`` that gives every SAY a message id and, after a
    lost connection, connects again and resends (for up to ``retry_for``
    seconds per outage; None: for ever). ``on_status`` hears one line when
    the connection is lost and one when it is back."""

    def __init__(
        self,
        socket_dir: str | Path | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        window: int = DEFAULT_WINDOW,
        retry_for: float | None = DEFAULT_RETRY_FOR,
        id_prefix: str | None = None,
        on_status: StatusCallback | None = None,
        daemon_uid: int | None = None,
    ) -> None:
        self.socket_dir = socket_dir
        self.timeout = timeout
        self.daemon_uid = daemon_uid
        self.retry_for = retry_for
        self.id_prefix = id_prefix or new_prefix()
        if len(self.id_prefix) > PREFIX_MAX:
            raise ValueError(f"a message id prefix has at most {PREFIX_MAX} characters")
        self.on_status = on_status or (lambda _line: None)
        self.reconnects = 0
        self._numbers = itertools.count(1)
        self._outage_since: float | None = None
        super().__init__(self._connect(), window, resend=True)

    def close(self) -> None:
        super().close()
        self.client.close()

    def _connect(self) -> Client:
        return Client(self.socket_dir, self.timeout, daemon_uid=self.daemon_uid)

    def next_id(self) -> str:
        return f"{self.id_prefix}:{next(self._numbers)}"

    def say(self, room: str, text: str, tag: T, message_id: str | None = None) -> None:
        """Post ``text`` to ``room`` with ``message_id``, or the next id of this publisher."""
        super().say(room, text, tag, message_id or self.next_id())

    def say_when_connected(self, room: str, text: str, tag: T, message_id: str | None = None) -> None:
        """:meth:`say`, after recovering first if the connection was found
        lost (say raises then: a caller with its own loop recovers itself,
        as its selector must follow the new connection)."""
        while True:
            try:
                self.say(room, text, tag, message_id)
            except _OUTAGE as exc:
                self.recover(exc)
            else:
                return

    def unacknowledged(self) -> list[T]:
        """The tags of the posts in flight, in order: after giving up, the
        ones that may or may not have been posted."""
        return [sent.tag for sent in self.acks.tags()]

    # -- recovering ------------------------------------------------------------

    def read(self) -> list[Ack[T]]:
        acks = super().read()
        if acks:
            self._outage_since = None  # the daemon answers again: a later loss is a new outage
        return acks

    def recover(self, lost: ClientError) -> None:
        """After ``lost``: connect again (with backoff) and resend what is
        unacknowledged; raises the last failure once the outage has lasted
        ``retry_for`` seconds, or at once if ``lost`` is not an outage."""
        if not isinstance(lost, _OUTAGE) or not all(sent.resendable for sent in self.acks.unanswered()):
            raise lost  # not an outage; or a post without an id (a MSG) would be resent
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
        deadline = None if self.retry_for is None else self._outage_since + self.retry_for
        self.client.close()
        self.on_status(f"connection lost ({lost}); reconnecting")
        cause: ClientError = lost
        waits = backoff.delays()
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                raise cause
            try:
                client = self._connect()
            except _OUTAGE as exc:
                cause = exc
            else:
                self.resume(client)
                self.reconnects += 1
                self.on_status("reconnected")
                return
            delay = next(waits)
            if deadline is not None:
                delay = min(delay, max(deadline - time.monotonic(), 0.0))
            time.sleep(delay)

    # -- blocking ------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> list[Ack[T]]:
        """As :meth:`Poster.wait`, across lost connections."""
        while True:
            try:
                return super().wait(timeout)
            except _OUTAGE as exc:
                self.recover(exc)

    def say_many(self, room: str, texts: Iterable[tuple[T, str]]) -> Iterator[Ack[T]]:
        """Post each ``(tag, text)``, up to a window in flight; their
        acknowledgements in order (a refusal is an Ack with its error),
        across outages."""
        for tag, text in texts:
            while not self.can_post:
                yield from self.wait()
            self.say_when_connected(room, text, tag)
        yield from self.drain()

    def say_one(self, room: str, text: str, tag: T) -> int:
        """Post one message and wait for it; its seq (ServerError if refused)."""
        self.say_when_connected(room, text, tag)
        acks = list(self.drain())
        assert len(acks) == 1
        return acks[0].seq
