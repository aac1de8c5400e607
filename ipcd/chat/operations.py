"""The chat operations other than SAY: what each request does to the hub.

Theory of operation: each is a function of the hub, the sender (from the
kernel's credentials), the request's checked body and the two outboxes (the
reply's, and ``later`` for what the request causes after its reply); it
returns the meta for the worker (which room it joined or parted) and the
reply's body, or raises :class:`~ipcd.chat.model.ChatError`. The hub's
:meth:`~ipcd.chat.hub.Hub.handle` looks them up in :data:`HANDLERS` by op;
SAY, the hot path, stays in the hub.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ipcd.chat import pages
from ipcd.chat.journal import Topic
from ipcd.chat.model import ChatError, is_unicode, message_text
from ipcd.link.outbox import Outbox, Staged
from ipcd.link.records import Sender
from ipcd.protocol import ErrorCode, Op, encode_frame, encode_json
from ipcd.protocol.chat import (
    DEFAULT_ROOM,
    TOPIC_MAX,
    check_count,
    check_cursor,
    check_nick,
    check_room,
    sanitize_text,
)
from ipcd.protocol.frames import HEADER

if TYPE_CHECKING:
    from ipcd.chat.hub import Hub

Args = dict[str, Any]  # a request body
# (meta for the worker, reply body: to encode, or encoded already)
Result = tuple[dict[str, Any], dict[str, Any] | bytes]


def op_nick(hub: Hub, sender: Sender, args: Args, out: Outbox, later: Staged) -> Result:
    wanted = check_nick(args.get("nick"))
    session = hub.session_of(sender)
    if wanted != session.nick:
        holder = hub.nicks.get(wanted)
        if holder is not None:
            raise ChatError(ErrorCode.EXISTS, f"nick {wanted!r} is taken by uid {holder.uid}; choose another")
        old = session.nick
        del hub.nicks[old]
        session.rename(wanted)
        hub.nicks[wanted] = session
        for name in sorted(session.rooms):
            hub.notice(hub.rooms[name], "nick", session, later, old=old)
    return {}, {"nick": session.nick}


def op_join(hub: Hub, sender: Sender, args: Args, out: Outbox, later: Staged) -> Result:
    name = check_room(args.get("room", DEFAULT_ROOM))
    want_history = check_count(args.get("history"), hub.limits.history, "history")
    after = check_cursor(args.get("after"), "after")
    if after is not None and args.get("history") is not None:
        raise ChatError(ErrorCode.BAD_REQUEST, "give history (the newest N) or after (a seq), not both")
    session = hub.session_of(sender)
    # Checked before the room is created, so a refused join leaves no empty room behind.
    if name not in session.rooms and len(session.rooms) >= hub.limits.rooms_per_connection:
        raise ChatError(
            ErrorCode.LIMIT_EXCEEDED,
            f"a connection may join at most {hub.limits.rooms_per_connection} rooms; part one first",
        )
    if name not in session.rooms and not hub.joined.admits(session.uid):
        raise ChatError(
            ErrorCode.LIMIT_EXCEEDED,
            hub.joined.refusal(session.uid, "part rooms on your other connections, or close some"),
        )
    room = hub.room_for(name, create=True, uid=session.uid)
    if name not in session.rooms:
        hub.notice(room, "join", session, out)  # to the members already there
        room.members[session.member] = session
        room.workers[sender.worker] += 1
        session.rooms.add(name)
        hub.joined.charge(session.uid)
    result: dict[str, Any] = {
        "room": name,
        "nick": session.nick,
        "topic": room.topic,
        "seq": room.seq,
        "members": sorted(s.nick for s in room.members.values()),
    }
    if after is None:
        replay, more = pages.newest_before(room.history, want_history, None, hub.limits.reply_budget)
        if more:
            result["before"] = replay[0][0]  # HISTORY pages on from here, towards the oldest
    else:
        resumed = pages.after(room.history, room.seq, after, len(room.history), hub.limits.reply_budget)
        replay, more = resumed.kept, resumed.more
        if resumed.next_after is not None:
            result["after"] = resumed.next_after  # HISTORY pages on from here, towards the newest
        if resumed.gone is not None:
            result["gone"] = list(resumed.gone)
    # The notice went before the reply (the joiner's worker indexes it only
    # from the reply on); the replay goes after it on the same ordered
    # channel, before any new message.
    hub.deliver_to(sender.worker, sender.conn, [frame for _, frame, _ in replay], later)
    result["history"] = len(replay)
    result["more"] = more
    return {"join": name}, result


def op_part(hub: Hub, sender: Sender, args: Args, out: Outbox, later: Staged) -> Result:
    name = check_room(args.get("room"))
    session = hub.sessions.get((sender.worker, sender.conn))
    if session is None or name not in session.rooms:
        raise ChatError(ErrorCode.NOT_FOUND, f"you are not in room {name!r}")
    hub.leave(hub.rooms[name], session, "part", later)
    return {"part": name}, {"room": name}


def op_msg(hub: Hub, sender: Sender, args: Args, out: Outbox, later: Staged) -> Result:
    target_nick = check_nick(args.get("to"), "to")
    text = message_text(args.get("text"), hub.limits.max_text)
    session = hub.session_of(sender)
    target = hub.nicks.get(target_nick)
    if target is None:
        raise ChatError(ErrorCode.NOT_FOUND, f"no one is connected as {target_nick!r}; see 'ipcctl who'")
    hub.private_seq += 1
    message = {
        "from": session.nick,
        "uid": session.uid,
        "to": target.nick,
        "seq": hub.private_seq,
        "ts": time.time(),
        "text": text,
    }
    frame = encode_frame(Op.PRIVATE, 0, encode_json(message))
    worker, conn = target.member
    later.to_conns(worker, (conn,), frame)
    hub.messages += 1
    return {}, {"to": target.nick, "seq": hub.private_seq, "ts": message["ts"]}


def op_rooms(hub: Hub, sender: Sender, args: Args, out: Outbox, later: Staged) -> Result:
    after = _name_cursor(args.get("after"), "after (a room name)")
    rooms = sorted((r for r in hub.rooms.values() if after is None or r.name > after), key=lambda r: r.name)
    entries = ({"room": r.name, "members": len(r.members), "topic": r.topic, "seq": r.seq} for r in rooms)
    return {}, _listing("rooms", entries, len(rooms), hub.limits.reply_budget, "room")


def op_who(hub: Hub, sender: Sender, args: Args, out: Outbox, later: Staged) -> Result:
    room_name = args.get("room")
    after = _name_cursor(args.get("after"), "after (a nick)")
    if room_name is None:
        everyone = hub.sessions.values()
    else:
        everyone = hub.room_for(check_room(room_name), create=False).members.values()
    sessions = sorted((s for s in everyone if after is None or s.nick > after), key=lambda s: s.nick)
    entries = ({"nick": s.nick, "uid": s.uid, "pid": s.pid, "rooms": sorted(s.rooms)} for s in sessions)
    reply = _listing("members", entries, len(sessions), hub.limits.reply_budget, "nick")
    reply["room"] = room_name
    return {}, reply


def _name_cursor(value: Any, what: str) -> str | None:
    """A listing's page cursor: the last name of the page before (None: from the first)."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 256:
        raise ChatError(ErrorCode.BAD_REQUEST, f"{what} must be a string of at most 256 characters")
    return value


def _listing(
    key: str, entries: Iterator[dict[str, Any]], count: int, budget: int, name: str
) -> dict[str, Any]:
    """As many of ``entries`` (in name order) as fit ``budget`` bytes of
    JSON, at least one, so that a listing reply, like a page of history,
    always fits the asker's output buffer; ``more`` and the ``after`` to
    ask with next when some were left out."""
    page: list[dict[str, Any]] = []
    size = 0
    for entry in entries:
        size += len(encode_json(entry)) + 1
        if page and size > budget:
            break
        page.append(entry)
    reply: dict[str, Any] = {key: page, "more": len(page) < count}
    if reply["more"]:
        reply["after"] = page[-1][name]
    return reply


def op_topic(hub: Hub, sender: Sender, args: Args, out: Outbox, later: Staged) -> Result:
    name = check_room(args.get("room", DEFAULT_ROOM))
    topic = args.get("topic")
    if topic is not None and (not isinstance(topic, str) or len(topic) > TOPIC_MAX or not is_unicode(topic)):
        raise ChatError(ErrorCode.BAD_REQUEST, f"topic must be valid Unicode of at most {TOPIC_MAX} chars")
    room = hub.room_for(name, create=False)  # every field checked first: a bad one is BAD_REQUEST
    if topic is not None:
        session = hub.session_of(sender)
        if room.name not in session.rooms:
            raise ChatError(ErrorCode.PERMISSION_DENIED, f"join {room.name!r} to set its topic")
        room.topic = sanitize_text(topic).replace("\n", " ")
        if hub.changes is not None:
            hub.changes.append(Topic(room.name, room.topic))
        hub.notice(room, "topic", session, later, topic=room.topic)
    return {}, {"room": room.name, "topic": room.topic}


def op_history(hub: Hub, sender: Sender, args: Args, out: Outbox, later: Staged) -> Result:
    name = check_room(args.get("room", DEFAULT_ROOM))
    count = check_count(args.get("count", hub.limits.history), hub.limits.history, "count")
    before = check_cursor(args.get("before"), "before")
    after = check_cursor(args.get("after"), "after")
    if before is not None and after is not None:
        raise ChatError(ErrorCode.BAD_REQUEST, "give before or after, not both")
    room = hub.room_for(name, create=False)  # every field checked first: a bad one is BAD_REQUEST
    head: dict[str, Any] = {"room": room.name}
    if after is None:
        page, more = pages.newest_before(room.history, count, before, hub.limits.reply_budget)
        if more:
            head["before"] = page[0][0]
    else:
        resumed = pages.after(room.history, room.seq, after, count, hub.limits.reply_budget)
        page, more = resumed.kept, resumed.more
        if resumed.next_after is not None:
            head["after"] = resumed.next_after
        if resumed.gone is not None:
            head["gone"] = list(resumed.gone)
    head["more"] = more
    # The kept MESSAGE bodies as they are, not parsed and encoded again.
    messages = b",".join(frame[HEADER.size :] for _, frame, _ in page)
    return {}, encode_json(head)[:-1] + b',"messages":[' + messages + b"]}"


HANDLERS: dict[int, Callable[[Hub, Sender, Args, Outbox, Staged], Result]] = {
    Op.NICK: op_nick,
    Op.JOIN: op_join,
    Op.PART: op_part,
    Op.MSG: op_msg,
    Op.ROOMS: op_rooms,
    Op.WHO: op_who,
    Op.TOPIC: op_topic,
    Op.HISTORY: op_history,
}
