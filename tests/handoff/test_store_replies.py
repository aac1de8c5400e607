"""The store's hand-out replies are encoded once per entry and GET bodies
parsed once per distinct body: a reply must still describe the entry as it
is now (after a replace), and a cached body must never outlive its meaning."""

from __future__ import annotations

import os
from typing import Any

from ipcd import fdpass
from ipcd.handoff.store import Store
from ipcd.link.records import Answer, Sender
from ipcd.protocol import ErrorCode, Op, decode_error, decode_json, decode_record, encode_json, reply_op


def _sender(request_id: int) -> Sender:
    return Sender(worker=1, conn=1, request_id=request_id, uid=os.getuid(), gid=os.getgid(), pid=1)


def _answer(store: Store, request_id: int, body: bytes) -> tuple[int, bytes]:
    (out,) = store.handle(_sender(request_id), Op.GET, body, ())
    frame = decode_record(Answer.decode(out.body).frame, out.fds)
    fdpass.close_fds(out.fds)
    assert frame.request_id == request_id
    return frame.op, frame.body


def _get(store: Store, request_id: int, body: bytes) -> dict[str, Any]:
    op, reply = _answer(store, request_id, body)
    assert op == reply_op(Op.GET), decode_error(reply)
    return decode_json(reply)


def _refusal(store: Store, request_id: int, body: bytes) -> ErrorCode:
    op, reply = _answer(store, request_id, body)
    assert op == Op.ERROR
    return ErrorCode(decode_error(reply)[0])


def test_a_get_after_a_replace_describes_the_new_entry() -> None:
    store = Store()
    pipes = [os.pipe() for _ in range(3)]
    try:
        body = encode_json({"name": "svc"})
        store.handle(_sender(1), Op.PUT, encode_json({"name": "svc", "names": ["a"]}), (os.dup(pipes[0][1]),))
        assert _get(store, 2, body) == {"name": "svc", "count": 1, "names": ["a"], "owner": os.getuid()}
        replacement = (os.dup(pipes[1][1]), os.dup(pipes[2][1]))
        store.handle(
            _sender(3),
            Op.PUT,
            encode_json({"name": "svc", "names": ["b", "c"], "replace": True}),
            replacement,
        )
        assert _get(store, 4, body) == {"name": "svc", "count": 2, "names": ["b", "c"], "owner": os.getuid()}
        store.handle(_sender(5), Op.RM, body, ())
        assert _refusal(store, 6, body) == ErrorCode.NOT_FOUND  # the same body, parsed before
    finally:
        store.close_all()
        for reader, writer in pipes:
            os.close(reader)
            os.close(writer)


def test_many_distinct_get_bodies_keep_being_answered_right() -> None:
    """More distinct bodies than the parse cache holds (it is emptied when
    full): each is still answered for its own name, bad JSON still refused."""
    store = Store()
    reader, writer = os.pipe()
    try:
        store.handle(_sender(1), Op.PUT, encode_json({"name": "kept"}), (os.dup(writer),))
        for index in range(600):
            assert _refusal(store, 10 + index, encode_json({"name": f"n{index}"})) == ErrorCode.NOT_FOUND
            assert _get(store, 1000 + index, encode_json({"name": "kept"}))["name"] == "kept"
        assert _refusal(store, 2000, b"{not json") == ErrorCode.BAD_REQUEST
    finally:
        store.close_all()
        os.close(reader)
        os.close(writer)
