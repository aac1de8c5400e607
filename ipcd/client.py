"""Blocking Python client for ipcd (what ``ipcctl`` is built on).

Usage::

    from ipcd.client import Client

    with Client() as client:              # /tmp/ipcd, or $IPCD_SOCKET_DIR
        assert client.echo(b"hi") == b"hi"
        print(client.status()["workers"])

Every failure is one of the exceptions below, each with a message fit to
show a user: :class:`DaemonUnreachable` (no daemon listening),
:class:`UntrustedDaemon` (what listens may be an impostor: nothing was
sent to it), :class:`RequestTimeout`, :class:`ServerError` (the daemon
refused, with its error code) and :class:`ConnectionLost`.

Before a client sends anything it checks that it talks to the daemon: the
socket dir and every directory on the way to it can be changed only by
root, the caller or the daemon's user (``lstat`` of each, symlinks followed
by hand: :mod:`ipcd.safepath`), and the peer's uid (``SO_PEERCRED``; for
datagrams the owner of the socket file) is root or the daemon's. The daemon's uid is ``daemon_uid``, or
``$IPCD_DAEMON_UID``, or by default the socket dir's owner -- which must
then be root or the caller. Requests can be pipelined with
:meth:`Client.send` and :meth:`Client.receive`; posting many messages at
once, with :meth:`Client.say_many` or an :class:`ipcd.posting.Poster`.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ipcd import fdpass
from ipcd.clientbase import DEFAULT_TIMEOUT, RECV_SIZE, ClientBase, check_seconds
from ipcd.clienterrors import (
    ClientError,
    ConnectionLost,
    DaemonUnreachable,
    RequestTimeout,
    ServerError,
    UntrustedDaemon,
    connection_error,
    unreachable,
)
from ipcd.dgramclient import DatagramClient
from ipcd.paths import STREAM_SOCKET
from ipcd.protocol import (
    NEED_DATA,
    Frame,
    FrameDecoder,
    Op,
    RemoteProtocolError,
    decode_error,
    decode_json,
    encode_frame,
    encode_json,
    op_name,
    reply_op,
)
from ipcd.trust import DaemonTrust, daemon_uid_from_env, uid_of

__all__ = [
    "DEFAULT_TIMEOUT",
    "ChatEvent",
    "Client",
    "ClientError",
    "ConnectionLost",
    "DaemonTrust",
    "DaemonUnreachable",
    "DatagramClient",
    "Handoff",
    "RequestTimeout",
    "ServerError",
    "UntrustedDaemon",
    "connection_error",
    "daemon_uid_from_env",
    "uid_of",
]

_CMSG_SPACE = fdpass.cmsg_space_for(fdpass.MAX_FDS)


class Client(ClientBase):
    """One stream connection to the daemon; ``daemon_uid`` is whom to take
    for it besides root (default: ``$IPCD_DAEMON_UID``, else the socket
    dir's owner)."""

    def __init__(
        self,
        socket_dir: str | Path | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        daemon_uid: int | None = None,
    ) -> None:
        self._locate(socket_dir, STREAM_SOCKET, timeout, daemon_uid)
        self._ids = itertools.count(1)
        self._decoder = FrameDecoder(max_frame_size=1 << 30)
        self._buffer: bytearray | None = None  # for reads, made on the first
        self._early: dict[int, Frame] = {}  # replies read while waiting for another
        self.events: deque[Frame] = deque()  # daemon-initiated frames (chat deliveries), in order
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(self.path))
        except TimeoutError:
            self.sock.close()
            raise RequestTimeout(
                f"connecting to {self.path} timed out; the daemon may be overloaded"
            ) from None
        except OSError as exc:
            self.sock.close()
            raise unreachable(self.path, exc) from None
        peer = fdpass.peer_credentials(self.sock).uid
        if not self.trust.allows(peer):
            self.sock.close()
            raise self.trust.refuse(peer)

    def close(self) -> None:
        super().close()
        fdpass.close_fds(self._decoder.take_pending_fds())

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- pipelining primitives -----------------------------------------------

    def next_request_id(self) -> int:
        """A fresh request id (never 0, which marks frames the daemon starts)."""
        return next(self._ids) & 0xFFFFFFFF or next(self._ids)

    @property
    def decoder(self) -> FrameDecoder:
        """The decoder of this connection's input (a :class:`~ipcd.posting.Poster` reads into it too)."""
        return self._decoder

    def keep_reply(self, frame: Frame) -> None:
        """Keep a reply read on the way to another, for :meth:`wait_reply`."""
        self._early[frame.request_id] = frame

    def send(self, op: int, body: bytes = b"", fds: Sequence[int] = ()) -> int:
        """Send one request; return its request id."""
        request_id = self.next_request_id()
        frame = encode_frame(op, request_id, body, nfds=len(fds))
        try:
            if fds:
                sent = fdpass.send_with_fds(self.sock, [frame], fds)
                if sent < len(frame):
                    self.sock.sendall(frame[sent:])
            else:
                self.sock.sendall(frame)
        except TimeoutError:
            raise RequestTimeout(f"sending to {self.path} timed out: the daemon is not reading") from None
        except OSError as exc:
            raise self._parting_words() or ConnectionLost(
                f"connection to {self.path} lost while sending: {exc.strerror}"
            ) from None
        return request_id

    def _parting_words(self) -> ConnectionLost | None:
        """After the connection broke: the ERROR frame the daemon sent
        before closing (why it cut us off), if one is buffered."""
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    got = fdpass.recv_with_fds(self.sock, RECV_SIZE)
                except OSError:
                    break
                if not got.data:
                    break
                self._decoder.receive_data(got.data, got.fds, got.truncated)
            while True:
                event = self._decoder.next_event()
                if event is NEED_DATA:
                    return None
                fdpass.close_fds(event.fds)
                if event.op == Op.ERROR and event.request_id == 0:
                    code, message = decode_error(event.body)
                    return ConnectionLost(message, code)
        except RemoteProtocolError:
            return None
        finally:
            self.sock.settimeout(self.timeout)

    def receive(self) -> Frame:
        """The next frame from the daemon, whatever request it answers.
        Keep-alive PINGs from the daemon are answered here."""
        while True:
            frame = self._next_frame()
            if frame.op == Op.PING:
                try:
                    self.sock.sendall(encode_frame(Op.PONG, frame.request_id, frame.body))
                except OSError as exc:
                    raise ConnectionLost(f"connection to {self.path} lost answering a ping: {exc}") from None
                continue
            return frame

    def _next_frame(self) -> Frame:
        while True:
            try:
                event = self._decoder.next_event()
            except RemoteProtocolError as exc:
                fdpass.close_fds(exc.fds)
                raise ConnectionLost(f"the daemon sent an invalid frame: {exc.message}") from None
            if event is not NEED_DATA:
                return event
            if self._buffer is None:  # one buffer for every read (the decoder copies what it is fed)
                self._buffer = bytearray(RECV_SIZE)
            try:
                got = fdpass.recv_into_with_fds(self.sock, self._buffer, fdpass.MAX_FDS, _CMSG_SPACE)
            except TimeoutError:
                raise RequestTimeout(
                    f"no answer from {self.path} within {self.timeout:g}s; try a larger --timeout"
                ) from None
            except OSError as exc:
                raise ConnectionLost(f"connection to {self.path} lost: {exc.strerror}") from None
            if not got.nbytes and not got.fds:
                raise ConnectionLost(f"the daemon closed the connection ({self.path})")
            self._decoder.receive_data(memoryview(self._buffer)[: got.nbytes], got.fds, got.truncated)

    def wait_reply(self, request_id: int) -> Frame:
        """The reply to ``request_id``; raises :class:`ServerError` for an ERROR."""
        frame = self._early.pop(request_id, None)
        while frame is None:
            got = self.receive()
            if got.request_id == request_id:
                frame = got
            elif got.op == Op.ERROR and got.request_id == 0:
                raise connection_error(got)
            elif got.request_id == 0:
                self.events.append(got)
            else:
                self._early[got.request_id] = got
        if frame.op == Op.ERROR:
            code, message = decode_error(frame.body)
            raise ServerError(code, message)
        return frame

    def request(self, op: int, body: bytes = b"", fds: Sequence[int] = ()) -> Frame:
        reply = self.wait_reply(self.send(op, body, fds))
        if reply.op != reply_op(op):
            fdpass.close_fds(reply.fds)
            raise ConnectionLost(f"expected {op_name(reply_op(op))}, the daemon sent {op_name(reply.op)}")
        return reply

    # -- operations ----------------------------------------------------------

    def echo(self, data: bytes) -> bytes:
        return self.request(Op.ECHO, data).body

    def ping(self, payload: bytes = b"") -> float:
        """Round-trip time of one PING, in seconds."""
        start = time.perf_counter()
        self.request(Op.PING, payload)
        return time.perf_counter() - start

    def status(self) -> dict[str, Any]:
        return decode_json(self.request(Op.STATUS).body)

    # -- chat ------------------------------------------------------------------

    def call(self, op: Op, **args: Any) -> dict[str, Any]:
        """A chat request with a JSON body; its JSON reply."""
        body = encode_json({k: v for k, v in args.items() if v is not None})
        return decode_json(self.request(op, body).body)

    def nick(self, nick: str) -> str:
        return str(self.call(Op.NICK, nick=nick)["nick"])

    def join(self, room: str, history: int = 0, after: int | None = None) -> dict[str, Any]:
        """Join ``room``; the last ``history`` messages follow as events,
        oldest first, then new ones. The daemon replays as many as fit its
        output buffer and says where it stopped (``more``, ``before``): the
        older rest is fetched here with HISTORY and queued ahead of the
        replay, so the reply's ``history`` counts every message that follows.

        With ``after`` (a seq) instead, every kept message after it follows,
        then the new ones: a subscriber resuming where it stopped. The rest
        past the replay is fetched with HISTORY ``after`` and queued between
        the replay and the new messages; the reply's ``gone`` is then the
        list of ranges ``[first, last]`` of seqs after ``after`` that the
        daemon no longer keeps (empty: nothing was missed). If the room's
        seq is below ``after`` the daemon numbers it anew (it lost its
        history): the reply says ``reset`` and what it kept of the new
        numbering follows instead."""
        if after is not None:
            return self._resume(room, after)
        reply = self.call(Op.JOIN, room=room, history=history or None)
        if reply.get("more"):
            at = len(self.events)  # the replay comes after the reply: none of it is queued yet
            replayed = int(reply["history"])
            older = self.history(room, history - replayed, before=int(reply["before"]))
            for offset, message in enumerate(older):
                self.events.insert(at + offset, Frame(Op.MESSAGE, 0, encode_json(message)))
            reply["history"] = replayed + len(older)
            reply["more"] = False
            del reply["before"]
        return reply

    def _resume(self, room: str, after: int) -> dict[str, Any]:
        reply = self.call(Op.JOIN, room=room, after=after)
        gone: list[list[int]] = [list(reply["gone"])] if "gone" in reply else []
        last_seq = int(reply["seq"])
        rest: list[dict[str, Any]] = []
        if last_seq < after:
            # The room numbers anew (the daemon lost its history): what it
            # kept of the new numbering is new to us.
            reply["reset"] = True
            rest = self.history(room, after=0, gone=gone)
        elif reply.get("more"):
            rest = self.history(room, last_seq - int(reply["after"]), after=int(reply["after"]), gone=gone)
        rest = [m for m in rest if m["seq"] <= last_seq]  # newer ones come as events
        if rest:
            # Every replayed frame came before the HISTORY replies (one ordered
            # stream), and new messages have seqs above the JOIN's: the rest
            # goes between them.
            at = next(
                (
                    i
                    for i, frame in enumerate(self.events)
                    if frame.op == Op.MESSAGE
                    and (data := decode_json(frame.body))["room"] == room
                    and data["seq"] > last_seq
                ),
                len(self.events),
            )
            for offset, message in enumerate(rest):
                self.events.insert(at + offset, Frame(Op.MESSAGE, 0, encode_json(message)))
            reply["history"] = int(reply["history"]) + len(rest)
        reply["more"] = False
        reply.pop("after", None)
        reply["gone"] = gone
        return reply

    def part(self, room: str) -> None:
        self.call(Op.PART, room=room)

    def say(self, room: str, text: str, message_id: str | None = None) -> int:
        """Post to a room (no need to join); returns the message's sequence
        number. With ``message_id`` the post may be sent again (on this or
        another connection) after a lost acknowledgement: the daemon posts
        it once and answers a resend with the same seq. To have that done
        for you, see :class:`ipcd.publisher.Publisher`."""
        return int(self.call(Op.SAY, room=room, text=text, id=message_id)["seq"])

    def msg(self, to: str, text: str) -> int:
        return int(self.call(Op.MSG, to=to, text=text)["seq"])

    def say_many(self, room: str, texts: Iterable[str], window: int = 128) -> Iterator[int]:
        """Post each text to ``room`` with up to ``window`` in flight; yields
        their sequence numbers in order (raises ServerError at a refused one).
        For a source that may block (a pipe), see :class:`ipcd.posting.Poster`."""
        from ipcd.posting import Poster  # noqa: PLC0415 - it imports this module

        with Poster[None](self, window) as poster:
            for text in texts:
                while not poster.can_post:
                    for ack in poster.wait():  # which sends what is queued first
                        yield ack.seq
                poster.say(room, text, None)
            for ack in poster.drain():
                yield ack.seq

    def rooms(self) -> list[dict[str, Any]]:
        """Every room, by name. A reply holds what fits the daemon's output
        buffer and says if more remain; this asks page after page."""
        return self._listing(Op.ROOMS, "rooms")

    def who(self, room: str | None = None) -> list[dict[str, Any]]:
        """Everyone chatting (in ``room``, if given), by nick; paged as :meth:`rooms`."""
        return self._listing(Op.WHO, "members", room=room)

    def _listing(self, op: Op, key: str, **args: Any) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        after = None
        while True:
            reply = self.call(op, after=after, **args)
            entries += reply[key]
            if not reply.get("more") or not reply[key]:
                return entries
            after = reply["after"]

    def topic(self, room: str, topic: str | None = None) -> str:
        return str(self.call(Op.TOPIC, room=room, topic=topic)["topic"])

    def history(
        self,
        room: str,
        count: int | None = None,
        before: int | None = None,
        *,
        after: int | None = None,
        gone: list[list[int]] | None = None,
    ) -> list[dict[str, Any]]:
        """The last ``count`` messages of ``room`` (None: all the daemon
        keeps), below seq ``before`` if given, oldest first. A reply holds
        what fits the daemon's output buffer and says if more remain; this
        asks page after page and returns them all. With ``after`` instead:
        the first ``count`` (None: all) kept messages after that seq, oldest
        first; the ranges of seqs after it no longer kept are appended to
        ``gone`` if given."""
        if after is not None:
            return self._history_after(room, count, after, gone if gone is not None else [])
        pages: list[list[dict[str, Any]]] = []
        remaining = count
        while True:
            reply = self.call(Op.HISTORY, room=room, count=remaining, before=before)
            page = list(reply["messages"])
            pages.append(page)
            if not reply.get("more") or not page:
                break
            before = int(reply["before"])
            if remaining is not None:
                remaining -= len(page)
                if remaining <= 0:
                    break
        return [message for page in reversed(pages) for message in page]

    def _history_after(
        self, room: str, count: int | None, after: int, gone: list[list[int]]
    ) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        while count is None or len(messages) < count:
            remaining = None if count is None else count - len(messages)
            reply = self.call(Op.HISTORY, room=room, count=remaining, after=after)
            if "gone" in reply:
                gone.append(list(reply["gone"]))
            messages += reply["messages"]
            if not reply.get("more") or not reply["messages"]:
                break
            after = int(reply["after"])
        return messages

    # -- fd hand-off ------------------------------------------------------------

    def put(
        self,
        name: str,
        fds: Sequence[int],
        *,
        names: Sequence[str] | None = None,
        allow_uids: Sequence[int] = (),
        allow_gids: Sequence[int] = (),
        public: bool = False,
        ttl: float | None = None,
        replace: bool = False,
    ) -> dict[str, Any]:
        """Store duplicates of ``fds`` under ``name`` (ours stay open)."""
        if ttl is not None:
            check_seconds(ttl, "ttl", positive=True)
        args = {
            "name": name,
            "names": list(names) if names else None,
            "allow_uids": list(allow_uids) or None,
            "allow_gids": list(allow_gids) or None,
            "public": public or None,
            "ttl": ttl,
            "replace": replace or None,
        }
        body = encode_json({k: v for k, v in args.items() if v is not None})
        return decode_json(self.request(Op.PUT, body, fds).body)

    def get(self, name: str, wait: float = 0.0) -> Handoff:
        """Duplicates of the stored fds (the entry stays). With ``wait``,
        wait up to that many seconds for the name to be put."""
        return self._receive_fds(Op.GET, name, wait)

    def take(self, name: str, wait: float = 0.0) -> Handoff:
        """The stored fds; the entry is removed."""
        return self._receive_fds(Op.TAKE, name, wait)

    def _receive_fds(self, op: Op, name: str, wait: float) -> Handoff:
        check_seconds(wait, "wait", positive=False)
        body = encode_json({"name": name, "wait": wait} if wait else {"name": name})
        previous = self.sock.gettimeout()
        if wait and previous is not None:  # settimeout is a syscall: only when it changes
            self.sock.settimeout(previous + wait)
            try:
                reply = self.request(op, body)
            finally:
                self.sock.settimeout(previous)
        else:
            reply = self.request(op, body)
        try:
            meta = decode_json(reply.body)
            return Handoff(str(meta["name"]), reply.fds, tuple(meta["names"]), int(meta["owner"]))
        except (KeyError, TypeError, ValueError, RemoteProtocolError):
            fdpass.close_fds(reply.fds)
            raise ConnectionLost("the daemon sent a malformed hand-off reply") from None

    def ls(self) -> dict[str, Any]:
        """Entries this caller may get (with their fds described), and its quota."""
        reply = decode_json(self.request(Op.LS, b"{}").body)
        entries = list(reply["entries"])
        while reply.get("more") and reply["entries"]:  # paged: a reply holds what fits the output buffer
            reply = self.call(Op.LS, after=reply["after"])
            entries += reply["entries"]
        return {"entries": entries, "quota": reply["quota"]}

    def rm(self, name: str) -> None:
        self.request(Op.RM, encode_json({"name": name}))

    def next_event(self, timeout: float | None = None) -> ChatEvent:
        """The next chat delivery (MESSAGE, PRIVATE or NOTICE), waiting up to
        ``timeout`` seconds (None: the client's timeout; 0 with none queued
        raises RequestTimeout at once)."""
        if self.events:
            return ChatEvent.from_frame(self.events.popleft())
        previous = self.sock.gettimeout()
        if timeout is not None:
            self.sock.settimeout(timeout if timeout > 0 else 1e-6)
        try:
            while True:
                frame = self.receive()
                if frame.request_id == 0 and frame.op in _EVENT_OPS:
                    return ChatEvent.from_frame(frame)
                if frame.op == Op.ERROR and frame.request_id == 0:
                    raise connection_error(frame)
                self._early[frame.request_id] = frame
        finally:
            self.sock.settimeout(previous)


class Handoff(NamedTuple):
    """fds received from the store: the caller owns ``fds`` and must close them."""

    name: str
    fds: tuple[int, ...]
    names: tuple[str, ...]  # one per fd (LISTEN_FDNAMES)
    owner: int


class ChatEvent(NamedTuple):
    """A chat delivery: ``kind`` is "message", "private" or "notice"; ``data``
    is its JSON object (room, from, uid, seq, ts, text, ...)."""

    kind: str
    data: dict[str, Any]

    @classmethod
    def from_frame(cls, frame: Frame) -> ChatEvent:
        return cls(_EVENT_OPS[frame.op], decode_json(frame.body))


_EVENT_OPS: dict[int, str] = {Op.MESSAGE: "message", Op.PRIVATE: "private", Op.NOTICE: "notice"}
