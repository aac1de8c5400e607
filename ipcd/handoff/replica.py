"""GETs answered by the worker: workers keep copies of the entries they GET.

Theory of operation
-------------------
A GET through the master wakes three processes (client -> worker -> master
-> worker -> client); a GET a worker answers itself wakes one, as the raw
fd holder does. So when the master's store (:class:`ReplicatedStore`)
answers a GET of an entry, it also sends the requester's worker a
:class:`~ipcd.link.records.Replica` of it, with one copy of its fds, and the
worker (:class:`WorkerReplica`) answers the next GETs of it itself: same
access rule (:func:`~ipcd.handoff.store.may_use`), same reply body, one
``dup`` per GET, the connection's fd budget as before. Copies go only where
GETs are made: an entry that is only put and taken costs what it did.

The master stays the only authority. A worker that has no copy of a name
(none asked for yet, or skipped: its channel was backed up, or the ``dup``
for it failed) forwards the GET and the master answers, so a missing copy
is never wrong. A stale copy would be: once an RM, TAKE or replace is
answered, no worker may hand out the old fds. So every removal sends an
:class:`~ipcd.link.records.Unreplica` to each worker holding a copy, and
the answer to the request that removed it is held back (a *fence*) until
each of those workers has closed its copy and said so, or has gone.
Expiries (TTL) send the same record, with no answer to hold. A connection
with a request of its own still in the master forwards its GETs too, so
one connection's requests keep their order (PUT then GET, RM then GET).

Ownership: a Replica's fds are the worker's copies, closed when the name is
unreplicated or replaced (or the worker exits); the master's dups for them
belong to the channel record that carries them. The master's record of what
each worker holds (``replicas``) decides whom a removal waits for.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import deque
from collections.abc import Callable

from ipcd import fdpass
from ipcd.handoff.bodies import parse_get
from ipcd.handoff.store import Entry, Store, StoreLimits, duplicates, may_use
from ipcd.link.ops import ChannelOp
from ipcd.link.records import Answer, Out, Replica, Sender, Unreplica
from ipcd.protocol import Op, RemoteProtocolError
from ipcd.protocol.messages import decode_json

log = logging.getLogger("ipcd.master")

_PARSED_MAX = 256  # GET bodies remembered by a worker (emptied when full)
_PARSED_BODY_MAX = 512
_GET = int(Op.GET)


@dataclasses.dataclass
class _Fence:
    """Answers to one connection's request, held until these workers have
    closed their copies (none: held only behind an earlier fence of the
    same connection, so its answers keep their order)."""

    workers: set[int]
    outs: list[Out]
    member: tuple[int, int]  # (worker, connection) that asked


class ReplicatedStore(Store):
    """The master's store, telling workers what to serve GETs from."""

    def __init__(self, limits: StoreLimits | None = None) -> None:
        super().__init__(limits)
        self.replicas: dict[int, set[str]] = {}  # worker -> names it holds a copy of
        # Whether a worker may be sent a copy now (the master says no while its
        # channel is backed up: copies are an optimisation, never owed).
        self.may_replicate: Callable[[int], bool] = lambda worker: True
        self._fences: dict[int, _Fence] = {}  # token -> held answers
        self._lines: dict[tuple[int, int], deque[_Fence]] = {}  # connection -> its held answers, in order
        self._tokens = itertools.count(1)
        self._wanted: list[tuple[int, Entry]] = []  # during one call: entries workers got
        self._dropped: dict[int, list[str]] = {}  # during one call: worker -> names to unreplicate

    # -- the store's hooks ----------------------------------------------------

    def _hand_out(self, sender: Sender, op: int, entry: Entry) -> Out:
        out = super()._hand_out(sender, op, entry)
        if op == _GET and entry.name not in self.replicas.get(sender.worker, ()):
            self._wanted.append((sender.worker, entry))
        return out

    def _removed(self, entry: Entry) -> None:
        for worker, names in self.replicas.items():
            if entry.name in names:
                names.discard(entry.name)
                self._dropped.setdefault(worker, []).append(entry.name)

    # -- entry points ---------------------------------------------------------

    def handle(self, sender: Sender, op: int, body: bytes, fds: tuple[int, ...]) -> list[Out]:
        outs = super().handle(sender, op, body, fds)
        if not self._dropped and not self._wanted:  # most calls: no copy made or dropped
            return self._in_line(outs) if self._lines else outs
        fenced = set(self._dropped)
        token = next(self._tokens) if fenced else 0
        changes = self._changes(token)
        if not fenced:
            return changes + self._in_line(outs)
        member = (sender.worker, sender.conn)
        fence = self._fences[token] = _Fence(fenced, outs, member)
        self._lines.setdefault(member, deque()).append(fence)
        return changes

    def tick(self, now: float) -> list[Out]:
        outs = super().tick(now)
        if not self._dropped and not self._lines:
            return outs
        return self._changes(0) + self._in_line(outs)  # an expiry answers nobody: nothing to hold

    def unreplicated(self, worker: int, token: int) -> list[Out]:
        """The worker closed its copies: the answers this lets go, in order."""
        fence = self._fences.get(token)
        if fence is None:
            return []
        fence.workers.discard(worker)
        if fence.workers:
            return []
        del self._fences[token]
        return self._release(fence.member)

    def forget_worker(self, worker: int) -> list[Out]:
        """A worker is gone (its copies with it): the answers only it held."""
        self.replicas.pop(worker, None)
        members = []
        for token, fence in list(self._fences.items()):
            fence.workers.discard(worker)
            if not fence.workers:
                del self._fences[token]
                members.append(fence.member)
        return [out for member in members for out in self._release(member)]

    def close_all(self) -> None:
        for line in self._lines.values():
            for fence in line:
                for out in fence.outs:
                    fdpass.close_fds(out.fds)
        self._lines.clear()
        self._fences.clear()
        super().close_all()

    def _in_line(self, outs: list[Out]) -> list[Out]:
        """``outs`` to send now; answers to a connection with answers held
        wait behind those."""
        if not self._lines:
            return outs
        now = []
        for out in outs:
            if out.op == ChannelOp.ANSWER:
                member = (out.worker, Answer.decode(out.body).conn)
                line = self._lines.get(member)
                if line:
                    line.append(_Fence(set(), [out], member))
                    continue
            now.append(out)
        return now

    def _release(self, member: tuple[int, int]) -> list[Out]:
        """The connection's held answers up to the first still fenced."""
        line = self._lines.get(member)
        released: list[Out] = []
        while line and not line[0].workers:
            released += line.popleft().outs
        if not line:
            self._lines.pop(member, None)
        return released

    # -- helpers --------------------------------------------------------------

    def _changes(self, token: int) -> list[Out]:
        """The records of this call's removals (first), then copies for the
        workers that got an entry through the master (still stored, once)."""
        dropped, self._dropped = self._dropped, {}
        wanted, self._wanted = self._wanted, []
        outs = [
            Out(worker, ChannelOp.UNREPLICA, Unreplica(token, name).encode())
            for worker, names in dropped.items()
            for name in names
        ]
        for worker, entry in wanted:
            if self.entries.get(entry.name) is entry and entry.name not in self.replicas.get(worker, ()):
                out = self._copy(worker, entry)
                if out is not None:
                    outs.append(out)
        return outs

    def _copy(self, worker: int, entry: Entry) -> Out | None:
        if not self.may_replicate(worker):
            return None
        copies = duplicates(entry.fds)
        if copies is None:
            return None  # that worker forwards its GETs of this entry instead
        self.replicas.setdefault(worker, set()).add(entry.name)
        record = Replica(
            entry.name,
            entry.owner,
            entry.public,
            tuple(entry.allow_uids),
            tuple(entry.allow_gids),
            entry.handout_body,
        )
        return Out(worker, ChannelOp.REPLICA, record.encode(), copies)


class WorkerReplica:
    """A worker's copies of the stored entries (it owns their fds)."""

    __slots__ = ("_parsed", "entries")

    def __init__(self) -> None:
        self.entries: dict[str, tuple[Replica, tuple[int, ...]]] = {}
        self._parsed: dict[bytes, str | None] = {}  # GET body -> the name it asks for

    def install(self, record: Replica, fds: tuple[int, ...]) -> None:
        old = self.entries.get(record.name)
        self.entries[record.name] = (record, fds)
        if old is not None:
            fdpass.close_fds(old[1])

    def drop(self, name: str) -> None:
        old = self.entries.pop(name, None)
        if old is not None:
            fdpass.close_fds(old[1])

    def close_all(self) -> None:
        for _, fds in self.entries.values():
            fdpass.close_fds(fds)
        self.entries.clear()

    def lookup(self, body: bytes) -> tuple[Replica, tuple[int, ...]] | None:
        """The copy a GET body asks for, if this worker has one."""
        name = self._parsed.get(body, "")
        if name == "":
            name = _name_of(body)
            if len(body) <= _PARSED_BODY_MAX:
                if len(self._parsed) >= _PARSED_MAX:
                    self._parsed.clear()
                self._parsed[body] = name
        return self.entries.get(name) if name is not None else None

    @staticmethod
    def allows(record: Replica, uid: int, gid: int, groups: Callable[[], tuple[int, ...]]) -> bool:
        return may_use(
            record.owner,
            record.public,
            record.allow_uids,
            record.allow_gids,
            uid,
            gid,
            groups() if record.allow_gids else (),
        )


def _name_of(body: bytes) -> str | None:
    """The name of a well-formed GET body (the store's rules, every field);
    None for anything else, which the master then answers with its own error."""
    try:
        return parse_get(decode_json(body), 0.0).name
    except RemoteProtocolError:
        return None
