"""Answers with fds posted in one loop pass travel as one channel record
(pipelined GETs cost one record each way), up to the master end's cap; the
fds of a batch never sent are closed when the channel is."""

from __future__ import annotations

import os
import socket

from ipcd import fdpass
from ipcd.link.ops import ChannelOp
from ipcd.server.channel import MASTER_BATCH_FDS, Channel


def _records(sock: socket.socket) -> list[tuple[int, int]]:
    """(bytes, fds) of every record queued on ``sock``; their fds closed."""
    got: list[tuple[int, int]] = []
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 17, 64, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return got
        got.append((len(data), len(fds)))
        fdpass.close_fds(fds)


def _pipes(count: int) -> tuple[list[int], list[int]]:
    pairs = [os.pipe() for _ in range(count)]
    return [r for r, _ in pairs], [w for _, w in pairs]


def test_answers_with_fds_posted_together_go_as_one_record() -> None:
    master_end, worker_end = Channel.pair()
    readers, writers = _pipes(4)
    try:
        for index, fd in enumerate(writers):
            master_end.post(ChannelOp.ANSWER, b"answer", request_id=index + 1, fds=(fd,))
        assert _records(worker_end.sock) == [], "sent before the loop pass ended"
        master_end.flush()
        ((_, nfds),) = _records(worker_end.sock)
        assert nfds == 4
    finally:
        master_end.close()
        worker_end.close()
        fdpass.close_fds(readers)


def test_a_batch_goes_once_it_holds_the_cap_of_fds() -> None:
    master_end, worker_end = Channel.pair()
    readers, writers = _pipes(MASTER_BATCH_FDS + 1)
    try:
        for index, fd in enumerate(writers):
            master_end.post(ChannelOp.ANSWER, b"answer", request_id=index + 1, fds=(fd,))
        assert [nfds for _, nfds in _records(worker_end.sock)] == [MASTER_BATCH_FDS]
        master_end.flush()
        assert [nfds for _, nfds in _records(worker_end.sock)] == [1]
    finally:
        master_end.close()
        worker_end.close()
        fdpass.close_fds(readers)


def test_the_worker_end_sends_a_message_with_fds_at_once() -> None:
    master_end, worker_end = Channel.pair()
    readers, writers = _pipes(2)
    try:
        for index, fd in enumerate(writers):
            worker_end.post(ChannelOp.FORWARD, b"put", request_id=index + 1, fds=(fd,))
        assert [nfds for _, nfds in _records(master_end.sock)] == [1, 1]
    finally:
        master_end.close()
        worker_end.close()
        fdpass.close_fds(readers)


def test_closing_a_channel_closes_the_fds_of_its_unsent_batch() -> None:
    master_end, worker_end = Channel.pair()
    readers, writers = _pipes(3)
    try:
        for index, fd in enumerate(writers):
            master_end.post(ChannelOp.ANSWER, b"answer", request_id=index + 1, fds=(fd,))
        master_end.close()
        # Every write end is closed: each pipe's reader sees EOF.
        assert [os.read(r, 1) for r in readers] == [b""] * 3
    finally:
        worker_end.close()
        fdpass.close_fds(readers)
