"""The history journal: rooms' retained messages as an append-only record log.

Theory of operation
-------------------
The master keeps every room's history in memory; to survive a restart it
appends what changed to a journal (a state file, or a memfd in systemd's fd
store) and reads it back at start. This module is the journal's format and
nothing else: it is fed records and returns bytes, or fed bytes and returns
records. No file, no socket.

Each record on disk is ``length (u32) | crc32 (u32) | payload``, big-endian,
where ``length`` counts the payload and the CRC covers the length field and
the payload, so a flipped length is caught like a flipped payload byte. The
payload's first byte is its kind. A journal starts with a :class:`Header`
(format version and a *generation*, raised on every rewrite, so that of two
copies of one daemon's journal the newer can be told); what follows is
either a snapshot (for each room a :class:`RoomState`, then its messages,
oldest first) or changes as they happened (messages, :class:`Topic`,
:class:`Forget`, a :class:`RoomState` for a room created), or a snapshot
followed by changes: a reader folds them all in order and gets the same
state. Messages travel in blocks: consecutive messages of one room in one
record (a run of posts, or ~1 MiB of a snapshot), so the journal costs a
few packs, one CRC and one copy of the frames per run, not per message;
the reader hands them out as :class:`Message` records.

Appends are whole records, but a crash (or a full disk) can leave the last
one torn. :func:`decode` therefore stops at the first record that is short,
over :data:`RECORD_MAX`, fails its CRC or does not parse, and reports how
many bytes it dropped from there on: what came before is intact, whatever
happened to the tail. Nothing after a bad record is trusted, even if it
would parse: the journal is a sequence, and a hole in it would be a silent
gap in some room.

A client's message id for exactly-once posts needs no field of its own:
it is in the kept MESSAGE frame (``"id"``), from which the hub remembers
the window of ids again after a restart (:mod:`ipcd.chat.hubsave`).
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import mmap

__all__ = [
    "RECORD_MAX",
    "Decoded",
    "Forget",
    "Header",
    "JournalError",
    "Message",
    "MessageRun",
    "Reader",
    "Record",
    "RoomImage",
    "RoomState",
    "Topic",
    "decode",
    "encode",
    "encode_changes",
    "encode_run",
    "fold",
    "snapshot",
]

VERSION: Final = 1
# No record is this large: a block holds one FORWARD's run of posts (at most a
# channel record) or a snapshot's ~1 MiB; a larger length is corruption.
RECORD_MAX: Final = 1 << 30
NO_CREATOR: Final = -1  # a room charged to nobody's room budget (the lobby)

_FRAME = struct.Struct(">II")  # payload length, crc32 of (length field + payload)
_KIND = struct.Struct(">B")
_HEADER = struct.Struct(">BHQ")  # kind, version, generation
# kind, first seq, count, room length, flags; then the room, count uids (u32; one if _ONE_POSTER),
# count frame lengths (u32), the frames
_BLOCK = struct.Struct(">BQIHB")
_ONE_POSTER: Final = 2  # a run of one poster's posts: its uid once
_BLOCK_BYTES: Final = 1 << 20  # a snapshot's blocks of one room's messages: about this large
_ROOM = struct.Struct(">BQqH")  # kind, seq, creator uid (or NO_CREATOR), room length; the topic to the end
_NAMED = struct.Struct(">BH")  # kind, room length; for a topic the topic to the end

_K_HEADER: Final = 0
_K_BLOCK: Final = 1
_K_ROOM: Final = 2
_K_TOPIC: Final = 3
_K_FORGET: Final = 4


class JournalError(ValueError):
    """A record that does not parse (the reader treats it as the torn end)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Header:
    generation: int
    version: int = VERSION


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    room: str
    seq: int
    uid: int
    frame: bytes  # the client-ready MESSAGE frame, header included


@dataclasses.dataclass(frozen=True, slots=True)
class RoomState:
    """A room as it is (a snapshot), or as it was created (a change):
    what follows for it builds on this, what came before is replaced."""

    room: str
    seq: int = 0
    creator: int | None = None
    topic: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Topic:
    room: str
    topic: str


@dataclasses.dataclass(frozen=True, slots=True)
class Forget:
    room: str


Record = Header | Message | RoomState | Topic | Forget


@dataclasses.dataclass(frozen=True, slots=True)
class MessageRun:
    """A run of one poster's messages to one room, seqs ``first_seq`` on:
    what the hub notes per run (encoded later, once per loop pass)."""

    room: bytes  # the room's name, UTF-8
    first_seq: int
    uid: int
    frames: Sequence[bytes]


# -- encoding -----------------------------------------------------------------


def _framed(payload: bytes) -> bytes:
    length = len(payload).to_bytes(4, "big")
    return length + zlib.crc32(payload, zlib.crc32(length)).to_bytes(4, "big") + payload


def _name(room: str) -> bytes:
    raw = room.encode()
    if len(raw) > 0xFFFF:
        raise JournalError(f"room name of {len(raw)} bytes")
    return raw


def encode(record: Record) -> bytes:
    """One record, framed."""
    if isinstance(record, Message):
        return _block(record.room.encode(), record.seq, [record.uid], [record.frame])
    if isinstance(record, RoomState):
        room = _name(record.room)
        creator = NO_CREATOR if record.creator is None else record.creator
        return _framed(_ROOM.pack(_K_ROOM, record.seq, creator, len(room)) + room + record.topic.encode())
    if isinstance(record, Topic):
        room = _name(record.room)
        return _framed(_NAMED.pack(_K_TOPIC, len(room)) + room + record.topic.encode())
    if isinstance(record, Forget):
        room = _name(record.room)
        return _framed(_NAMED.pack(_K_FORGET, len(room)) + room)
    return _framed(_HEADER.pack(_K_HEADER, record.version, record.generation))


def _block(room: bytes, first_seq: int, uids: Sequence[int], frames: Sequence[bytes]) -> bytes:
    """Consecutive messages of one room as one record: a few packs and one
    CRC for the lot, so a run of posts costs the journal little per message."""
    if len(room) > 0xFFFF:
        raise JournalError(f"room name of {len(room)} bytes")
    count = len(frames)
    if len(uids) not in (1, count):
        raise JournalError(f"{count} messages with {len(uids)} uids")
    flags = _ONE_POSTER if len(uids) == 1 and count != 1 else 0
    parts = [
        _BLOCK.pack(_K_BLOCK, first_seq, count, len(room), flags),
        room,
        struct.pack(f">{len(uids)}I", *uids),
        struct.pack(f">{count}I", *map(len, frames)),
        *frames,
    ]
    return _framed(b"".join(parts))


def encode_run(run: MessageRun) -> bytes:
    """A run's messages (one poster, one room, seqs from ``first_seq``)."""
    return _block(run.room, run.first_seq, [run.uid], run.frames)


def encode_changes(changes: Iterable[MessageRun | Record]) -> bytes:
    """What a hub noted in a pass (:attr:`ipcd.chat.hub.Hub.changes`), framed."""
    return b"".join(encode_run(c) if isinstance(c, MessageRun) else encode(c) for c in changes)


# -- decoding -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Decoded:
    records: list[Record]
    good: int  # bytes of whole, valid records from the start
    dropped: int  # bytes from the first bad record to the end (0: none)
    reason: str = ""  # why the tail was dropped ("" when nothing was)


def _parse_block(payload: bytes) -> list[Record]:
    _, first_seq, count, room_len, flags = _BLOCK.unpack_from(payload)
    if flags & ~_ONE_POSTER:
        raise JournalError(f"message block flags 0x{flags:02x}")
    at = _BLOCK.size
    room = payload[at : at + room_len].decode()
    at += room_len
    posters = 1 if flags & _ONE_POSTER else count
    if len(payload) < at + 4 * (posters + count):
        raise JournalError("message block too short")
    uids = struct.unpack_from(f">{posters}I", payload, at)
    if posters == 1:
        uids *= count
    at += 4 * posters
    lengths = struct.unpack_from(f">{count}I", payload, at)
    at += 4 * count
    if at + sum(lengths) != len(payload):
        raise JournalError("message block of the wrong length")
    messages: list[Record] = []
    for i in range(count):
        messages.append(Message(room, first_seq + i, uids[i], payload[at : at + lengths[i]]))
        at += lengths[i]
    return messages


def _parse(payload: bytes) -> list[Record]:
    try:
        (kind,) = _KIND.unpack_from(payload)
        if kind == _K_BLOCK:
            return _parse_block(payload)
        return [_parse_one(kind, payload)]
    except (struct.error, UnicodeDecodeError) as exc:
        raise JournalError(f"record does not parse: {exc}") from None


def _parse_one(kind: int, payload: bytes) -> Record:
    if kind == _K_ROOM:
        _, seq, creator, room_len = _ROOM.unpack_from(payload)
        at = _ROOM.size
        if at + room_len > len(payload):
            raise JournalError("room record too short")
        return RoomState(
            payload[at : at + room_len].decode(),
            seq,
            None if creator == NO_CREATOR else creator,
            payload[at + room_len :].decode(),
        )
    if kind in (_K_TOPIC, _K_FORGET):
        _, room_len = _NAMED.unpack_from(payload)
        at = _NAMED.size
        if at + room_len > len(payload) or (kind == _K_FORGET and at + room_len != len(payload)):
            raise JournalError("room name past the record")
        room = payload[at : at + room_len].decode()
        if kind == _K_FORGET:
            return Forget(room)
        return Topic(room, payload[at + room_len :].decode())
    if kind == _K_HEADER:
        if len(payload) != _HEADER.size:
            raise JournalError("header of the wrong length")
        _, version, generation = _HEADER.unpack(payload)
        if version != VERSION:
            raise JournalError(f"journal format version {version}, this daemon reads {VERSION}")
        return Header(generation, version)
    raise JournalError(f"unknown record kind {kind}")


class Reader:
    """The records of a journal, one at a time, up to the first torn or
    corrupt one (see the module head): a journal much larger than what it
    leaves (a long run's, before compaction) is folded without being held
    as records. Once iterated, ``good``, ``dropped`` and ``reason`` say how
    it ended, ``generation`` is the header's (None: no valid header)."""

    def __init__(self, data: bytes | memoryview | mmap.mmap) -> None:
        self._data = data
        self.good = 0
        self.dropped = 0
        self.reason = ""
        self.generation: int | None = None

    def __iter__(self) -> Iterator[Record]:
        with memoryview(self._data) as view:
            yield from self._records(view)

    def _records(self, view: memoryview) -> Iterator[Record]:
        at, end = 0, len(view)
        while at < end:
            self.reason = self._check(view, at, end)
            if self.reason:
                break
            length = _FRAME.unpack_from(view, at)[0]
            try:
                parsed = _parse(bytes(view[at + _FRAME.size : at + _FRAME.size + length]))
            except JournalError as exc:
                self.reason = str(exc)
                break
            headers = [r for r in parsed if isinstance(r, Header)]
            if (at == 0 and (len(headers), len(parsed)) != (1, 1)) or (at and headers):  # one header, first
                self.reason = "a header out of place" if at else "no header"
                break
            if headers:
                self.generation = headers[0].generation
            at += _FRAME.size + length
            self.good = at
            yield from parsed
        self.dropped = end - at

    @staticmethod
    def _check(view: memoryview, at: int, end: int) -> str:
        """Why the record at ``at`` is not whole and intact ("" if it is)."""
        if end - at < _FRAME.size:
            return "a torn record header"
        length, crc = _FRAME.unpack_from(view, at)
        if length > RECORD_MAX:
            return f"a record claiming {length} bytes"
        if end - at - _FRAME.size < length:
            return "a torn record"
        if (
            zlib.crc32(view[at + _FRAME.size : at + _FRAME.size + length], zlib.crc32(view[at : at + 4]))
            != crc
        ):
            return "a record failing its CRC"
        return ""


def decode(data: bytes | memoryview) -> Decoded:
    """Every record up to the first torn or corrupt one, as a list."""
    reader = Reader(data)
    records = list(reader)
    return Decoded(records, reader.good, reader.dropped, reader.reason)


# -- state ---------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class RoomImage:
    """A room as a journal leaves it: what the hub restores."""

    name: str
    seq: int = 0
    creator: int | None = None
    topic: str = ""
    history: deque[tuple[int, bytes, int]] = dataclasses.field(default_factory=deque)
    last_used: int = 0  # the ordinal of its last message in the journal: eviction order


def fold(records: Iterable[Record], history: int) -> dict[str, RoomImage]:
    """The rooms a journal's records leave, each with at most its last
    ``history`` messages, in the order they were created."""
    rooms: dict[str, RoomImage] = {}
    ordinal = 0
    for record in records:
        if isinstance(record, Message):
            image = rooms.get(record.room)
            if image is None:  # never written so, but a message is kept rather than dropped
                image = rooms[record.room] = RoomImage(record.room, creator=record.uid)
            if image.history and record.seq <= image.history[-1][0]:
                continue  # a seq already kept: never written so
            image.seq = max(image.seq, record.seq)
            image.history.append((record.seq, record.frame, record.uid))
            if len(image.history) > history:
                image.history.popleft()
            ordinal += 1
            image.last_used = ordinal
        elif isinstance(record, RoomState):
            rooms.pop(record.room, None)  # to the end: creation order
            rooms[record.room] = RoomImage(record.room, record.seq, record.creator, record.topic)
        elif isinstance(record, Topic):
            image = rooms.get(record.room)
            if image is not None:
                image.topic = record.topic
        elif isinstance(record, Forget):
            rooms.pop(record.room, None)
    return rooms


def snapshot(generation: int, rooms: Iterable[RoomImage]) -> Iterator[bytes]:
    """A whole journal holding ``rooms``: a header, then each room's state
    and its messages. Yielded in pieces, so a large one is written as it is
    made."""
    yield encode(Header(generation))
    for image in rooms:
        yield encode(RoomState(image.name, image.seq, image.creator, image.topic))
        room = _name(image.name)
        block: list[tuple[int, bytes, int]] = []
        size = 0
        for entry in image.history:  # a gap-free suffix: consecutive seqs
            block.append(entry)
            size += len(entry[1])
            if size >= _BLOCK_BYTES:
                yield _block(room, block[0][0], [u for _, _, u in block], [f for _, f, _ in block])
                block, size = [], 0
        if block:
            yield _block(room, block[0][0], [u for _, _, u in block], [f for _, f, _ in block])
