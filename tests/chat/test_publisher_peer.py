"""The publisher against a scripted peer on a real socket: the refusals
that mean "not taken, send it again" (UNAVAILABLE from a worker being
replaced) and the ones that are final, which a real daemon cannot be made
to give on demand.

The peer speaks the wire protocol (ipcd.protocol's codec) on a Unix socket
in a temporary socket dir; each accepted connection follows a script:
for every SAY it reads, the next answer of the script (a reply with the
next seq, or an ERROR), then it closes when the script ends.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from ipcd.client import ServerError
from ipcd.protocol import (
    NEED_DATA,
    ErrorCode,
    FrameDecoder,
    Op,
    decode_json,
    encode_error,
    encode_frame,
    encode_json,
)
from ipcd.publisher import Publisher

Answer = ErrorCode | None  # None: post it (the next seq); a code: refuse it so


class ScriptedPeer:
    def __init__(self, socket_dir: Path, scripts: list[list[Answer]]) -> None:
        socket_dir.mkdir(mode=0o755)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(socket_dir / "stream.sock"))
        self.listener.listen(8)
        self.listener.settimeout(10)
        self.scripts = scripts
        self.seq = 0
        self.posted: list[tuple[str, str]] = []  # (id, text) of every post made
        self.seen: list[list[str]] = []  # ids read, per connection
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for script in self.scripts:
            conn, _ = self.listener.accept()
            with conn:
                self._follow(conn, list(script))

    def _follow(self, conn: socket.socket, script: list[Answer]) -> None:
        decoder = FrameDecoder()
        ids: list[str] = []
        self.seen.append(ids)
        while script:
            data = conn.recv(65536)
            if not data:
                return
            decoder.receive_data(data)
            while script and (frame := decoder.next_event()) is not NEED_DATA:
                body = decode_json(frame.body)
                ids.append(body["id"])
                answer = script.pop(0)
                if answer is not None:
                    reply = encode_frame(
                        Op.ERROR, frame.request_id, encode_error(answer, f"scripted {answer.name}")
                    )
                elif (seq := self._seq_of(body["id"])) is not None:
                    reply = encode_frame(
                        Op.SAY_REPLY, frame.request_id, encode_json({"seq": seq, "duplicate": True})
                    )
                else:
                    self.seq += 1
                    self.posted.append((body["id"], body["text"]))
                    reply = encode_frame(Op.SAY_REPLY, frame.request_id, encode_json({"seq": self.seq}))
                conn.sendall(reply)

    def _seq_of(self, message_id: str) -> int | None:
        for seq, (posted_id, _) in enumerate(self.posted, 1):
            if posted_id == message_id:
                return seq
        return None

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


@pytest.fixture
def peer_dir(short_tmp: Path) -> Path:
    return short_tmp / "s"


def test_a_post_refused_as_unavailable_is_sent_again_on_a_new_connection(peer_dir: Path) -> None:
    """The first connection posts 1, refuses 2 as UNAVAILABLE and then
    closes; 2 and 3 are sent again on the second, in order."""
    peer = ScriptedPeer(peer_dir, [[None, ErrorCode.UNAVAILABLE], [None, None]])
    try:
        with Publisher[int](peer_dir, id_prefix="p") as publisher:
            acks = list(publisher.say_many("r", [(n, f"text {n}") for n in (1, 2, 3)]))
            assert publisher.reconnects == 1
    finally:
        peer.close()
    assert [(ack.tag, ack.seq) for ack in acks] == [(1, 1), (2, 2), (3, 3)]
    assert peer.posted == [("p:1", "text 1"), ("p:2", "text 2"), ("p:3", "text 3")]
    assert peer.seen[1][:2] == ["p:2", "p:3"]  # the refused one first, then the rest, in order


def test_a_final_refusal_is_reported_and_not_sent_again(peer_dir: Path) -> None:
    peer = ScriptedPeer(peer_dir, [[ErrorCode.LIMIT_EXCEEDED, None]])
    try:
        with Publisher[int](peer_dir, id_prefix="p") as publisher:
            acks = list(publisher.say_many("r", [(1, "refused"), (2, "posted")]))
            assert publisher.reconnects == 0
    finally:
        peer.close()
    assert isinstance(acks[0].error, ServerError)
    assert acks[0].error.code == ErrorCode.LIMIT_EXCEEDED
    assert acks[1].seq == 1
    assert peer.seen == [["p:1", "p:2"]]
