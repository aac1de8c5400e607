"""Pipelined posting: many SAYs or MSGs in flight on one connection.

Usage::

    from ipcd.client import Client

    with Client() as client:
        for seq in client.say_many("logs", lines):   # 128 in flight at a time
            ...

Theory of operation: one request per round trip caps a sender at what one
round trip costs (a trip through the worker and the master's hub), so a
:class:`Poster` keeps a window of requests in flight and hands back their
acknowledgements (:class:`Ack`) in the order the requests were sent,
whatever order the replies come in (:class:`AckWindow`, pure logic). Its
socket is non-blocking while it is in use: :meth:`Poster.flush` and
:meth:`Poster.read` never wait, so a caller can put the socket in its own
selector next to another source, such as standard input that may stay idle
for hours, and read acknowledgements and errors as they come.
:meth:`Poster.wait` is the blocking step for callers without a loop.

The daemon slows a sender past its uid's share by not reading it; the
writes queued here then wait in the kernel and in :attr:`Poster.wants_write`,
and replies keep being read meanwhile, so a large window never deadlocks
(a client that only writes until it is done and reads afterwards would,
once both socket buffers are full).

A post may carry a message id (:meth:`Poster.say`), which makes it safe to
send again: the daemon answers a post whose id it has seen with the first
answer, marked ``duplicate``. :meth:`Poster.resume` carries the posts not
yet acknowledged over to a new connection and sends them again, in order;
:class:`ipcd.publisher.Publisher` is the poster that does so by itself.
"""

from __future__ import annotations

import selectors
import time
from collections import deque
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Final, Generic, NamedTuple, Self, TypeVar

from ipcd import fdpass
from ipcd.client import Client, ClientError, ConnectionLost, RequestTimeout, ServerError, connection_error
from ipcd.protocol import (
    NEED_DATA,
    ErrorCode,
    Frame,
    Op,
    RemoteProtocolError,
    decode_error,
    decode_json,
    encode_frame,
    encode_json,
)

T = TypeVar("T")

DEFAULT_WINDOW = 128  # under the daemon's per-connection cap on unanswered requests (256)
_RECV_SIZE = 256 * 1024
# Refusals of a post that only say the daemon is between two states (a
# worker being replaced cannot forward it): such a post was not made, and
# is sent again by a poster that resends, on a new connection.
TRANSIENT: Final = frozenset((ErrorCode.UNAVAILABLE, ErrorCode.SHUTTING_DOWN))


class AckWindow(Generic[T]):
    """Requests in flight, acknowledged in the order they were sent.

    ``sent`` records a request id with the caller's tag; ``answered`` files
    a reply (in any order); ``ready`` pops the leading run of answered
    requests, so a reply that overtook an earlier one waits for it.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("the window holds at least one request")
        self.size = size
        self._order: deque[tuple[int, T]] = deque()
        self._replies: dict[int, Frame | None] = {}

    def __len__(self) -> int:
        return len(self._order)

    @property
    def full(self) -> bool:
        return len(self._order) >= self.size

    def sent(self, request_id: int, tag: T) -> None:
        if request_id in self._replies:
            raise ValueError(f"request id {request_id} is already in flight")
        self._order.append((request_id, tag))
        self._replies[request_id] = None

    def answered(self, request_id: int, frame: Frame) -> bool:
        """File a reply; False if no request in flight has that id."""
        if self._replies.get(request_id, frame) is not None:
            return False  # unknown, or answered twice
        self._replies[request_id] = frame
        return True

    def tag_of(self, request_id: int) -> T | None:
        """The tag of a request in flight (None: none has that id)."""
        return next((tag for rid, tag in self._order if rid == request_id), None)

    def tags(self) -> list[T]:
        """The tags of every request in flight, in the order sent, answered or not."""
        return [tag for _, tag in self._order]

    def unanswered(self) -> list[T]:
        """The tags of the requests in flight still without an answer, in order."""
        return [tag for request_id, tag in self._order if self._replies[request_id] is None]

    def renumber(self, next_id: Callable[[], int]) -> list[tuple[int, T]]:
        """Give every request in flight a new id from ``next_id`` (to go on
        over another connection), keeping the order and the answers already
        filed; the unanswered ones with their new ids, to send again."""
        order, replies = self._order, self._replies
        self._order, self._replies = deque(), {}
        again = []
        for request_id, tag in order:
            new_id = next_id()
            frame = replies[request_id]
            self._order.append((new_id, tag))
            self._replies[new_id] = frame
            if frame is None:
                again.append((new_id, tag))
        return again

    def stranded(self) -> list[tuple[T, Frame]]:
        """Answered requests still behind an unanswered one, in order: once
        the connection is lost, the answers that can still be told."""
        replies = self._replies
        return [(tag, frame) for request_id, tag in self._order if (frame := replies[request_id]) is not None]

    def ready(self) -> list[tuple[T, Frame]]:
        done: list[tuple[T, Frame]] = []
        order, replies = self._order, self._replies
        while order:
            request_id, tag = order[0]
            frame = replies[request_id]
            if frame is None:
                break
            order.popleft()
            del replies[request_id]
            done.append((tag, frame))
        return done


class Ack(NamedTuple, Generic[T]):
    """The daemon's answer to one post: its JSON reply, or the error."""

    tag: T
    reply: dict[str, Any] | None
    error: ClientError | None  # a ServerError: the daemon refused this post

    @property
    def seq(self) -> int:
        """The message's sequence number; raises the error of a refused post."""
        if self.error is not None:
            raise self.error
        assert self.reply is not None
        return int(self.reply["seq"])


class Sent(NamedTuple, Generic[T]):
    """A post in flight: the caller's tag, and the request to send again
    after a lost connection (only a post with a message id may be)."""

    tag: T
    op: Op
    body: bytes
    resendable: bool


class Poster(Generic[T]):
    """Up to ``window`` posts in flight on ``client``'s connection.

    Use as a context manager: while it is open the client's socket is
    non-blocking and belongs to the poster (the client's blocking requests
    would steal its replies); closing it restores the client's timeout.
    With ``resend``, a post with a message id that the daemon refuses as
    :data:`TRANSIENT` is not acknowledged but ends the connection (read
    raises ConnectionLost), to be sent again after :meth:`resume`.
    """

    def __init__(self, client: Client, window: int = DEFAULT_WINDOW, *, resend: bool = False) -> None:
        self.client = client
        self.resend = resend
        self.acks: AckWindow[Sent[T]] = AckWindow(window)
        self._out = bytearray()
        self._lost: Exception | None = None
        self.last_progress = time.monotonic()  # when bytes last moved either way
        self._selector: selectors.BaseSelector | None = None  # for wait(), made on first use
        client.sock.setblocking(False)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        if self.client.sock.fileno() >= 0:
            self.client.sock.settimeout(self.client.timeout)

    def fileno(self) -> int:
        return self.client.fileno()

    # -- posting -----------------------------------------------------------

    @property
    def can_post(self) -> bool:
        return not self.acks.full

    @property
    def in_flight(self) -> int:
        return len(self.acks)

    @property
    def wants_write(self) -> bool:
        return bool(self._out)

    def say(self, room: str, text: str, tag: T, message_id: str | None = None) -> None:
        """Post ``text`` to ``room``; with ``message_id`` (1-64 visible ASCII
        characters but '"' and '\\', unique among this uid's posts) it may
        be resent without being posted twice."""
        args = (
            {"room": room, "text": text}
            if message_id is None
            else {"id": message_id, "room": room, "text": text}
        )
        self.post(Op.SAY, args, tag)

    def msg(self, to: str, text: str, tag: T) -> None:
        self.post(Op.MSG, {"to": to, "text": text}, tag)

    def post(self, op: Op, args: dict[str, Any], tag: T) -> None:
        """Queue one request (the window must have room). Nothing is sent
        until :meth:`flush`, so a run of posts goes out in one write."""
        self._check_lost()
        if self.acks.full:
            raise RuntimeError("the window is full: read acknowledgements first")
        if not self.acks:
            self.last_progress = time.monotonic()  # the clock of a timeout starts with the work
        self._send(Sent(tag, op, encode_json(args), op == Op.SAY and "id" in args))

    def _send(self, sent: Sent[T]) -> None:
        request_id = self.client.next_request_id()
        self._out += encode_frame(sent.op, request_id, sent.body)
        self.acks.sent(request_id, sent)

    def resume(self, client: Client) -> None:
        """Go on over ``client``, a new connection after the old one was lost
        (and closed by the caller): every post still without an answer is
        queued again, in the order first sent, with the same message ids;
        answers already read (a refusal behind an unanswered post) are kept
        for their turn, not asked again. Raises ValueError, changing
        nothing, if a post to resend has no message id: it cannot be sent
        again without maybe posting it twice."""
        if not all(sent.resendable for sent in self.acks.unanswered()):
            raise ValueError("a post without a message id was in flight: it cannot be sent again safely")
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        self.client = client
        client.sock.setblocking(False)
        self._out = bytearray()
        self._lost = None
        self.last_progress = time.monotonic()
        for request_id, sent in self.acks.renumber(client.next_request_id):
            self._out += encode_frame(sent.op, request_id, sent.body)

    def recover(self, lost: ClientError) -> None:
        """After ``lost`` (read or flush raised ConnectionLost, or no answer
        came in time): a plain poster cannot go on, so it raises ``lost``;
        :class:`ipcd.publisher.Publisher` connects again and resends."""
        raise lost

    # -- non-blocking I/O ----------------------------------------------------

    def flush(self) -> None:
        """Send what the socket takes of the queued requests (nothing once
        the connection is lost: :meth:`read` says so)."""
        while self._out and self._lost is None:
            try:
                sent = self.client.sock.send(self._out)
            except BlockingIOError:
                return
            except OSError as exc:
                self._receive()  # the daemon's parting words, if it sent any
                self._lose(f"connection to {self.client.path} lost while sending: {exc.strerror}")
                return
            del self._out[:sent]
            self.last_progress = time.monotonic()

    def read(self) -> list[Ack[T]]:
        """Read what has arrived; the acknowledgements now complete, in
        order. Raises ConnectionLost once the daemon closed the connection
        and every acknowledgement that came before was handed out."""
        if self._lost is None:
            self._receive()
        acks = [self._ack(sent.tag, frame) for sent, frame in self.acks.ready()]
        if not acks:
            self._check_lost()
        return acks

    def _receive(self) -> None:
        client = self.client
        decoder = client.decoder
        while True:
            try:
                got = fdpass.recv_with_fds(client.sock, _RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                self._lose(f"connection to {client.path} lost: {exc.strerror}")
                break
            if not got.data and not got.fds:
                self._lose(f"the daemon closed the connection ({client.path})")
                break
            self.last_progress = time.monotonic()
            decoder.receive_data(got.data, got.fds, got.truncated)
        while True:
            try:
                frame = decoder.next_event()
            except RemoteProtocolError as exc:
                fdpass.close_fds(exc.fds)
                self._lose(f"the daemon sent an invalid frame: {exc.message}")
                return
            if frame is NEED_DATA:
                return
            self._file(frame)

    def _file(self, frame: Frame) -> None:
        fdpass.close_fds(frame.fds)  # no reply to a post carries fds
        if frame.op == Op.PING:
            self._out += encode_frame(Op.PONG, frame.request_id, frame.body)
        elif frame.request_id == 0:
            if frame.op == Op.ERROR:
                self._lost = connection_error(frame)  # about the connection: why it is closing
            else:
                self.client.events.append(frame)  # a delivery: the client's to hand out
        elif self.resend and frame.op == Op.ERROR and self._not_taken(frame):
            return
        elif not self.acks.answered(frame.request_id, frame):
            self.client.keep_reply(frame)  # an answer to a request sent before us

    def _not_taken(self, frame: Frame) -> bool:
        """A transient refusal of a post that can be resent: it stays
        unacknowledged and this connection is given up (the daemon answers a
        connection's posts in order, so nothing after it was taken either),
        to be sent again over the next one."""
        code, message = decode_error(frame.body)
        sent = self.acks.tag_of(frame.request_id)
        if code not in TRANSIENT or sent is None or not sent.resendable:
            return False
        self._lose(f"the daemon could not take a post: {message}", code)
        return True

    def _ack(self, tag: T, frame: Frame) -> Ack[T]:
        if frame.op == Op.ERROR:
            code, message = decode_error(frame.body)
            return Ack(tag, None, ServerError(code, message))
        try:
            return Ack(tag, decode_json(frame.body), None)
        except RemoteProtocolError as exc:
            return Ack(tag, None, ConnectionLost(f"the daemon sent a malformed reply: {exc.message}"))

    def stranded(self) -> list[Ack[T]]:
        """After :meth:`read` raised ConnectionLost: answers that came for
        later posts while an earlier one never got its own (such as the
        error that made the daemon close the connection)."""
        return [self._ack(sent.tag, frame) for sent, frame in self.acks.stranded()]

    def _lose(self, reason: str, code: int | None = None) -> None:
        if self._lost is None:
            self._lost = ConnectionLost(reason, code)

    def _check_lost(self) -> None:
        if self._lost is not None:
            raise self._lost

    # -- blocking ------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> list[Ack[T]]:
        """Send and read until some acknowledgements are complete; raises
        RequestTimeout when nothing moved for ``timeout`` seconds (default:
        the client's timeout)."""
        limit = self.client.timeout if timeout is None else timeout
        selector = self._selector
        if selector is None:
            selector = self._selector = selectors.DefaultSelector()
            selector.register(self.client.sock, selectors.EVENT_READ)
        while True:
            acks = self.read()
            if acks or not self.in_flight:
                return acks
            self.flush()
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._out else 0)
            selector.modify(self.client.sock, events)
            remaining = None if limit is None else self.last_progress + limit - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise RequestTimeout(
                    f"no answer from {self.client.path} within {limit:g}s; try a larger --timeout"
                )
            selector.select(remaining)

    def drain(self, timeout: float | None = None) -> Iterator[Ack[T]]:
        """Every outstanding acknowledgement, in order, as it comes."""
        while self.in_flight:
            yield from self.wait(timeout)
