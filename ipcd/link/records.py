"""Typed records of the master<->worker link and their binary form.

Theory of operation: a client's request crosses to the master as a
:class:`Forward` (the connection, the request id, the op and the sender's
kernel credentials, then the client's body as is); what comes back is an
:class:`Answer` for one connection (a client-ready frame, plus what the
worker must note: a room joined or left, a GET/TAKE answered) or a
:class:`Deliver` of client-ready frames to a room's local members or to
given connections; :class:`Gone` says a connection closed. Each is encoded
once with :mod:`struct` (big-endian, fixed fields first, then length-prefixed
strings, then the opaque payload to the end of the record) and decoded once;
a record that does not parse raises :class:`LinkError`, at the one place
records come in. The fds a record travels with belong to the channel record,
not to these values (see :class:`Out`). They are NamedTuples, as
:class:`~ipcd.protocol.Frame` is: several are built per message on the hot
path, and a tuple is several times cheaper to build than a frozen
dataclass.

:class:`Sender` and :class:`Out` are what the chat hub and the fd store are
fed and return, so that neither imports the server.
"""

from __future__ import annotations

import functools
import math
import struct
from typing import Final, NamedTuple

from ipcd.link.ops import ChannelOp
from ipcd.protocol import ErrorCode, Op


class LinkError(ValueError):
    """A record that does not parse: the other process has a bug."""


class Sender(NamedTuple):
    """Who sent a request, as the kernel reported it to the worker."""

    worker: int
    conn: int  # 0 for a datagram
    request_id: int
    uid: int
    gid: int
    pid: int
    dgram: bytes | None = None  # the datagram sender's address, to answer at
    groups: tuple[int, ...] = ()  # supplementary groups (SO_PEERGROUPS)


class Out(NamedTuple):
    """One record for one worker: ``body`` is an encoded record; ``fds`` are
    given to the channel, which closes them once sent."""

    worker: int
    op: ChannelOp
    body: bytes
    fds: tuple[int, ...] = ()


class ServiceError(Exception):
    """A request a service refuses: the code and message its client gets."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- encoding helpers -------------------------------------------------------

_FORWARD: Final = struct.Struct("!QIBIIIHH")  # conn, rid, op, uid, gid, pid, ngroups, dgram length
_ANSWER: Final = struct.Struct("!QBIHHH")  # conn, flags, replies, join, part, dgram lengths
_DELIVER: Final = struct.Struct("!BI")  # kind, room length or number of connections
_GONE: Final = struct.Struct("!Q")
_POST: Final = struct.Struct("!IHI")  # request id, room length (| _WITH_ID), text length
_WITH_ID: Final = 0x8000  # in a post's room length: a message id follows the room (a byte of length, the id)
_REPLICA: Final = struct.Struct("!IBHHH")  # owner, public, name length, allow_uids, allow_gids counts
_UNREPLICA: Final = struct.Struct("!I")  # token
_THROTTLE: Final = struct.Struct("!Id")  # uid, seconds
THROTTLE_MAX: Final = 3600.0  # seconds one THROTTLE may hold a uid for
# A FORWARD's bytes besides the client's frame body, at most: its header,
# the supplementary groups the worker reads (up to 256, ipcd.fdpass) and a
# datagram's return address (a sun_path, 108 bytes).
FORWARD_ENVELOPE_MAX: Final = _FORWARD.size + 4 * 256 + 108

_HANDOUT: Final = 0x01  # the answer to a GET or TAKE: frees the fd reservation made for it
# The ops answered with fds: the worker reserves fds for each in flight, the
# master marks every answer to one (Answer.handout), so the two must agree.
HANDOUT_OPS: Final = frozenset((Op.GET, Op.TAKE))
_TO_ROOM, _TO_CONNS = 0, 1


@functools.lru_cache(maxsize=256)
def _array(code: str, count: int) -> struct.Struct:
    """The layout of ``count`` big-endian integers: built once per count,
    not parsed from a format string on every record."""
    return struct.Struct(f"!{count}{code}")


def _pack(code: str, values: tuple[int, ...]) -> bytes:
    return _array(code, len(values)).pack(*values) if values else b""


def _unpack(code: str, count: int, raw: bytes) -> tuple[int, ...]:
    return _array(code, count).unpack(raw) if count else ()


def _take(body: bytes, start: int, size: int) -> tuple[bytes, int]:
    end = start + size
    if end > len(body):
        raise LinkError(f"record ends at {len(body)} bytes, a field needs {end}")
    return body[start:end], end


def _text(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise LinkError(f"a name in a record is not UTF-8: {exc}") from None


def _header(layout: struct.Struct, body: bytes) -> tuple[int, ...]:
    if len(body) < layout.size:
        raise LinkError(f"record of {len(body)} bytes, shorter than its {layout.size}-byte header")
    return layout.unpack_from(body)


# -- the records --------------------------------------------------------------


class Forward(NamedTuple):
    """A client's request, worker -> master (a PUT's fds travel with it)."""

    conn: int
    request_id: int
    op: int
    uid: int
    gid: int
    pid: int
    body: bytes = b""
    groups: tuple[int, ...] = ()
    dgram: bytes | None = None

    def encode(self) -> bytes:
        dgram = self.dgram or b""
        head = _FORWARD.pack(
            self.conn, self.request_id, self.op, self.uid, self.gid, self.pid, len(self.groups), len(dgram)
        )
        groups = _pack("I", self.groups)
        return b"".join((head, groups, dgram, self.body))

    @classmethod
    def decode(cls, body: bytes) -> Forward:
        conn, rid, op, uid, gid, pid, ngroups, ndgram = _header(_FORWARD, body)
        if not ngroups and not ndgram:  # nearly every request
            return cls(conn, rid, op, uid, gid, pid, body[_FORWARD.size :])
        raw, pos = _take(body, _FORWARD.size, 4 * ngroups)
        dgram, pos = _take(body, pos, ndgram)
        groups = _unpack("I", ngroups, raw)
        return cls(conn, rid, op, uid, gid, pid, body[pos:], groups, dgram or None)

    def sender(self, worker: int) -> Sender:
        return Sender(
            worker, self.conn, self.request_id, self.uid, self.gid, self.pid, self.dgram, self.groups
        )


class Answer(NamedTuple):
    """The client-ready reply to one request, master -> worker."""

    conn: int
    frame: bytes
    joined: str | None = None  # the room the worker must now count the connection in
    parted: str | None = None  # ... and the one it must no longer
    handout: bool = False  # answers a GET or TAKE (see ipcd.server.flow)
    dgram: bytes | None = None  # answer this datagram address instead of a connection
    replies: int = 1  # replies joined in ``frame``, one per request (ipcd.link.outbox)

    @classmethod
    def to(cls, sender: Sender, frame: bytes, *, handout: bool = False) -> Answer:
        return cls(sender.conn, frame, handout=handout, dgram=sender.dgram)

    def encode(self) -> bytes:
        if self.joined is None and self.parted is None and not self.dgram:  # most answers
            return (
                _ANSWER.pack(self.conn, _HANDOUT if self.handout else 0, self.replies, 0, 0, 0) + self.frame
            )
        joined = (self.joined or "").encode()
        parted = (self.parted or "").encode()
        dgram = self.dgram or b""
        flags = _HANDOUT if self.handout else 0
        head = _ANSWER.pack(self.conn, flags, self.replies, len(joined), len(parted), len(dgram))
        return b"".join((head, joined, parted, dgram, self.frame))

    @classmethod
    def decode(cls, body: bytes) -> Answer:
        conn, flags, replies, njoined, nparted, ndgram = _header(_ANSWER, body)
        joined, pos = _take(body, _ANSWER.size, njoined)
        parted, pos = _take(body, pos, nparted)
        dgram, pos = _take(body, pos, ndgram)
        return cls(
            conn,
            body[pos:],
            _text(joined) if njoined else None,
            _text(parted) if nparted else None,
            bool(flags & _HANDOUT),
            dgram or None,
            replies,
        )


class Deliver(NamedTuple):
    """Client-ready frames for a room's local members, or for given
    connections (private messages, notices, a history replay)."""

    frames: bytes
    room: str | None = None
    conns: tuple[int, ...] = ()

    def encode(self) -> bytes:
        if self.room is not None:
            name = self.room.encode()
            return b"".join((_DELIVER.pack(_TO_ROOM, len(name)), name, self.frames))
        conns = _pack("Q", self.conns)
        return b"".join((_DELIVER.pack(_TO_CONNS, len(self.conns)), conns, self.frames))

    @classmethod
    def decode(cls, body: bytes) -> Deliver:
        kind, count = _header(_DELIVER, body)
        if kind == _TO_ROOM:
            name, pos = _take(body, _DELIVER.size, count)
            return cls(body[pos:], room=_text(name))
        if kind == _TO_CONNS:
            raw, pos = _take(body, _DELIVER.size, 8 * count)
            return cls(body[pos:], conns=_unpack("Q", count, raw))
        raise LinkError(f"unknown delivery kind {kind}")


class Post(NamedTuple):
    """One SAY checked by the worker (:func:`ipcd.protocol.chat.prepare_say`):
    its request id, the room, the text as the JSON string literal every
    MESSAGE made of it holds, and the client's message id (b"": none). A
    forwarded SAY's body is a run of these (all of one connection, in
    order): a pipelined burst is one record. A post without an id is
    encoded as before ids existed; one with an id flags it in the room's
    length (rooms are at most 64 bytes), so decoding the common post costs
    one test more."""

    request_id: int
    room: str
    text_json: bytes
    message_id: bytes = b""

    def encode(self) -> bytes:
        name = self.room.encode()
        if not self.message_id:
            return b"".join(
                (_POST.pack(self.request_id, len(name), len(self.text_json)), name, self.text_json)
            )
        head = _POST.pack(self.request_id, len(name) | _WITH_ID, len(self.text_json))
        return b"".join((head, name, bytes((len(self.message_id),)), self.message_id, self.text_json))

    @staticmethod
    def decode_run(body: bytes) -> list[Post]:
        posts = []
        pos, size, head = 0, len(body), _POST.size
        unpack, with_id = _POST.unpack_from, _WITH_ID  # locals: this loop runs once per message
        while pos < size:
            if size - pos < head:
                raise LinkError(f"a post of {size - pos} bytes, shorter than its {head}-byte header")
            request_id, nroom, ntext = unpack(body, pos)
            if nroom & with_id:
                post, pos = Post._with_id(body, pos + head, request_id, nroom & ~_WITH_ID, ntext)
                posts.append(post)
                continue
            room_end = pos + head + nroom
            pos = room_end + ntext
            if pos > size:
                raise LinkError(f"a run of posts ends at {size} bytes, a post needs {pos}")
            posts.append(Post(request_id, _text(body[room_end - nroom : room_end]), body[room_end:pos]))
        return posts

    @staticmethod
    def _with_id(body: bytes, start: int, request_id: int, nroom: int, ntext: int) -> tuple[Post, int]:
        """The post with an id whose room starts at ``start``, and where it ends."""
        room_end = start + nroom
        id_start = room_end + 1
        if id_start > len(body):
            raise LinkError(f"a run of posts ends at {len(body)} bytes, a post needs {id_start}")
        id_end = id_start + body[room_end]
        end = id_end + ntext
        if end > len(body) or id_end == id_start:
            raise LinkError(
                f"a post with a message id of {id_end - id_start} bytes needs {end}, has {len(body)}"
            )
        return Post(request_id, _text(body[start:room_end]), body[id_end:end], body[id_start:id_end]), end


class Gone(NamedTuple):
    """A connection that used the master's services has closed."""

    conn: int

    def encode(self) -> bytes:
        return _GONE.pack(self.conn)

    @classmethod
    def decode(cls, body: bytes) -> Gone:
        if len(body) != _GONE.size:
            raise LinkError(f"GONE record of {len(body)} bytes, expected {_GONE.size}")
        return cls(_GONE.unpack(body)[0])


class Replica(NamedTuple):
    """A stored entry, master -> worker, so the worker can answer a GET of
    it without the master: who may have it and the reply body to send
    (its fds travel with the record, one copy per worker)."""

    name: str
    owner: int
    public: bool
    allow_uids: tuple[int, ...]
    allow_gids: tuple[int, ...]
    body: bytes  # the JSON body of a GET reply for this entry

    def encode(self) -> bytes:
        name = self.name.encode()
        head = _REPLICA.pack(
            self.owner, int(self.public), len(name), len(self.allow_uids), len(self.allow_gids)
        )
        return b"".join((head, _pack("I", self.allow_uids), _pack("I", self.allow_gids), name, self.body))

    @classmethod
    def decode(cls, body: bytes) -> Replica:
        owner, public, nname, nuids, ngids = _header(_REPLICA, body)
        uids, pos = _take(body, _REPLICA.size, 4 * nuids)
        gids, pos = _take(body, pos, 4 * ngids)
        name, pos = _take(body, pos, nname)
        return cls(
            _text(name), owner, bool(public), _unpack("I", nuids, uids), _unpack("I", ngids, gids), body[pos:]
        )


class Unreplica(NamedTuple):
    """Master -> worker: close the copies of ``name`` (an RM, TAKE, replace
    or expiry); the worker sends the same record back as UNREPLICATED once
    it has, and the master answers the request that removed it only then."""

    token: int
    name: str

    def encode(self) -> bytes:
        return _UNREPLICA.pack(self.token) + self.name.encode()

    @classmethod
    def decode(cls, body: bytes) -> Unreplica:
        (token,) = _header(_UNREPLICA, body)
        return cls(token, _text(body[_UNREPLICA.size :]))


class Throttle(NamedTuple):
    """Master -> worker: ``uid`` posted past its daemon-wide share; give it
    no chat tokens for ``seconds`` (ipcd.chat.postrate)."""

    uid: int
    seconds: float

    def encode(self) -> bytes:
        return _THROTTLE.pack(self.uid, min(self.seconds, THROTTLE_MAX))

    @classmethod
    def decode(cls, body: bytes) -> Throttle:
        if len(body) != _THROTTLE.size:
            raise LinkError(f"THROTTLE record of {len(body)} bytes, expected {_THROTTLE.size}")
        uid, seconds = _THROTTLE.unpack(body)
        if not (math.isfinite(seconds) and 0 <= seconds <= THROTTLE_MAX):
            raise LinkError(f"THROTTLE for {seconds} seconds, outside 0 to {THROTTLE_MAX:g}")
        return cls(uid, seconds)
