"""The master: owns the sockets, accepts, hands each connection to a worker.

Theory of operation: the data path is

    client --connect--> stream.sock --accept (master)--> fd
        --sendmsg SCM_RIGHTS over the worker's SEQPACKET channel--> worker
        --recvmsg--> Connection --frames--> service --reply--> client

The master closes its copy of the fd right after passing it, so a worker
crash takes only its own connections with it. The master accepts only while
some worker is READY (until then the kernel's backlog holds connections),
and it is deliberately small: signals (:mod:`signals`), the pool and its
reaping (:mod:`pool`), the status document (:mod:`status`) live elsewhere.
This module wires them to the loop and answers the channel.
"""

from __future__ import annotations

import logging
import os
import resource
import selectors
import signal
import socket
import time
from collections.abc import Mapping
from typing import Any

from ipcd import __version__, fdpass
from ipcd.chat.hub import Hub, Limits
from ipcd.handoff.persist import SystemdPersistence
from ipcd.handoff.replica import ReplicatedStore
from ipcd.handoff.store import StoreLimits
from ipcd.link.ops import ChannelOp
from ipcd.link.records import LinkError, Unreplica
from ipcd.protocol import (
    ErrorCode,
    Frame,
    Op,
    RemoteProtocolError,
    decode_json,
    encode_error,
    encode_frame,
    encode_json,
)
from ipcd.server.channel import ChannelClosed
from ipcd.server.flow import ChannelBudget
from ipcd.server.hublink import HubLink
from ipcd.server.loop import EventLoop
from ipcd.server.pool import WorkerHandle, WorkerPool, WorkerState
from ipcd.server.signals import SignalDispatcher
from ipcd.server.statefile import (
    FDSTORE_NAME,
    TICK,
    Copy,
    FdStoreCopy,
    HistoryJournal,
    StateError,
    StateFile,
)
from ipcd.server.status import build_status, uid_holdings
from ipcd.server.uidbudgets import ConnectionLedger, connection_limit
from ipcd.settings import Settings, SettingsError, reload_settings
from ipcd.socketdir import BoundSocket, DaemonLock, SocketDirError, bind_socket, prepare_socket_dir
from ipcd.systemd import Manager, take_passed_fds

log = logging.getLogger("ipcd.master")

_ACCEPT_BATCH = 64
_HEARTBEAT_INTERVAL = 2.0
_ACCEPT_PAUSE = 0.1
_STORE_TICK = 0.1  # resolution of fd-store TTLs and rendezvous timeouts
_CHANNEL_READS = 64  # socket reads per wake-up and worker channel (fairness)


def _chat_limits(settings: Settings) -> Limits:
    return Limits(
        history=settings.history_size,
        max_text=settings.max_message,
        rooms_per_connection=settings.rooms_per_connection,
        reply_budget=settings.reply_budget,
        rooms_per_uid=settings.rooms_per_uid,
        joins_per_uid=settings.joins_per_uid,
        history_bytes_per_uid=settings.history_bytes_per_uid,
        message_ids_per_uid=settings.message_ids_per_uid,
        message_id_window=settings.message_id_window,
        history_bytes=settings.history_bytes,
        privileged_factor=settings.privileged_budget_factor,
        rate_limit=settings.rate_limit,
    )


def _store_limits(settings: Settings) -> StoreLimits:
    return StoreLimits(
        quota=settings.fd_quota,
        max_entry_fds=settings.max_fds,
        waiters_per_uid=settings.waiters_per_uid,
        privileged_factor=settings.privileged_budget_factor,
        reply_budget=settings.reply_budget,
    )


def raise_fd_limit() -> None:
    """Every connection is an fd in some worker: lift the soft RLIMIT_NOFILE
    to the hard limit, as servers do (workers inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:  # a sandbox may forbid it
            log.warning(
                "cannot raise the fd limit from %d to %d (%s); serving with %d", soft, hard, exc, soft
            )
            return
        log.debug("fd limit raised from %d to %d", soft, hard)


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


class Master:
    def __init__(self, settings: Settings, overrides: Mapping[str, Any]) -> None:
        self.settings = settings
        self._overrides = dict(overrides)
        self.loop = EventLoop()
        self.lock = DaemonLock(settings.lock_path)
        self.stream: BoundSocket | None = None
        self.dgram: BoundSocket | None = None
        self.pool: WorkerPool | None = None
        self.signals: SignalDispatcher | None = None
        self.started = time.monotonic()
        self.started_wall = time.time()
        self._accepting = False
        self._accept_paused = False
        self._stopping = False
        self._stop_deadline = 0.0
        self.exit_code = 0
        self.error: str | None = None
        self.hub = Hub(_chat_limits(settings))
        self.store = ReplicatedStore(_store_limits(settings))
        self.store.may_replicate = self._may_replicate
        self.hublink = HubLink(
            self.hub, self.store, self.loop, self._sync_channel, ChannelBudget.from_settings(settings)
        )
        self.passed = take_passed_fds()  # before Manager() clears LISTEN_* from the environment
        self.manager = Manager()
        self._announced_generation = 0  # the worker generation READY=1 was sent for
        self._unread: set[WorkerHandle] = set()  # channels over budget: not read until they drain
        self.connections = ConnectionLedger(self._connection_limit(), settings.privileged_budget_factor)
        self.journal: HistoryJournal | None = None
        self._synced = 0.0  # when the journal was last fsynced (--sync-interval)

    def _connection_limit(self) -> int:
        return connection_limit(self.settings, resource.getrlimit(resource.RLIMIT_NOFILE)[0])

    # -- start -------------------------------------------------------------

    def bind(self) -> None:
        """Socket dir, lock and sockets; raises with a one-line reason."""
        raise_fd_limit()
        self.connections.budget.limit = self._connection_limit()  # the workers inherit the raised limit
        passed = self.passed
        if passed.stream is not None:
            # PassCredentials= in the socket unit applies to both sockets; on a
            # stream it would put ancillary data on every read (accepted sockets
            # inherit it) and for nothing: SO_PEERCRED identifies stream peers.
            passed.stream.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 0)
            self.stream = BoundSocket(passed.stream, self.settings.stream_path, owned=False)
        if passed.dgram is not None:
            self.dgram = BoundSocket(passed.dgram, self.settings.dgram_path, owned=False)
        history = self.passed.stored.pop(FDSTORE_NAME, None)  # the journal's, not the store's
        self._recover_store()
        try:
            if self.stream is None or self.dgram is None:
                # Sockets of our own: the socket dir must be safe, and ours alone.
                prepare_socket_dir(self.settings.socket_dir)
                self.lock.acquire()
            if self.stream is None:
                self.stream = bind_socket(
                    self.settings.stream_path,
                    socket.SOCK_STREAM,
                    self.settings.socket_mode,
                    self.settings.socket_group,
                )
            if self.dgram is None:
                self.dgram = bind_socket(
                    self.settings.dgram_path,
                    socket.SOCK_DGRAM,
                    self.settings.socket_mode,
                    self.settings.socket_group,
                )
            # Only once the sockets are ours: a daemon that cannot start
            # must not have read (or rewritten) the journal.
            self._open_journal(history)
        except (SocketDirError, StateError) as exc:
            self._close_sockets()
            raise StartupError(str(exc)) from None
        fdpass.enable_credentials(self.dgram.sock)

    def _open_journal(self, passed: int | None) -> None:
        """The chat history journal (``passed``: its memfd, from systemd's fd
        store): load the rooms it holds, keep it from here on."""
        fd_store = FdStoreCopy(self.manager, passed) if self.manager.active else None
        if passed is not None and fd_store is None:
            os.close(passed)
        copies: list[Copy] = []
        retired: list[Copy] = []
        if self.settings.state_dir is not None:
            # The file, under systemd too: it outlives a stop and a reboot,
            # and its pages are the kernel's to reclaim (a memfd's are RAM).
            try:
                copies.append(StateFile(self.settings.state_dir))
            except StateError:
                if fd_store is not None:
                    fd_store.close()
                raise
            if fd_store is not None:
                retired.append(fd_store)  # an earlier run's, without a state dir: read once
        elif fd_store is not None:
            copies.append(fd_store)  # --state-dir '': across restarts in systemd's fd store only
        if not copies:
            return
        self.journal = HistoryJournal(self.hub, copies)
        self.journal.start(retired)
        # Before any record is routed to a worker, what the hub noted is
        # written: no reply leaves before what it acknowledges.
        self.hublink.before_route = self.journal.flush

    def _journal_tick(self) -> None:
        assert self.journal is not None
        interval = self.settings.sync_interval
        now = time.monotonic()
        sync = bool(interval) and now - self._synced >= interval
        if sync:
            self._synced = now
        self.journal.tick(sync)
        self.loop.call_later(min(TICK, interval or TICK), self._journal_tick)

    def _recover_store(self) -> None:
        """Under systemd, push entries to its fd store and take back what an
        earlier run of ours left there."""
        if not self.manager.active:
            fdpass.close_fds(list(self.passed.stored.values()))
            return
        persist = SystemdPersistence(self.manager)
        self.store.restore(persist.recover(dict(self.passed.stored)))
        self.store.persist = persist
        self.passed.stored.clear()

    def status_line(self) -> str:
        assert self.pool is not None
        workers = self.pool.running()
        stats = self.store.stats()
        return (
            f"{len(workers)} workers, {sum(w.connections for w in workers)} connections, "
            f"{self.hub.stats()['rooms']} rooms, {stats['stored_fds']} stored fds"
        )

    def _announce_ready(self) -> None:
        """READY=1 once every worker of the current generation is up (at
        start, and to end a reload's RELOADING=1)."""
        assert self.pool is not None
        generation = self.pool.generation
        current = [w for w in self.pool.workers.values() if w.generation == generation]
        if self._announced_generation == generation or any(w.state is WorkerState.STARTING for w in current):
            return
        self._announced_generation = generation
        log.info("all %d workers of generation %d ready", len(current), generation)
        self.manager.ready(self.status_line())

    def _watchdog(self) -> None:
        """Ping systemd only while we are healthy: this loop runs (or we
        would not be here) and no worker has missed its heartbeats."""
        assert self.pool is not None
        interval = self.manager.watchdog_interval
        assert interval is not None
        now = time.monotonic()
        # An idle worker is heard from once per heartbeat round: under a short
        # WatchdogSec= three ping intervals are less than that, and a healthy
        # worker would look stale between two heartbeats.
        patience = max(3 * interval, 2.5 * _HEARTBEAT_INTERVAL)
        stale = [
            w for w in self.pool.workers.values() if w.channel_open and now - w.last_heartbeat > patience
        ]
        if stale:
            log.warning("not pinging the watchdog: %d workers are not answering", len(stale))
        else:
            self.manager.watchdog()
        self.loop.call_later(interval, self._watchdog)

    def _child_setup(self) -> None:
        """In a freshly forked worker: drop everything that is the master's."""
        if self.signals is not None:
            self.signals.close(forked=True)
        self.loop.close()  # closes our copy of the epoll fd; the parent's stays intact
        if self.stream is not None:
            self.stream.sock.close()  # workers never accept
        self.lock.release()
        if self.journal is not None:
            self.journal.detach()
        # Our copy of every stored fd: a worker holding them would keep a
        # removed or taken pipe or socket open behind its owner's back (the
        # copies a worker answers GETs from come as REPLICA records, and an
        # RM or TAKE is answered only once they are closed).
        self.store.close_all()

    def preserved_fds(self) -> list[int]:
        """The fds a daemonizer must keep open: sockets, lock, loop."""
        fds = [self.loop.fileno()]
        fds += [b.sock.fileno() for b in (self.stream, self.dgram) if b is not None]
        if self.lock.fd >= 0:
            fds.append(self.lock.fd)
        if self.journal is not None:
            fds += self.journal.fds()
        return fds

    def run(self) -> int:
        if self.stream is None:
            self.bind()
        assert self.stream is not None
        assert self.dgram is not None
        self.signals = SignalDispatcher(self.loop)
        self.signals.on(signal.SIGTERM, self._on_stop_signal)
        self.signals.on(signal.SIGINT, self._on_stop_signal)
        self.signals.on(signal.SIGHUP, lambda _sig: self.reload())
        self.signals.on(signal.SIGCHLD, lambda _sig: self._reap())
        self.pool = self.hublink.pool = WorkerPool(
            self.settings,
            self.dgram.sock,
            self._child_setup,
            on_channel=lambda h: self.loop.add_reader(h.channel, lambda mask: self._on_channel(h, mask)),
            remove_channel=self._remove_channel,
            on_gone=self._worker_gone,
        )
        self.pool.spawn_generation(self.settings.workers)
        self.loop.call_later(_HEARTBEAT_INTERVAL, self._heartbeat)
        self.loop.call_later(_STORE_TICK, self._store_tick)
        if self.journal is not None:
            self.loop.call_later(0, self._journal_tick)
        if self.manager.watchdog_interval:
            self.loop.call_later(self.manager.watchdog_interval, self._watchdog)
        log.info(
            "ipcd %s serving on %s with %d workers (master pid %d)",
            __version__,
            self.settings.socket_dir,
            self.settings.workers,
            os.getpid(),
        )
        try:
            while not (self._stopping and not self.pool.workers):
                wait = self.pool.spawn_due()
                if self._stopping:
                    remaining = self._stop_deadline - time.monotonic()
                    if remaining <= 0:
                        self.pool.kill_all()
                        remaining = 0.5
                    wait = remaining if wait is None else min(wait, remaining)
                self.loop.run_once(wait)
                self.hublink.flush_all()
                if self.pool.gave_up and not self._stopping:
                    self.error = self.pool.gave_up
                    self.exit_code = 3
                    self.stop()
                self._sync_accepting()
        finally:
            if self.journal is not None:
                self.journal.close()
            self._close_sockets()
            self.store.close_all()
            self.lock.release()
        log.info("ipcd stopped")
        return self.exit_code

    # -- accepting ---------------------------------------------------------

    def _sync_accepting(self) -> None:
        assert self.pool is not None
        assert self.stream is not None
        want = not self._stopping and not self._accept_paused and self.pool.can_take()
        if want != self._accepting:
            self._accepting = want
            if want:
                self.loop.add_reader(self.stream.sock, self._on_accept)
            else:
                self.loop.remove(self.stream.sock)

    def _on_accept(self, mask: int) -> None:
        assert self.pool is not None
        assert self.stream is not None
        pool = self.pool
        # accept() without the socket object socket.accept() would build
        # for each connection (the fd is passed on at once); close-on-exec
        # as socket.accept() makes it.
        accept = self.stream.sock._accept  # type: ignore[attr-defined]
        if not pool.can_take():
            self._backed_up()
            return
        for _ in range(_ACCEPT_BATCH):
            try:
                fd, _ = accept()
            except BlockingIOError:
                return
            except OSError as exc:
                self._accept_failed(exc)
                return
            admitted = self._admit(fd)
            if admitted is None:
                continue
            # Some channel was clear before this accept and only the last
            # pass can have changed that, so the pool's choice is a clear
            # one. The channel owns the fd from here on, closes it once sent.
            handle = pool.pass_connection(fd, creds=admitted[0])
            if handle is None:
                log.error("no worker runs to take a connection; closed it")
            else:
                self.connections.passed(handle.pid, admitted[1])
            if (handle is None or not pool.is_clear(handle)) and not pool.can_take():
                self._backed_up()
                return

    def _backed_up(self) -> None:
        """Every channel is backed up: leave the rest in the kernel's backlog
        (it pushes back on clients) rather than accept what no worker can
        take now; the loop resumes accepting once a channel drains (see
        _sync_accepting)."""
        self._sync_accepting()

    def _admit(self, fd: int) -> tuple[bytes, int] | None:
        """The peer's raw credentials and uid if the uid is under its
        connection budget; else tell it why (best effort: a fresh socket's
        buffer takes one small frame) and close ``fd``."""
        try:
            creds = fdpass.fd_peer_credentials(fd)
        except OSError:
            os.close(fd)
            return None
        uid = fdpass.credentials_uid(creds)
        refusal = self.connections.admit(uid)
        if refusal is None:
            return creds, uid
        try:
            os.write(fd, encode_frame(Op.ERROR, 0, encode_error(ErrorCode.OVER_BUDGET, refusal)))
        except OSError:
            pass
        os.close(fd)
        if self.connections.should_log(uid, time.monotonic()):
            log.warning("refusing connections: %s", refusal)
        return None

    def _accept_failed(self, exc: OSError) -> None:
        """Out of fds (EMFILE/ENFILE) or memory: the listener stays readable,
        so a level-triggered loop would spin. Pause accepting briefly; the
        kernel's backlog holds new clients meanwhile."""
        log.error("accept failed: %s; pausing accepts for %gs", exc.strerror, _ACCEPT_PAUSE)
        assert self.stream is not None
        self.loop.remove(self.stream.sock)
        self._accept_paused = True

        def resume() -> None:
            self._accept_paused = False
            self._sync_accepting()

        self.loop.call_later(_ACCEPT_PAUSE, resume)

    # -- channel -----------------------------------------------------------

    def _on_channel(self, handle: WorkerHandle, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self.hublink.flush(handle)  # which may bring the backlog back under budget
        if handle.channel_open:
            self._read_channel(handle)

    def _read_channel(self, handle: WorkerHandle) -> None:
        """Serve the worker's records: up to ``_CHANNEL_READS`` socket reads,
        and every message already unpacked from a batch (epoll would not
        wake us for those), but only while the hub link admits more: past
        the channel's budget the rest wait, in order, until it drained."""
        assert self.pool is not None
        channel = handle.channel
        reads = _CHANNEL_READS
        while handle.channel_open and (reads > 0 or channel.has_inbox):
            if not self.hublink.admits(handle):
                self._sync_channel(handle)  # no read interest until the backlog drains
                return
            if not channel.has_inbox:
                reads -= 1
            try:
                record = channel.recv()
            except BlockingIOError:
                return
            except (ChannelClosed, OSError):
                self.pool.channel_closed(handle)
                return
            except RemoteProtocolError as exc:
                log.error("bad record from worker %d: %s", handle.pid, exc.message)
                continue
            self._on_record(handle, record)

    def _sync_channel(self, handle: WorkerHandle) -> None:
        """Read interest unless the channel is over budget, write interest
        while records wait for room in it. Messages a paused read left
        unpacked would wake no epoll: they are served on the next turn."""
        if not handle.channel_open:
            return
        channel = handle.channel
        admitted = self.hublink.admits(handle)
        if not admitted:
            self._unread.add(handle)
        elif handle in self._unread:
            self._unread.discard(handle)
            if channel.has_inbox:
                self.loop.call_later(0, lambda: self._read_channel(handle) if handle.channel_open else None)
        events = selectors.EVENT_READ if admitted else 0
        if channel.has_backlog:
            events |= selectors.EVENT_WRITE
        self.loop.set_events(channel, events, lambda mask: self._on_channel(handle, mask))

    def _worker_gone(self, handle: WorkerHandle) -> None:
        self.connections.worker_gone(handle.pid)
        self.hublink.worker_gone(handle)
        self.hublink.route(self.store.forget_worker(handle.pid))  # answers that waited for it

    def _may_replicate(self, pid: int) -> bool:
        """Copies of entries only to a worker that takes its records: they
        are never owed (it forwards GETs it has no copy for)."""
        assert self.pool is not None
        handle = self.pool.workers.get(pid)
        return handle is not None and handle.channel_open and not handle.channel.has_backlog

    def _remove_channel(self, handle: WorkerHandle) -> None:
        self._unread.discard(handle)
        self.loop.remove(handle.channel)

    def _on_record(self, handle: WorkerHandle, record: Frame) -> None:
        assert self.pool is not None
        handle.last_heartbeat = time.monotonic()
        if record.op == ChannelOp.FORWARD:
            self.hublink.request(handle, record.body, record.fds)  # PUT's fds go to the store
            return
        fdpass.close_fds(record.fds)  # no other record carries fds: never keep stray ones
        if record.op == ChannelOp.READY:
            self.pool.mark_ready(handle)
            self._announce_ready()
        elif record.op == ChannelOp.LOAD:
            try:
                load = decode_json(record.body)
                closed = {int(u): int(n) for u, n in load.pop("closed_uids", {}).items()}
                partial = {int(u): int(n) for u, n in load.pop("partial", {}).items()}
                forwarding = {int(u): int(n) for u, n in load.pop("forwarding", {}).items()}
                handle.load = {k: int(v) for k, v in load.items()}
            except (RemoteProtocolError, TypeError, ValueError, AttributeError):
                log.error("malformed load report from worker %d", handle.pid)
                return
            self.connections.closed(handle.pid, closed)
            self.connections.partial_reported(handle.pid, partial)
            self.connections.forwarding_reported(handle.pid, forwarding)
        elif record.op == ChannelOp.GONE:
            self.hublink.connection_gone(handle, record.body)
        elif record.op == ChannelOp.UNREPLICATED:
            try:
                token = Unreplica.decode(record.body).token
            except LinkError as exc:
                log.error("malformed UNREPLICATED from worker %d: %s", handle.pid, exc)
                return
            self.hublink.route(self.store.unreplicated(handle.pid, token))
        elif record.op == ChannelOp.STATUS_QUERY:
            status = build_status(self.settings, self.pool, self.started, self.started_wall)
            status["chat"] = self.hub.stats()
            if self.journal is not None:
                status["chat"]["journal"] = self.journal.stats()
            status["store"] = self.store.stats()
            status["uids"] = uid_holdings(
                self.connections.holdings(), self.hub.holdings(), self.store.holdings()
            )
            status["limits"]["connections_per_uid"] = self.connections.budget.limit  # the one in force
            try:
                handle.channel.send(
                    ChannelOp.STATUS_RESULT, encode_json(status), request_id=record.request_id
                )
            except ChannelClosed as exc:
                log.warning("cannot answer worker %d's status query: %s", handle.pid, exc)

    def _store_tick(self) -> None:
        self.hublink.tick(time.monotonic())
        self.loop.call_later(_STORE_TICK, self._store_tick)

    def _heartbeat(self) -> None:
        assert self.pool is not None
        now = time.monotonic()
        timeout = self.settings.worker_timeout
        for handle in list(self.pool.workers.values()):
            if timeout and handle.channel_open and now - handle.last_heartbeat > timeout:
                self.pool.kill(handle, f"has not answered for {now - handle.last_heartbeat:.0f}s")
        self.pool.broadcast(ChannelOp.HEARTBEAT)
        if self.manager.active:
            self.manager.status(self.status_line())
        self.loop.call_later(_HEARTBEAT_INTERVAL, self._heartbeat)

    # -- signals -----------------------------------------------------------

    def _reap(self) -> None:
        assert self.pool is not None
        self.pool.reap(on_change=lambda: None)

    def _on_stop_signal(self, signum: signal.Signals) -> None:
        log.info("%s received; stopping", signum.name)
        self.stop()

    def stop(self) -> None:
        if self._stopping or self.pool is None:
            return
        self._stopping = True
        self.manager.stopping()
        self._stop_deadline = time.monotonic() + self.settings.stop_timeout
        self._sync_accepting()
        self.pool.stop_all()

    def reload(self) -> None:
        assert self.pool is not None
        if self._stopping:
            return
        try:
            fresh, kept = reload_settings(self.settings, self._overrides)
        except SettingsError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        if kept:
            log.warning("reload: %s only change on restart; kept as they were", ", ".join(kept))
        self.settings = fresh
        self.hub.limits = _chat_limits(fresh)
        self.store.limits = _store_limits(fresh)
        self.connections.budget.limit = self._connection_limit()
        self.connections.budget.privileged_factor = fresh.privileged_budget_factor
        self.hublink.budget = ChannelBudget.from_settings(fresh)
        logging.getLogger("ipcd").setLevel(fresh.log_level.upper())
        log.info("reloading: starting %d new workers, draining the old ones", fresh.workers)
        self.manager.reloading()
        self.pool.replace_all(fresh)

    def _close_sockets(self) -> None:
        for bound in (self.stream, self.dgram):
            if bound is not None:
                bound.unlink()
                bound.sock.close()
        self.stream = self.dgram = None
