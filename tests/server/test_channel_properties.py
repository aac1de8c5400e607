"""Property: whatever mix of posted and sent messages, large and small, with
and without fds, and however little the peer reads at a time, the peer
receives exactly the messages sent, in order, each with its own fds, and
every fd is closed exactly once on the sending side."""

from __future__ import annotations

import os
import select
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipcd import fdpass
from ipcd.link.framing import FRAGMENT
from ipcd.link.ops import ChannelOp
from ipcd.server.channel import Channel


@dataclass(frozen=True)
class Step:
    how: str  # "post", "send", "flush" or "read"
    size: int = 0
    nfds: int = 0
    reads: int = 0


_STEPS = st.one_of(
    st.builds(
        Step,
        how=st.sampled_from(["post", "send"]),
        size=st.one_of(
            st.integers(0, 64), st.integers(FRAGMENT - 2, FRAGMENT + 2), st.integers(0, 3 * FRAGMENT)
        ),
        nfds=st.integers(0, 3),
    ),
    st.builds(Step, how=st.just("flush")),
    st.builds(Step, how=st.just("read"), reads=st.integers(1, 8)),
)


def _inode(fd: int) -> int:
    return os.fstat(fd).st_ino


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_STEPS, min_size=1, max_size=40))
def test_every_message_arrives_whole_in_order_with_its_fds(steps: list[Step]) -> None:
    """From the master's end, which batches messages with fds."""
    sender, receiver = Channel.pair()
    assert sender.batch_fds > 0
    _drive(sender, receiver, steps)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_STEPS, min_size=1, max_size=40))
def test_every_message_arrives_whole_in_order_from_the_worker_end(steps: list[Step]) -> None:
    """From the worker's end, which sends a message with fds at once."""
    receiver, sender = Channel.pair()
    assert sender.batch_fds == 0
    _drive(sender, receiver, steps)


def _drive(sender: Channel, receiver: Channel, steps: list[Step]) -> None:
    expected: list[tuple[int, bytes, list[int]]] = []  # (request id, body, pipe inodes)
    received: list[tuple[int, bytes, list[int]]] = []
    pipes: list[int] = []  # read ends we keep, to tell the write ends' inodes apart

    def read(limit: int) -> None:
        for _ in range(limit):
            try:
                frame = receiver.recv()
            except BlockingIOError:
                return
            received.append((frame.request_id, frame.body, [_inode(fd) for fd in frame.fds]))
            fdpass.close_fds(frame.fds)

    try:
        for index, step in enumerate(steps, start=1):
            if step.how == "read":
                read(step.reads)
                sender.flush_backlog()
                continue
            if step.how == "flush":
                sender.flush()
                continue
            body = bytes([index % 251]) * step.size
            fds = []
            for _ in range(step.nfds):
                r, w = os.pipe()
                pipes.append(r)
                fds.append(w)
            expected.append((index, body, [_inode(fd) for fd in fds]))
            if step.how == "post":
                sender.post(ChannelOp.DELIVER, body, request_id=index, fds=fds)
            else:
                sender.send(ChannelOp.ANSWER, body, request_id=index, fds=fds)
        sender.flush()
        while sender.has_backlog or len(received) < len(expected):
            select.select([receiver], [], [], 5)
            before = len(received)
            read(1000)
            sender.flush_backlog()
            assert len(received) > before or sender.has_backlog, "the peer stopped receiving"
        assert received == expected
        # The sender closed every write end it was given: each pipe sees EOF.
        ready = select.select(pipes, [], [], 0)[0]
        assert sorted(ready) == sorted(pipes)
        assert all(os.read(r, 1) == b"" for r in pipes)
    finally:
        sender.close()
        receiver.close()
        fdpass.close_fds(pipes)
