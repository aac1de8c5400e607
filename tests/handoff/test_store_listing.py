"""LS is paged like HISTORY, ROOMS and WHO: every user's public entries can
be listed, so one reply of them all could pass the asker's output buffer
(and describe every fd at once). A reply holds what fits the reply budget,
at least one entry, then ``more`` and the ``after`` to ask with next."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from ipcd.client import Client, ServerError
from ipcd.handoff.store import Store, StoreLimits
from ipcd.link.records import Answer, Sender
from ipcd.protocol import ErrorCode, Op, decode_error, decode_json, decode_record, encode_json, reply_op
from tests.daemon import Daemon, ipcctl

BUDGET = 3000
OWNERS = range(71001, 71011)  # ten uids, eight public entries each


def _sender(uid: int = 0) -> Sender:
    return Sender(worker=1, conn=1, request_id=7, uid=uid, gid=uid, pid=1)


def _ls(store: Store, body: dict[str, Any]) -> dict[str, Any]:
    (out,) = store.handle(_sender(), Op.LS, encode_json(body), ())
    frame = decode_record(Answer.decode(out.body).frame, out.fds)
    if frame.op == Op.ERROR:
        raise ServerError(*decode_error(frame.body))
    assert frame.op == reply_op(Op.LS)
    assert len(frame.body) <= BUDGET + 1024  # a page fits (its quota and keys besides)
    return decode_json(frame.body)


@pytest.fixture
def store() -> Store:
    store = Store(StoreLimits(quota=8, reply_budget=BUDGET))
    read, write = os.pipe()
    try:
        for uid in OWNERS:
            for i in range(8):
                body = encode_json({"name": f"u{uid}-e{i}", "public": True, "names": ["fd-" + "n" * 40]})
                assert store.handle(_sender(uid), Op.PUT, body, (os.dup(read),))
    finally:
        os.close(read)
        os.close(write)
    return store


def test_the_pages_join_up_in_name_order_and_each_fits(store: Store) -> None:
    try:
        pages = [_ls(store, {})]
        while pages[-1]["more"]:
            pages.append(_ls(store, {"after": pages[-1]["after"]}))
        assert len(pages) > 3
        assert "after" not in pages[-1]
        names = [e["name"] for page in pages for e in page["entries"]]
        assert names == sorted(f"u{uid}-e{i}" for uid in OWNERS for i in range(8))
    finally:
        store.close_all()


def test_a_bad_cursor_is_refused(store: Store) -> None:
    try:
        with pytest.raises(ServerError) as refused:
            _ls(store, {"after": 5})
        assert refused.value.code == ErrorCode.BAD_REQUEST
    finally:
        store.close_all()


def test_ipcctl_ls_shows_every_entry_across_pages(socket_dir: Path) -> None:
    daemon = Daemon(socket_dir, "--max-outbuf", "16K", "--fd-quota", "200", workers=2).start()
    read, write = os.pipe()
    try:
        with Client(daemon.socket_dir, timeout=10) as client:
            for i in range(150):  # about 300 bytes each: 45 KB of listing, pages of 4 KiB
                client.put(f"entry-{i:03d}", [read], names=["a-" + "n" * 60])
            listed = client.ls()
            assert [e["name"] for e in listed["entries"]] == [f"entry-{i:03d}" for i in range(150)]
        shown = ipcctl(daemon.socket_dir, "ls")
        assert shown.returncode == 0, shown.stderr
        assert sum(line.startswith("entry-") for line in shown.stdout.splitlines()) == 150
    finally:
        os.close(read)
        os.close(write)
        assert daemon.stop() == 0
