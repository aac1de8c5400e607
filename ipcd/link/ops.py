"""The ops of the master<->worker channel (internal: they may change)."""

from __future__ import annotations

import enum


class ChannelOp(enum.IntEnum):
    # master -> worker
    CONN = 0x20  # one accepted stream connection, as the record's fd; body: its raw SO_PEERCRED
    DRAIN = 0x21  # finish current connections, take no new ones, then exit
    STOP = 0x22  # close everything now and exit
    HEARTBEAT = 0x23
    STATUS_RESULT = 0x24  # request id = the worker's token
    BATCH = 0x27  # several fd-less messages gathered in one loop iteration (either way)
    ANSWER = 0x25  # an Answer record (+ the fds of a GET or TAKE reply)
    DELIVER = 0x26  # a Deliver record: client-ready frames to copy to a room or to connections
    REPLICA = 0x28  # a Replica record: a stored entry for the worker to serve GETs from (+ its fds)
    UNREPLICA = 0x29  # an Unreplica record: close the copies of a name, then say UNREPLICATED
    THROTTLE = 0x2A  # a Throttle record: give a uid no chat tokens for a while (ipcd.chat.postrate)
    # worker -> master
    READY = 0x30  # booted; may be sent connections
    LOAD = 0x31  # JSON counters: connections, received, ...
    HEARTBEAT_ACK = 0x32
    STATUS_QUERY = 0x33  # request id = token to answer with
    FORWARD = 0x34  # a Forward record (+ a PUT's fds)
    GONE = 0x35  # a Gone record: a connection that used the master's services closed
    UNREPLICATED = 0x36  # an Unreplica record sent back: the worker closed its copies of the name
