"""The fd store: named open file descriptors, handed between processes.

Theory of operation
-------------------
The store lives in the master, so a worker crash loses no entry. A PUT's
fds travel client -> worker -> master as ``SCM_RIGHTS`` (each hop a kernel
duplicate; each sender closes its copy), and the master keeps one fd per
stored fd: its fd count is its baseline plus exactly what is stored. A GET
sends the stored fds back down the same way (the kernel duplicates them,
the entry stays); a TAKE sends them and the store forgets them.

Access is decided from the requester's kernel credentials only: the owner
(the putter's uid) and root may always get, take and remove; ``allow_uids``,
``allow_gids`` (matched against the requester's gid and supplementary
groups) and ``public`` widen get and take. Every stored fd is charged to its
owner's quota. A GET or TAKE may wait for a name that is not there yet (a
rendezvous): waiters are served in order when it is put, and time out with
TIMED_OUT. Expired entries (TTL) are closed. Like the chat hub, the store does
no socket I/O: it returns the records to send.

A parked waiter is master memory a client chose to spend, so each uid may
park at most ``waiters_per_uid`` (:class:`~ipcd.budgets.UidBudget`), charged
when it parks and released whichever way it leaves (served, refused, timed
out, its connection or worker gone). The name's queue goes with its last
waiter, and the table of queues is rebuilt once emptied, so what a flood of
waits parked is given back when they leave.

Every answer to a GET or TAKE (fds, refusal or time-out) is marked
``handout``: it frees the fd reservation the requester's worker made for
it (ipcd.server.flow). A GET whose dups the kernel refuses (the master is
out of fds) closes the ones already made and is answered UNAVAILABLE:
never a leak, never a traceback.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable
from typing import Any

from ipcd import fdpass
from ipcd.budgets import UidBudget
from ipcd.handoff.bodies import check_name, parse_get, parse_put
from ipcd.handoff.fdinfo import describe
from ipcd.handoff.persist import SystemdPersistence
from ipcd.link.ops import ChannelOp
from ipcd.link.records import HANDOUT_OPS, Answer, Out, Sender, ServiceError
from ipcd.protocol import (
    ErrorCode,
    Op,
    RemoteProtocolError,
    encode_error,
    encode_frame,
    encode_json,
    reply_op,
)
from ipcd.protocol.messages import decode_json

log = logging.getLogger("ipcd.master")

OUT_OF_FDS = "the daemon is out of file descriptors; retry"
# Parsed GET/TAKE bodies, by their bytes: a client asking for the same name
# again sends the same few bytes, and parsing them was the largest part of
# a GET's cost in the master. Bounded (emptied when full); handlers only read args.
_PARSED_MAX = 256
_PARSED_BODY_MAX = 512
Member = tuple[int, int]
Args = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class StoreLimits:
    quota: int = 64  # stored fds per owner uid
    max_entry_fds: int = 16
    max_wait: float = 3600.0  # longest rendezvous wait, seconds
    waiters_per_uid: int = 1024  # parked GETs/TAKEs with wait, per requester uid
    privileged_factor: int = 4  # root and the daemon's uid: this many times the per-uid budgets
    reply_budget: int = 1 << 20  # bytes of entries in one LS reply: a quarter of --max-outbuf


class StoreError(ServiceError):
    """Refused by the fd store."""


@dataclasses.dataclass(eq=False)
class Entry:
    name: str
    owner: int
    owner_gid: int
    fds: tuple[int, ...]
    fd_names: tuple[str, ...]
    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()
    public: bool = False
    created: float = dataclasses.field(default_factory=time.time)
    expires: float | None = None  # monotonic deadline
    # The JSON body of every GET or TAKE reply: what it describes is fixed
    # when the entry is made (a replace makes a new entry), so it is encoded once.
    handout_body: bytes = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.handout_body = encode_json(
            {"name": self.name, "count": len(self.fds), "names": list(self.fd_names), "owner": self.owner}
        )

    def allows(self, sender: Sender) -> bool:
        return may_use(
            self.owner, self.public, self.allow_uids, self.allow_gids, sender.uid, sender.gid, sender.groups
        )

    def listing(self, now: float) -> dict[str, Any]:
        return {
            "name": self.name,
            "owner": self.owner,
            "count": len(self.fds),
            # Described now, from the daemon's own copies: their current state, not the putter's word.
            "fds": [{"name": n, **describe(fd)} for n, fd in zip(self.fd_names, self.fds, strict=True)],
            "allow_uids": sorted(self.allow_uids),
            "allow_gids": sorted(self.allow_gids),
            "public": self.public,
            "created": self.created,
            "age": round(time.time() - self.created, 3),
            "ttl": None if self.expires is None else round(max(self.expires - now, 0.0), 3),
        }


@dataclasses.dataclass(eq=False, slots=True)
class Waiter:
    sender: Sender
    op: int
    deadline: float


def may_use(
    owner: int,
    public: bool,
    allow_uids: Collection[int],
    allow_gids: Collection[int],
    uid: int,
    gid: int,
    groups: Iterable[int],
) -> bool:
    """May this requester get or take an entry? The one access rule, also
    applied by a worker that answers a GET from its replica."""
    if uid in (0, owner) or public or uid in allow_uids:
        return True
    return any(g in allow_gids for g in (gid, *groups)) if allow_gids else False


class Store:
    def __init__(self, limits: StoreLimits | None = None) -> None:
        self.parked = UidBudget("parked waiters", 0, "--waiters-per-uid")  # per requester uid
        self.limits = limits or StoreLimits()
        self.entries: dict[str, Entry] = {}
        self.charged: Counter[int] = Counter()  # stored fds per owner uid
        self.waiters: dict[str, deque[Waiter]] = {}
        self._parked_by: Counter[Member] = Counter()  # waiters per connection: most closes have none
        self._next_deadline = math.inf  # no waiter is due before this (may be early, never late)
        self.persist: SystemdPersistence | None = None  # keeps entries across restarts under systemd
        self._parsed: dict[bytes, Args] = {}  # see _PARSED_MAX

    @property
    def limits(self) -> StoreLimits:
        return self._limits

    @limits.setter
    def limits(self, limits: StoreLimits) -> None:
        """New limits (a reload): the budget follows; what is parked stays parked."""
        self._limits = limits
        self.parked.limit = limits.waiters_per_uid
        self.parked.privileged_factor = limits.privileged_factor

    # -- entry points ------------------------------------------------------

    def handle(self, sender: Sender, op: int, body: bytes, fds: tuple[int, ...]) -> list[Out]:
        """One forwarded request. The store owns ``fds`` from here on: it
        keeps them or closes them, whatever the outcome."""
        out: list[Out] = []
        try:
            args = self._parse(op, body)
            if op == Op.PUT:
                taken, fds = fds, ()
                self._put(sender, args, taken, out)
            else:
                if fds:
                    raise StoreError(
                        ErrorCode.FDS_NOT_EXPECTED, f"only PUT carries fds; {len(fds)} were closed"
                    )
                _HANDLERS[op](self, sender, args, out)
        except (StoreError, RemoteProtocolError) as exc:  # the latter: a body field out of range
            out.append(self._error(sender, exc.code, exc.message, op))
        finally:
            fdpass.close_fds(fds)
        return out

    def _parse(self, op: int, body: bytes) -> Args:
        if op in HANDOUT_OPS:
            args = self._parsed.get(body)
            if args is not None:
                return args
        args = decode_json(body)
        if op in HANDOUT_OPS and len(body) <= _PARSED_BODY_MAX:
            if len(self._parsed) >= _PARSED_MAX:
                self._parsed.clear()
            self._parsed[body] = args
        return args

    def tick(self, now: float) -> list[Out]:
        """Expire entries past their TTL and waiters past their deadline."""
        for name in [n for n, e in self.entries.items() if e.expires is not None and e.expires <= now]:
            entry = self._remove(name)
            log.info("fd entry %r of uid %d expired (ttl); %d fds closed", name, entry.owner, len(entry.fds))
            fdpass.close_fds(entry.fds)
        out: list[Out] = []
        if now < self._next_deadline:
            return out  # no waiter is due: every one need not be looked at ten times a second
        emptied = False
        self._next_deadline = math.inf
        for name, queue in list(self.waiters.items()):
            for waiter in queue:
                if waiter.deadline > now:
                    self._next_deadline = min(self._next_deadline, waiter.deadline)
            for waiter in [w for w in queue if w.deadline <= now]:
                queue.remove(waiter)
                self._unpark(waiter)
                out.append(
                    self._error(
                        waiter.sender, ErrorCode.TIMED_OUT, f"{name!r} was not put in time", waiter.op
                    )
                )
            if not queue:
                del self.waiters[name]
                emptied = True
        if emptied:
            self.waiters = dict(self.waiters)  # a dict never shrinks its table: a copy is sized to fit
        return out

    def connection_gone(self, member: Member) -> None:
        if member in self._parked_by:  # else nothing to look for among every waiter
            self._drop_waiters(lambda sender: (sender.worker, sender.conn) == member)

    def worker_gone(self, worker: int) -> None:
        self._drop_waiters(lambda sender: sender.worker == worker)

    def _drop_waiters(self, gone: Callable[[Sender], bool]) -> None:
        """Forget the waiters of a connection or worker that is gone (a new
        table, sized to what is left)."""
        waiters: dict[str, deque[Waiter]] = {}
        for name, queue in self.waiters.items():
            kept: deque[Waiter] = deque()
            for waiter in queue:
                if gone(waiter.sender):
                    self._unpark(waiter)
                else:
                    kept.append(waiter)
            if kept:
                waiters[name] = kept
        self.waiters = waiters

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self.entries),
            "stored_fds": sum(len(e.fds) for e in self.entries.values()),
            "waiters": sum(self.parked.held.values()),
        }

    def holdings(self) -> dict[int, dict[str, int]]:
        """Per uid, what it holds here: stored fds (as owner) and parked waiters."""
        held: dict[int, dict[str, int]] = {}
        for uid, count in self.charged.items():
            held.setdefault(uid, {})["stored_fds"] = count
        for uid, count in self.parked.held.items():
            held.setdefault(uid, {})["waiters"] = count
        return held

    def close_all(self) -> None:
        for entry in self.entries.values():
            fdpass.close_fds(entry.fds)
        self.entries.clear()
        self.charged.clear()
        self.waiters = {}
        self.parked.clear()
        self._parked_by.clear()

    def _park(self, name: str, waiter: Waiter) -> None:
        self.waiters.setdefault(name, deque()).append(waiter)
        self._next_deadline = min(self._next_deadline, waiter.deadline)
        self.parked.charge(waiter.sender.uid)
        self._parked_by[(waiter.sender.worker, waiter.sender.conn)] += 1

    def _unpark(self, waiter: Waiter) -> None:
        """A waiter left its queue (the caller removed it): its shares back."""
        self.parked.release(waiter.sender.uid)
        member = (waiter.sender.worker, waiter.sender.conn)
        self._parked_by[member] -= 1
        if self._parked_by[member] <= 0:
            del self._parked_by[member]

    # -- helpers -----------------------------------------------------------

    @staticmethod
    def _answer(sender: Sender, op: int, frame: bytes) -> bytes:
        return Answer.to(sender, frame, handout=op in HANDOUT_OPS).encode()

    @classmethod
    def _reply(cls, sender: Sender, op: int, result: dict[str, Any], fds: tuple[int, ...] = ()) -> Out:
        return cls._encoded_reply(sender, op, encode_json(result), fds)

    @classmethod
    def _encoded_reply(cls, sender: Sender, op: int, body: bytes, fds: tuple[int, ...] = ()) -> Out:
        frame = encode_frame(reply_op(op), sender.request_id, body, nfds=len(fds))
        return Out(sender.worker, ChannelOp.ANSWER, cls._answer(sender, op, frame), fds)

    @classmethod
    def _error(cls, sender: Sender, code: ErrorCode, message: str, op: int = 0) -> Out:
        frame = encode_frame(Op.ERROR, sender.request_id, encode_error(code, message))
        return Out(sender.worker, ChannelOp.ANSWER, cls._answer(sender, op, frame))

    def _remove(self, name: str) -> Entry:
        entry = self.entries.pop(name)
        self.charged[entry.owner] -= len(entry.fds)
        if self.charged[entry.owner] <= 0:
            del self.charged[entry.owner]
        if self.persist is not None:
            self.persist.removed(entry, list(self.entries.values()))
        self._removed(entry)
        return entry

    def _removed(self, entry: Entry) -> None:
        """An entry left the store (a replicating store hooks in here:
        ipcd.handoff.replica)."""

    def restore(self, items: list[dict[str, Any]]) -> None:
        """Entries recovered after a restart (see ipcd.handoff.persist)."""
        now = time.time()
        for item in items:
            expires_at = item.get("expires_at")
            entry = Entry(
                name=item["name"],
                owner=int(item["owner"]),
                owner_gid=int(item["owner_gid"]),
                fds=tuple(item["fds"]),
                fd_names=tuple(item["fd_names"]),
                allow_uids=frozenset(item["allow_uids"]),
                allow_gids=frozenset(item["allow_gids"]),
                public=bool(item["public"]),
                created=float(item["created"]),
                expires=None if expires_at is None else time.monotonic() + (expires_at - now),
            )
            self.entries[entry.name] = entry
            self.charged[entry.owner] += len(entry.fds)
        if items:
            log.info("recovered %d fd entries from systemd's fd store", len(items))

    def _hand_out(self, sender: Sender, op: int, entry: Entry) -> Out:
        if op == Op.TAKE:
            self._remove(entry.name)
            return self._encoded_reply(sender, op, entry.handout_body, entry.fds)
        return self._encoded_reply(sender, op, entry.handout_body, _copies(entry.fds))

    # -- operations --------------------------------------------------------

    def _put(self, sender: Sender, args: dict[str, Any], fds: tuple[int, ...], out: list[Out]) -> None:
        try:
            if not fds:
                raise StoreError(ErrorCode.BAD_REQUEST, "PUT carries no fds: attach at least one")
            if len(fds) > self.limits.max_entry_fds:
                raise StoreError(
                    ErrorCode.LIMIT_EXCEEDED,
                    f"{len(fds)} fds in one entry; at most {self.limits.max_entry_fds}",
                )
            request = parse_put(args, len(fds))  # every field checked before the store is looked at
            name = request.name
            old = self.entries.get(name)
            if old is not None:
                if sender.uid not in (old.owner, 0):
                    raise StoreError(ErrorCode.PERMISSION_DENIED, f"{name!r} belongs to uid {old.owner}")
                if not request.replace:
                    raise StoreError(
                        ErrorCode.EXISTS, f"{name!r} is already stored; use --replace to replace it"
                    )
            freed = len(old.fds) if old is not None and old.owner == sender.uid else 0
            if self.charged[sender.uid] - freed + len(fds) > self.limits.quota:
                raise StoreError(
                    ErrorCode.LIMIT_EXCEEDED,
                    f"uid {sender.uid} would hold {self.charged[sender.uid] - freed + len(fds)} stored fds; "
                    f"the quota is {self.limits.quota}: take or remove some first",
                )
            entry = Entry(
                name=name,
                owner=sender.uid,
                owner_gid=sender.gid,
                fds=fds,
                fd_names=request.fd_names,
                allow_uids=request.allow_uids,
                allow_gids=request.allow_gids,
                public=request.public,
                expires=None if request.ttl is None else time.monotonic() + request.ttl,
            )
        except (StoreError, RemoteProtocolError):
            fdpass.close_fds(fds)
            raise
        if old is not None:
            fdpass.close_fds(self._remove(name).fds)
        self.entries[name] = entry
        self.charged[sender.uid] += len(fds)
        if self.persist is not None:
            self.persist.added(entry, list(self.entries.values()))
        out.append(
            self._reply(sender, Op.PUT, {"name": name, "count": len(fds), "replaced": old is not None})
        )
        self._serve_waiters(entry, out)

    def _serve_waiters(self, entry: Entry, out: list[Out]) -> None:
        queue = self.waiters.get(entry.name)
        while queue:
            waiter = queue.popleft()
            self._unpark(waiter)
            if not entry.allows(waiter.sender):
                out.append(
                    self._error(
                        waiter.sender, ErrorCode.PERMISSION_DENIED, _denied(entry, waiter.sender), waiter.op
                    )
                )
                continue
            try:
                out.append(self._hand_out(waiter.sender, waiter.op, entry))
            except StoreError as exc:  # out of fds: this waiter is told, the next may fare better
                out.append(self._error(waiter.sender, exc.code, exc.message, waiter.op))
                continue
            if waiter.op == Op.TAKE:
                break  # it is gone; the rest keep waiting for the next put
        if queue is not None and not queue:
            del self.waiters[entry.name]

    def _get(self, sender: Sender, args: dict[str, Any], out: list[Out], op: int = Op.GET) -> None:
        request = parse_get(args, self.limits.max_wait)  # wait checked even if the name is stored
        name, wait = request.name, request.wait
        entry = self.entries.get(name)
        if entry is None:
            if not wait:
                raise StoreError(ErrorCode.NOT_FOUND, f"nothing is stored as {name!r}; see 'ipcctl ls'")
            if not self.parked.admits(sender.uid):
                raise StoreError(
                    ErrorCode.LIMIT_EXCEEDED,
                    self.parked.refusal(
                        sender.uid,
                        f"{name!r} is not stored yet; wait for fewer names at once, or retry later",
                    ),
                )
            self._park(name, Waiter(sender, op, time.monotonic() + wait))
            return
        if not entry.allows(sender):
            raise StoreError(ErrorCode.PERMISSION_DENIED, _denied(entry, sender))
        out.append(self._hand_out(sender, op, entry))

    def _take(self, sender: Sender, args: dict[str, Any], out: list[Out]) -> None:
        self._get(sender, args, out, Op.TAKE)

    def _ls(self, sender: Sender, args: dict[str, Any], out: list[Out]) -> None:
        """The entries the sender may get, by name, paged like HISTORY: as
        many as fit the reply budget (at least one), then ``more`` and the
        ``after`` to ask with next. Every user's public entries can be
        listed, so one reply of them all could pass the asker's output
        buffer; and each fd is described (fstat, getsockopt) only for the
        page it is on."""
        after = args.get("after")
        if after is not None:
            after = check_name(after)
        now = time.monotonic()
        visible = sorted(
            (e for e in self.entries.values() if (after is None or e.name > after) and e.allows(sender)),
            key=lambda e: e.name,
        )
        page: list[dict[str, Any]] = []
        size = 0
        for entry in visible:
            listed = entry.listing(now)
            size += len(encode_json(listed)) + 1
            if page and size > self.limits.reply_budget:
                break
            page.append(listed)
        quota = {"used": self.charged[sender.uid], "quota": self.limits.quota}
        reply: dict[str, Any] = {"entries": page, "quota": quota, "more": len(page) < len(visible)}
        if reply["more"]:
            reply["after"] = page[-1]["name"]
        out.append(self._reply(sender, Op.LS, reply))

    def _rm(self, sender: Sender, args: dict[str, Any], out: list[Out]) -> None:
        name = check_name(args.get("name"))
        entry = self.entries.get(name)
        if entry is None:
            raise StoreError(ErrorCode.NOT_FOUND, f"nothing is stored as {name!r}")
        if sender.uid not in (0, entry.owner):
            raise StoreError(
                ErrorCode.PERMISSION_DENIED,
                f"{name!r} belongs to uid {entry.owner}; only it or root may remove it",
            )
        fdpass.close_fds(self._remove(name).fds)
        out.append(self._reply(sender, Op.RM, {"name": name, "count": len(entry.fds)}))


def duplicates(fds: tuple[int, ...]) -> tuple[int, ...] | None:
    """A copy of each of ``fds`` (close-on-exec), all or none: None when the
    process is out of fds, with the copies made closed again."""
    copies: list[int] = []
    try:
        for fd in fds:
            copies.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3))
    except OSError as exc:
        fdpass.close_fds(copies)
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        return None
    return tuple(copies)


def _copies(fds: tuple[int, ...]) -> tuple[int, ...]:
    """Duplicates of ``fds`` for one GET: the channel closes what it is
    given once sent, the entry keeps its own. Out of fds: UNAVAILABLE."""
    copies = duplicates(fds)
    if copies is None:
        log.warning("a GET could not be served: out of fds (%d fds to duplicate)", len(fds))
        raise StoreError(ErrorCode.UNAVAILABLE, OUT_OF_FDS)
    return copies


def _denied(entry: Entry, sender: Sender) -> str:
    return (
        f"uid {sender.uid} may not use {entry.name!r} (owner uid {entry.owner}); "
        "the owner can allow it with --allow-uid, --allow-gid or --public"
    )


_HANDLERS: dict[int, Callable[[Store, Sender, Args, list[Out]], None]] = {
    Op.GET: Store._get,
    Op.TAKE: Store._take,
    Op.LS: Store._ls,
    Op.RM: Store._rm,
}
