"""A chat subscription that outlives its connection.

Usage::

    from ipcd.subscription import Subscription

    with Subscription(rooms=["logs"], on_status=print) as sub:
        while True:
            event = sub.next_event()          # a ChatEvent, as Client.next_event
            print(event.data["text"])

Theory of operation
-------------------
A connection to ipcd ends for reasons that are no fault of the listener:
a reload retires its worker (``SHUTTING_DOWN``), the worker is killed, the
daemon restarts. A :class:`Subscription` then connects again, with
exponential backoff (0.05 s doubling to 2 s) for as long as the daemon stays
unreachable, takes the same nick and joins the same rooms. ``on_status``
hears one line when the connection is lost and one when it is back.

No message is delivered twice and none is skipped silently. Room messages
carry a per-room sequence number without gaps, so the subscription keeps,
per room, a *floor*: the highest ``seq`` already delivered (or skipped at
the first join, or given as ``since``). Rejoining resumes after the floor
(JOIN with ``after``): the daemon replays every message it still keeps
after it, then the new ones, so the outage's gap is filled from the
daemon's history (which survives a daemon restart when the daemon keeps a
state). Messages it no longer keeps are reported as ranges to ``on_gone``
(by default a line to ``on_status``). A room whose last ``seq`` is below
the floor is numbered anew (a daemon that lost its history): its floor is
reset, and what it kept of the new numbering is delivered. Every event is
also checked against the floor, so a duplicate can never get through.

Only the first connection's errors reach the caller as they are (no daemon
at all is a mistake to report, not an outage to wait out), and refusals
(``ServerError``) always do. Requests go through :attr:`Subscription.client`
(the current connection); one that fails with ``ConnectionLost`` hands it
to :meth:`Subscription.recover`, which is what ``ipcctl chat`` does. Rooms
joined and nicks taken through the subscription are kept across reconnects.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from ipcd import backoff
from ipcd.client import (
    DEFAULT_TIMEOUT,
    ChatEvent,
    Client,
    ConnectionLost,
    DaemonUnreachable,
    RequestTimeout,
    ServerError,
)
from ipcd.protocol import ErrorCode
from ipcd.protocol.chat import DEFAULT_ROOM

_NICK_PATIENCE = 20  # reconnects that may find our old nick still held by the old connection
# Refusals that only say the daemon is between two states: a worker that
# cannot reach its master answers UNAVAILABLE (chat) or INTERNAL (status)
# with the request's id.
_TRANSIENT = frozenset((ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL, ErrorCode.SHUTTING_DOWN))

StatusCallback = Callable[[str], None]
GoneCallback = Callable[[str, int, int], None]  # room, first and last seq no longer kept


class Subscription:
    """Chat deliveries for ``rooms`` (and private messages to ``nick``),
    across reconnects unless ``reconnect`` is False; ``patience`` bounds how
    long one outage is waited out (None: for ever)."""

    def __init__(
        self,
        socket_dir: str | Path | None = None,
        rooms: Iterable[str] = (DEFAULT_ROOM,),
        *,
        nick: str | None = None,
        history: int = 0,
        since: Mapping[str, int] | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        reconnect: bool = True,
        patience: float | None = None,
        on_status: StatusCallback | None = None,
        on_gone: GoneCallback | None = None,
        daemon_uid: int | None = None,
    ) -> None:
        self.socket_dir = socket_dir
        self.daemon_uid = daemon_uid  # whom to take for the daemon besides root (see Client)
        self.rooms = list(dict.fromkeys(rooms))
        self.nick = nick
        self._nick_chosen = nick is not None  # else the daemon's pick, which may go to another
        self.timeout = timeout
        self.reconnect = reconnect
        self.patience = patience
        self.on_status = on_status or (lambda _line: None)
        self.on_gone = on_gone or self._say_gone
        self.reconnects = 0
        # room -> highest seq delivered or skipped; a room given ``since`` resumes after it
        self._floors: dict[str, int] = dict(since or {})
        self._nick_refusals = 0
        self._client: Client | None = self._subscribe(history)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    @property
    def client(self) -> Client:
        """The current connection, for requests; it changes after a reconnect.
        A request that fails with ConnectionLost goes to :meth:`recover`."""
        if self._client is None:
            self._reconnect()
        assert self._client is not None
        return self._client

    def next_event(self, timeout: float | None = None) -> ChatEvent:
        """The next delivery not delivered before, waiting up to ``timeout``
        seconds for it (RequestTimeout after that, as Client.next_event);
        the time spent reconnecting does not count."""
        while True:
            try:
                event = self.client.next_event(timeout)
            except ConnectionLost as exc:
                self.recover(exc)
                continue
            if self._is_new(event):
                return event

    def recover(self, lost: ConnectionLost) -> None:
        """After ``lost``: connect again and rejoin, or raise ``lost`` when
        reconnecting is off or the outage outlasts ``patience``."""
        if not self.reconnect:
            raise lost
        self.close()
        self.on_status(f"connection lost ({lost}); reconnecting")
        self._reconnect(lost)

    # -- what the subscription covers --------------------------------------

    def join(self, room: str, history: int = 0) -> dict[str, Any]:
        """Join ``room`` now and after every reconnect; the JOIN reply."""
        reply = self.client.join(room, history=history)
        if room not in self.rooms:
            self.rooms.append(room)
        self._floors[room] = int(reply["seq"]) - int(reply["history"])  # the replay is above it
        self.nick = str(reply["nick"])
        return reply

    def part(self, room: str) -> None:
        self.client.part(room)
        if room in self.rooms:
            self.rooms.remove(room)
        self._floors.pop(room, None)

    def set_nick(self, nick: str) -> str:
        self.nick = self.client.nick(nick)
        self._nick_chosen = True
        return self.nick

    # -- connecting ----------------------------------------------------------

    def _subscribe(self, history: int) -> Client:
        """A new connection with our nick, in our rooms: a room joined before
        resumes after its floor, a new one replays its last ``history``
        messages; they follow as events."""
        client = Client(self.socket_dir, self.timeout, daemon_uid=self.daemon_uid)
        try:
            if self.nick:
                self.nick = client.nick(self.nick)
            for room in self.rooms:
                floor = self._floors.get(room)
                if floor is None:
                    reply = client.join(room, history=history)
                    self._floors[room] = int(reply["seq"]) - int(reply["history"])
                else:
                    reply = client.join(room, after=floor)
                    self._resumed(room, floor, reply)
                self.nick = str(reply["nick"])
        except BaseException:
            client.close()
            raise
        return client

    def _reconnect(self, cause: ConnectionLost | None = None) -> None:
        deadline = None if self.patience is None else time.monotonic() + self.patience
        waits = backoff.delays()
        while True:
            try:
                self._client = self._subscribe(0)
            except (DaemonUnreachable, ConnectionLost, RequestTimeout) as exc:
                cause = cause or (exc if isinstance(exc, ConnectionLost) else ConnectionLost(str(exc)))
            except ServerError as exc:
                if exc.code == ErrorCode.EXISTS:  # only ever about the nick, here
                    self._nick_taken(exc)
                elif exc.code not in _TRANSIENT:
                    raise
            else:
                self._nick_refusals = 0
                self.reconnects += 1
                self.on_status("reconnected")
                return
            delay = next(waits)
            if deadline is not None and time.monotonic() + delay > deadline:
                raise cause or ConnectionLost("the daemon did not come back")
            time.sleep(delay)

    def _nick_taken(self, refusal: ServerError) -> None:
        """Our old connection may not be gone yet at the daemon: it soon
        will be. If the nick stays taken, a nick the daemon chose gives way
        to the daemon's next pick; one the user chose is an error."""
        self._nick_refusals += 1
        if self._nick_refusals < _NICK_PATIENCE:
            return
        if self._nick_chosen:
            raise refusal
        self.on_status(f"{refusal.message}; going on under the nick the daemon gives")
        self.nick = None
        self._nick_refusals = 0

    # -- no duplicates -------------------------------------------------------

    def _resumed(self, room: str, floor: int, reply: dict[str, Any]) -> None:
        if reply.get("reset"):
            self.on_status(
                f"{room} is numbered anew from seq 1 (the daemon lost its history): "
                f"what it kept after {floor} before that is gone"
            )
            self._floors[room] = 0
        for first, last in reply["gone"]:
            self.on_gone(room, first, last)

    def _say_gone(self, room: str, first: int, last: int) -> None:
        span = f"message {first}" if first == last else f"messages {first}-{last}"
        self.on_status(f"{span} of {room} are no longer kept by the daemon: missed")

    def _is_new(self, event: ChatEvent) -> bool:
        if event.kind != "message":
            return True  # notices and private messages are never replayed
        room, seq = event.data.get("room"), event.data.get("seq")
        if not isinstance(room, str) or not isinstance(seq, int):
            return True
        floor = self._floors.get(room)
        if floor is not None and seq <= floor:
            return False
        self._floors[room] = seq
        return True
