"""``ipcctl send`` from standard input: each line posted as it arrives.

Theory of operation: a script pipes lines in (``seq 20000 | ipcctl send``,
``tail -f log | ipcctl send``), so input may be a burst or a trickle that
never ends. One poll loop watches standard input and the daemon's socket:
a line is posted as soon as it is read, up to a window of posts in flight
(:class:`ipcd.posting.Poster`), and acknowledgements and refusals are read
while input is idle. Standard input is read only while fewer than a window
of lines wait to be posted, so memory stays bounded whatever the input rate;
when the daemon slows us down (a uid past its share is not read), the window
fills and we stop reading in turn: backpressure all the way up the pipe.

A refused line is reported on stderr with its line number, and the rest go
on; the exit status is 1 if any was refused, 0 once all are acknowledged.
A lost connection goes to the poster's ``recover``: a
:class:`~ipcd.publisher.Publisher` connects again and resends the lines not
acknowledged (with their message ids, so none is posted twice), and the
loop watches the new connection; a plain Poster gives up. Either way, what
was not acknowledged when it gave up is in :class:`NotAcknowledged`.
Poll rather than epoll: standard input may be a regular file, which epoll
refuses and poll reports as always readable.
"""

from __future__ import annotations

import codecs
import os
import selectors
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import NamedTuple

from ipcd.client import ClientError, ConnectionLost, DatagramClient, RequestTimeout, ServerError
from ipcd.posting import Ack, Poster

READ_SIZE = 64 * 1024


class Line(NamedTuple):
    number: int  # 1-based, counting the empty lines that are skipped
    text: str


class LineSplitter:
    """Bytes in, non-empty lines out, numbered as in the input. A line ends
    at ``\\n`` (a ``\\r`` before it goes too); undecodable bytes become
    U+FFFD rather than fail the whole pipe."""

    def __init__(self, encoding: str = "utf-8") -> None:
        self._decode = codecs.getdecoder(encoding)
        self._partial: list[bytes] = []  # a line still without its newline, in pieces
        self._count = 0
        self.at_end = False  # finish() was called: the input ended

    def feed(self, data: bytes) -> list[Line]:
        if b"\n" not in data:
            self._partial.append(data)  # a long line: joined once, when it ends
            return []
        first, *rest = data.split(b"\n")
        complete = [b"".join([*self._partial, first]), *rest[:-1]]
        self._partial = [rest[-1]] if rest[-1] else []
        return self._lines(complete)

    def finish(self) -> list[Line]:
        """At end of input: the last line, if it had no newline."""
        rest, self._partial = b"".join(self._partial), []
        self.at_end = True
        return self._lines([rest]) if rest else []

    def _lines(self, raw: list[bytes]) -> list[Line]:
        lines = []
        for chunk in raw:
            self._count += 1
            body = chunk[:-1] if chunk.endswith(b"\r") else chunk
            if body:
                lines.append(Line(self._count, self._decode(body, "replace")[0]))
        return lines


def input_lines(fd: int, encoding: str) -> Iterator[Line]:
    """The lines of ``fd`` as they come (a blocking read each)."""
    splitter = LineSplitter(encoding)
    while data := os.read(fd, READ_SIZE):
        yield from splitter.feed(data)
    yield from splitter.finish()


Report = Callable[[Line, int | None, ClientError | None], None]
"""Told of each line once it is acknowledged (its seq) or refused (error)."""


class NotAcknowledged(Exception):
    """Posting gave up (``cause``, the last failure) with ``lines`` read and
    not acknowledged, in order: posted or not, no one can tell. Input after
    them was not read."""

    def __init__(self, cause: ClientError, lines: list[Line]) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.lines = lines

    def summary(self) -> str:
        if not self.lines:
            return "no line read was left unacknowledged"
        first, last, count = self.lines[0].number, self.lines[-1].number, len(self.lines)
        if count == 1:
            return f"line {first} not acknowledged: it may or may not have been posted"
        return (
            f"lines {first}-{last} ({count} messages) not acknowledged: they may or may not have been posted"
        )


def stream_posts(
    poster: Poster[Line],
    fd: int,
    encoding: str,
    room: str,
    to: str | None,
    report: Report,
    message_id: Callable[[int], str] | None = None,
) -> None:
    """Post every line of ``fd`` through ``poster`` (to ``to``, else to
    ``room``; ``message_id`` gives a post's id from its line number) until
    end of input and the last acknowledgement; raises
    NotAcknowledged when the poster cannot recover from a lost connection."""
    queued: deque[Line] = deque()
    try:
        _stream(poster, fd, encoding, room, to, report, message_id, queued)
    except ClientError as exc:  # a lost connection or, while reconnecting, no daemon
        raise NotAcknowledged(exc, [sent.tag for sent in poster.acks.tags()] + list(queued)) from None


def _stream(
    poster: Poster[Line],
    fd: int,
    encoding: str,
    room: str,
    to: str | None,
    report: Report,
    message_id: Callable[[int], str] | None,
    queued: deque[Line],
) -> None:
    timeout = poster.client.timeout
    splitter = LineSplitter(encoding)
    with selectors.PollSelector() as selector:
        selector.register(poster, selectors.EVENT_READ)
        watching_input = False
        while True:
            try:
                while queued and poster.can_post:
                    line = queued[0]  # taken off once posted: a lost connection raises first
                    if to is not None:
                        poster.msg(to, line.text, line)
                    else:
                        poster.say(room, line.text, line, message_id(line.number) if message_id else None)
                    queued.popleft()
                poster.flush()  # what was just posted, in one write
                if splitter.at_end and not queued and not poster.in_flight:
                    return
                want_input = not splitter.at_end and len(queued) < poster.acks.size
                if want_input != watching_input:
                    if want_input:
                        selector.register(fd, selectors.EVENT_READ)
                    else:
                        selector.unregister(fd)
                    watching_input = want_input
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if poster.wants_write else 0)
                selector.modify(poster, events)
                for ack in _step(poster, selector, timeout, fd, splitter, queued):
                    report(ack.tag, None if ack.error else ack.seq, ack.error)
            except (ConnectionLost, RequestTimeout) as lost:
                selector.unregister(poster)  # the connection changes, or posting ends
                poster.recover(lost)  # raises when it cannot
                selector.register(poster, selectors.EVENT_READ)


def _step(
    poster: Poster[Line],
    selector: selectors.BaseSelector,
    timeout: float | None,
    fd: int,
    splitter: LineSplitter,
    queued: deque[Line],
) -> list[Ack[Line]]:
    """Wait for input or the daemon once; the acknowledgements that came."""
    wait = None
    if poster.in_flight and timeout is not None:
        wait = poster.last_progress + timeout - time.monotonic()
        if wait <= 0:
            raise RequestTimeout(
                f"no answer from {poster.client.path} within {timeout:g}s; try a larger --timeout"
            )
    acks: list[Ack[Line]] = []
    for key, mask in selector.select(wait):
        if key.fileobj is not poster:
            data = os.read(fd, READ_SIZE)
            queued.extend(splitter.feed(data) if data else splitter.finish())
            continue
        if mask & selectors.EVENT_WRITE:
            poster.flush()
        if mask & selectors.EVENT_READ:
            acks += poster.read()
    return acks


def datagram_posts(dgram: DatagramClient, lines: Iterator[Line], room: str, report: Report) -> None:
    """One datagram per line, each acknowledged before the next is read."""
    for line in lines:
        try:
            seq = dgram.say(room, line.text)
        except ServerError as exc:
            report(line, None, exc)
            continue
        report(line, seq, None)


def stdin_source() -> tuple[int, str] | None:
    """Standard input's fd and the encoding its text is in (None: it is closed)."""
    if sys.stdin is None:
        return None
    return sys.stdin.fileno(), sys.stdin.encoding or "utf-8"
