"""Pure parts of pipelined sending: the acknowledgement window and the line
splitter of ``ipcctl send``."""

from __future__ import annotations

import pytest

from ipcd.cli.sendlines import Line, LineSplitter
from ipcd.posting import AckWindow
from ipcd.protocol import Frame, Op


def reply(request_id: int) -> Frame:
    return Frame(Op.SAY_REPLY, request_id, b"{}")


def test_acks_come_out_in_the_order_sent_whatever_order_replies_arrive() -> None:
    window: AckWindow[str] = AckWindow(3)
    for request_id, tag in ((7, "a"), (8, "b"), (9, "c")):
        window.sent(request_id, tag)
    assert window.full
    assert window.answered(8, reply(8))
    assert window.ready() == []  # b overtook a: it waits
    assert window.answered(7, reply(7))
    assert [tag for tag, _ in window.ready()] == ["a", "b"]
    assert not window.full
    assert len(window) == 1
    assert window.answered(9, reply(9))
    assert [(tag, frame.request_id) for tag, frame in window.ready()] == [("c", 9)]
    assert len(window) == 0


def test_unknown_and_repeated_replies_are_not_taken() -> None:
    window: AckWindow[str] = AckWindow(2)
    window.sent(1, "a")
    assert not window.answered(2, reply(2))  # not ours
    assert window.answered(1, reply(1))
    assert not window.answered(1, reply(1))  # answered twice
    with pytest.raises(ValueError, match="already in flight"):
        window.sent(1, "again")
    with pytest.raises(ValueError, match="at least one"):
        AckWindow(0)


def test_lines_are_split_as_they_come_numbered_as_in_the_input() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"one\ntw") == [Line(1, "one")]
    assert splitter.feed(b"o\n\n") == [Line(2, "two")]  # line 3 is empty: skipped, still counted
    assert splitter.feed(b"a very ") == []
    assert splitter.feed(b"long ") == []
    assert splitter.feed(b"line\r\nfour\xff\n") == [Line(4, "a very long line"), Line(5, "four\ufffd")]
    assert splitter.feed(b"no newline") == []
    assert splitter.finish() == [Line(6, "no newline")]
    assert splitter.finish() == []


def test_a_byte_at_a_time_gives_the_same_lines() -> None:
    data = "é\n\nx\r\ny".encode()
    splitter = LineSplitter()
    lines = [line for i in range(len(data)) for line in splitter.feed(data[i : i + 1])]
    assert lines + splitter.finish() == [Line(1, "é"), Line(3, "x"), Line(4, "y")]


def test_answers_stranded_behind_an_unanswered_request_can_still_be_told() -> None:
    window: AckWindow[str] = AckWindow(4)
    for request_id, tag in ((1, "a"), (2, "b"), (3, "c")):
        window.sent(request_id, tag)
    window.answered(3, reply(3))  # c answered (say, the error that closed the connection); a and b never
    assert window.ready() == []
    assert [tag for tag, _ in window.stranded()] == ["c"]


def test_renumbering_keeps_the_order_and_the_answers_and_hands_back_the_unanswered() -> None:
    """What resuming over a new connection does: a refusal already read for
    b is kept for its turn, a and c are sent again under new ids."""
    window: AckWindow[str] = AckWindow(4)
    for request_id, tag in ((1, "a"), (2, "b"), (3, "c")):
        window.sent(request_id, tag)
    window.answered(2, reply(2))
    ids = iter(range(100, 200))
    assert window.renumber(lambda: next(ids)) == [(100, "a"), (102, "c")]
    assert window.unanswered() == ["a", "c"]
    assert not window.answered(1, reply(1))  # the old ids are gone
    assert window.answered(100, reply(100))
    assert [(tag, frame.request_id) for tag, frame in window.ready()] == [("a", 100), ("b", 2)]
    assert window.answered(102, reply(102))
    assert [tag for tag, _ in window.ready()] == ["c"]
