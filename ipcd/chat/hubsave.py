"""What of the hub survives a restart: rooms out to a journal and back.

Theory of operation: :func:`export` gives the rooms a restart must bring
back (those that numbered messages, and the lobby), as the journal's
:class:`~ipcd.chat.journal.RoomImage`; :func:`restore` rebuilds them at
start, charging each kept message to its poster and each room to its
creator again, so every budget holds from the first request; then the
message ids of the kept messages are remembered again
(:func:`rebuild_recent_ids`), so a client resending a post across the
restart is answered ``duplicate``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from ipcd.chat.journal import RoomImage
from ipcd.chat.model import Room
from ipcd.chat.recentids import Posted
from ipcd.protocol.chat import DEFAULT_ROOM, MESSAGE_ID_MAX
from ipcd.protocol.frames import HEADER
from ipcd.protocol.messages import decode_json

if TYPE_CHECKING:
    from ipcd.chat.hub import Hub

HAS_ID = b'","id":"'  # in a MESSAGE body only where an id follows the sender's nick


def rebuild_recent_ids(hub: Hub) -> int:
    """Remember the message ids of the kept messages (after the rooms
    were restored from a saved state, so that a client resending across
    a restart is still answered ``duplicate``); how many were found."""
    found: list[tuple[int, bytes, Posted]] = []
    for room in hub.rooms.values():
        for seq, frame, uid in room.history:
            body = frame[HEADER.size :]
            if HAS_ID not in body:  # a text's quotes are escaped: only an id puts it there
                continue
            message = decode_json(body)
            message_id = message.get("id")
            if isinstance(message_id, str) and 0 < len(message_id) <= MESSAGE_ID_MAX:
                ts = float(message["ts"])
                found.append((uid, message_id.encode(), Posted(room.name_json, seq, repr(ts).encode(), ts)))
    hub.recent_ids.restore(found)
    return len(found)


def export(hub: Hub) -> Iterator[RoomImage]:
    """The rooms a restart must bring back: those that numbered messages
    (their seq goes on from there), and the lobby."""
    for room in hub.rooms.values():
        if room.seq or room.name == DEFAULT_ROOM:
            yield RoomImage(room.name, room.seq, room.creator, room.topic, room.history, room.last_used)


def restore(hub: Hub, images: Iterable[RoomImage]) -> int:
    """Rooms from a journal, at start (no one is connected yet): their
    seqs, topics and history, charged as if just posted (so the history
    size, the per-uid history bytes and the room budgets hold from the
    start), and the message ids of the kept messages remembered again.
    Returns how many messages were restored."""
    restored = 0
    for image in images:
        if not image.seq and image.name != DEFAULT_ROOM:
            continue
        room = hub.rooms.get(image.name)
        if room is None:
            if len(hub.rooms) >= hub.limits.max_rooms:
                continue
            room = hub.rooms[image.name] = Room(image.name, creator=image.creator)
            if image.creator is not None:
                hub.created.charge(image.creator)
        room.seq, room.topic = image.seq, image.topic
        for entry in image.history:
            room.history.append(entry)
            hub.kept.kept(room, entry[2], 1, len(entry[1]), hub.limits.history)
        restored += len(image.history)
        room.last_used = image.last_used
        hub.messages = max(hub.messages, image.last_used)
    hub.trim_history()
    for room in hub.rooms.values():
        if room.creator is not None:
            hub.idle.may_be_idle(room, hub.rooms, hub.created.limit_for(room.creator))
    rebuild_recent_ids(hub)  # a post resent across the restart is still answered duplicate
    return restored
