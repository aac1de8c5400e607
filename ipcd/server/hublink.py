"""The master's side of chat: worker records in, hub records out.

Theory of operation: the hub is pure logic; this module feeds it what
workers forward and delivers what it returns, each record to its worker's
channel, in order. Channels are non-blocking: a worker whose queue is full
gets records queued in the master (write interest is watched until they
drain). A worker that falls hopelessly behind is killed, so its clients see
a disconnect, never a silent gap in a room's sequence.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ipcd.chat.hub import Hub, Out, Sender
from ipcd.server.channel import ChannelClosed, unpack_meta
from ipcd.server.loop import EventLoop
from ipcd.server.pool import WorkerHandle, WorkerPool

log = logging.getLogger("ipcd.master")

MAX_CHANNEL_BACKLOG = 64 << 20


class HubLink:
    def __init__(self, hub: Hub, loop: EventLoop, watch: Callable[[WorkerHandle, bool], None]) -> None:
        self.hub = hub
        self.loop = loop
        self.pool: WorkerPool | None = None
        self._watch = watch  # (handle, writable): set the channel's interest

    def request(self, handle: WorkerHandle, body: bytes) -> None:
        try:
            meta, payload = unpack_meta(body)
            sender = Sender(
                worker=handle.pid,
                conn=int(meta["conn"]),
                request_id=int(meta["rid"]),
                uid=int(meta["uid"]),
                gid=int(meta["gid"]),
                pid=int(meta["pid"]),
                dgram=meta.get("dgram"),
            )
            op = int(meta["op"])
        except (ValueError, KeyError, TypeError):
            log.error("malformed chat request from worker %d", handle.pid)
            return
        self.route(self.hub.handle(sender, op, payload))

    def connection_gone(self, handle: WorkerHandle, body: bytes) -> None:
        try:
            meta, _ = unpack_meta(body)
            conn = int(meta["conn"])
        except (ValueError, KeyError, TypeError):
            log.error("malformed CHAT_GONE from worker %d", handle.pid)
            return
        self.route(self.hub.connection_gone((handle.pid, conn)))

    def worker_gone(self, handle: WorkerHandle) -> None:
        self.route(self.hub.worker_gone(handle.pid))

    def route(self, outs: list[Out]) -> None:
        assert self.pool is not None
        for out in outs:
            handle = self.pool.workers.get(out.worker)
            if handle is None or not handle.channel_open:
                continue
            try:
                handle.channel.post(out.op, out.body)
            except ChannelClosed:
                self.pool.channel_closed(handle)
                continue
            if handle.channel.has_backlog:
                if handle.channel.backlog_bytes > MAX_CHANNEL_BACKLOG:
                    self.pool.kill(handle, f"fell {handle.channel.backlog_bytes} bytes behind on deliveries")
                    self.pool.channel_closed(handle)
                    continue
                self._watch(handle, True)

    def flush(self, handle: WorkerHandle) -> None:
        assert self.pool is not None
        try:
            handle.channel.flush_backlog()
        except ChannelClosed:
            self.pool.channel_closed(handle)
            return
        if not handle.channel.has_backlog:
            self._watch(handle, False)
