"""The event loop on its own: readiness masks, interest changes, removal,
timers, and the awkward cases (an fd closed without being removed and its
number reused; a callback that removes another ready fd)."""

from __future__ import annotations

import os
import selectors
import socket
from collections.abc import Iterator

import pytest

from ipcd.server.loop import EventLoop

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    running = EventLoop()
    yield running
    running.close()


def test_readable_then_writable_masks(loop: EventLoop) -> None:
    a, b = socket.socketpair()
    with a, b:
        seen: list[int] = []
        loop.add_reader(a, seen.append)
        loop.run_once(0)
        assert seen == []  # nothing to read yet
        b.send(b"x")
        loop.run_once(1)
        assert seen == [READ]
        loop.set_events(a, READ | WRITE, seen.append)
        loop.run_once(1)
        assert seen[-1] == READ | WRITE
        assert loop.events_of(a) == READ | WRITE
        loop.set_events(a, WRITE, seen.append)
        loop.run_once(1)
        assert seen[-1] == WRITE  # readable still, but only writing was asked for
        loop.set_events(a, 0, seen.append)
        assert loop.events_of(a) == 0
        before = len(seen)
        loop.run_once(0)
        assert len(seen) == before


def test_hang_up_reads_as_readable(loop: EventLoop) -> None:
    a, b = socket.socketpair()
    with a:
        seen: list[int] = []
        loop.add_reader(a, seen.append)
        b.close()
        loop.run_once(1)
        assert seen == [READ]  # the reader finds end-of-file by reading


def test_removed_in_the_same_pass_is_not_called(loop: EventLoop) -> None:
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        calls: list[str] = []
        (a1, b1), (a2, b2) = pairs

        def first(mask: int) -> None:
            calls.append("first")
            loop.remove(a2)

        def second(mask: int) -> None:
            calls.append("second")
            loop.remove(a1)

        loop.add_reader(a1, first)
        loop.add_reader(a2, second)
        b1.send(b"x")
        b2.send(b"x")
        loop.run_once(1)
        assert calls in (["first"], ["second"])  # whichever ran removed the other
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_an_fd_closed_without_remove_and_reused_can_be_watched_again(loop: EventLoop) -> None:
    a, b = socket.socketpair()
    number = a.fileno()
    loop.add_reader(a, lambda mask: None)
    a.close()  # the kernel drops it from the epoll set; the loop still lists it
    b.close()
    c, d = socket.socketpair()
    with c, d:
        reused = c if c.fileno() == number else d
        other = d if reused is c else c
        assert reused.fileno() == number, "the test needs the number reused"
        seen: list[int] = []
        loop.set_events(reused, READ | WRITE, seen.append)
        other.send(b"x")
        loop.run_once(1)
        assert seen
        assert seen[0] & READ


def test_remove_of_an_unknown_or_closed_fd_is_harmless(loop: EventLoop) -> None:
    r, w = os.pipe()
    loop.remove(r)
    os.close(r)
    os.close(w)
    loop.remove(r)
    closed = socket.socket()
    closed.close()
    loop.remove(closed)  # fileno() is -1 now


def test_timers_run_in_deadline_order_and_cancel(loop: EventLoop) -> None:
    fired: list[str] = []
    loop.call_later(0.02, lambda: fired.append("late"))
    loop.call_later(0.0, lambda: fired.append("first"))
    cancelled = loop.call_later(0.01, lambda: fired.append("cancelled"))
    cancelled.cancel()
    loop.run_once(0)
    assert fired == ["first"]
    while len(fired) < 2:
        loop.run_once(0.05)
    assert fired == ["first", "late"]
