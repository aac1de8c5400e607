"""Where the history journal lives: a state file, and systemd's fd store.

Theory of operation
-------------------
The hub notes what changed (:attr:`ipcd.chat.hub.Hub.changes`); the master
hands it to :meth:`HistoryJournal.flush` before it routes any record to a
worker (:class:`~ipcd.server.hublink.HubLink` calls it first thing), so a
reply to a SAY never leaves the master before the message is in the
kernel's hands: one ``write`` per pass (or per mid-pass route), appended
to the journal. The kernel keeps what was written when the master is killed
(``kill -9``, OOM): only a power loss or kernel crash can take what was not
yet on disk. fsync runs at stop, at compaction and every ``--sync-interval``
seconds if set; by default the kernel's writeback does it (within about
30 s), since an fsync a second writes every message to disk and, under
load, costs the master a third more CPU per delivery (docs/architecture.md).

Where: ``history.journal`` in the state dir (``--state-dir``, made 0700,
refused if others could change it or the way to it, like the socket dir),
opened ``O_APPEND``; under systemd that is the unit's ``StateDirectory=``.
With ``--state-dir ''`` under systemd, a memfd pushed to its fd store as
``history`` instead: it survives ``systemctl restart`` and a crash of the
master (systemd holds it), not a stop. Not both: the file outlives more,
and a memfd's pages are unswappable RAM (up to twice the retained bytes)
where the file's are page cache the kernel can reclaim; a second copy would
also double the write per pass. A memfd an earlier run left is still read
at start (the newer copy wins: the higher header generation, then the more
bytes of valid records) and then dropped. A torn or corrupt tail is dropped
(one line in the log saying how many bytes) and never read past.

Compaction: the journal holds every message ever appended, the hub only
the retained ones, so once the journal is more than twice the retained
bytes (and over :data:`COMPACT_MIN`), and at every start, the hub's state is
written as a snapshot with the next generation: to ``history.journal.new``,
fsynced, renamed over the journal, the dir fsynced; for the memfd a new one
replaces the old in the fd store. A crash at any point leaves either the old
journal or the new one, whole. Write errors (a full disk) are logged once;
the copy is then rewritten whole at the next tick, so what it holds stays
a prefix of what happened, never a sequence with a hole.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Final, Protocol

from ipcd.chat.hub import Hub
from ipcd.chat.journal import Reader, RoomImage, encode_changes, fold, snapshot
from ipcd.safepath import UnsafePath, check_path, describe_uid
from ipcd.systemd import Manager

log = logging.getLogger("ipcd.master")

JOURNAL_FILE: Final = "history.journal"
FDSTORE_NAME: Final = "history"
TICK: Final = 1.0  # seconds between checks for compaction and repair
COMPACT_MIN: Final = 64 << 20  # a journal smaller than this is never compacted but at start
_DIR_MODE: Final = 0o700


class StateError(Exception):
    """The state dir cannot be used; the message says why and what to do."""


class Copy(Protocol):
    """One place the journal is kept."""

    name: str

    def load(self) -> mmap.mmap | None:
        """The journal, mapped read-only (the caller closes it); None if empty."""

    def append(self, data: bytes) -> None: ...

    def replace(self, chunks: Iterable[bytes]) -> None: ...

    def sync(self) -> None: ...

    def detach(self) -> None: ...

    def discard(self) -> None: ...

    def fds(self) -> list[int]: ...

    def close(self) -> None: ...


def prepare_state_dir(path: Path) -> None:
    """Create ``path`` (0700) if missing; refuse it if anyone but us or root
    could change it or the way to it."""
    uid = os.geteuid()
    try:
        check_path(str(path.parent), {0, uid})
    except UnsafePath as exc:
        raise StateError(
            f"state dir {path} is unsafe: {exc.problem}, so {exc.who_could} could replace it; "
            "choose another --state-dir"
        ) from None
    except FileNotFoundError:
        try:
            os.makedirs(path.parent, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise StateError(
                f"cannot create state dir {path}: {exc.strerror}; choose another --state-dir"
            ) from None
        return prepare_state_dir(path)
    except OSError as exc:
        raise StateError(
            f"cannot check state dir {path}: {exc.strerror}; choose another --state-dir"
        ) from None
    try:
        os.mkdir(path, _DIR_MODE)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StateError(
            f"cannot create state dir {path}: {exc.strerror}; choose another --state-dir"
        ) from None
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise StateError(f"state dir {path} is not a directory (or is a symlink); choose another --state-dir")
    if st.st_uid not in (uid, 0):
        raise StateError(
            f"state dir {path} is owned by {describe_uid(st.st_uid)}; "
            "someone else may control it: remove it or choose another --state-dir"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateError(
            f"state dir {path} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run 'chmod go-w {path}' or choose another --state-dir"
        )


class StateFile:
    """``history.journal`` in the state dir, which ``.lock`` keeps ours while we run."""

    def __init__(self, directory: Path) -> None:
        prepare_state_dir(directory)
        self.directory = directory
        self.path = directory / JOURNAL_FILE
        self.name = str(self.path)
        self._lock = self._open(directory / ".lock", os.O_RDWR)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise StateError(
                f"state dir {directory} is in use by another ipcd; give each daemon its own --state-dir"
            ) from None
        self._fd = self._open(self.path, os.O_RDWR | os.O_APPEND)
        self._dirty = False

    def _open(self, path: Path, flags: int) -> int:
        try:
            return os.open(path, flags | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise StateError(f"cannot open {path}: {exc.strerror}; choose another --state-dir") from None

    def load(self) -> mmap.mmap | None:
        size = os.fstat(self._fd).st_size
        return mmap.mmap(self._fd, size, prot=mmap.PROT_READ) if size else None

    def append(self, data: bytes) -> None:
        _write_all(self._fd, data)
        self._dirty = True

    def replace(self, chunks: Iterable[bytes]) -> None:
        fresh = self.path.with_name(JOURNAL_FILE + ".new")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fresh)
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(fresh, flags, 0o600)
        try:
            for chunk in chunks:
                _write_all(fd, chunk)
            os.fsync(fd)
            os.rename(fresh, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(fresh)
            raise
        os.close(self._fd)
        self._fd = fd  # appends go on in the file that is the journal now
        self._dirty = False
        _fsync_dir(self.directory)

    def sync(self) -> None:
        if self._dirty:
            self._dirty = False
            os.fsync(self._fd)

    def fds(self) -> list[int]:
        return [self._fd, self._lock]

    def discard(self) -> None:
        self.close()  # a state file no longer used stays where it is

    def detach(self) -> None:
        """In a forked worker: drop our copies of the fds, touching nothing."""
        for fd in (self._fd, self._lock):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fd = self._lock = -1

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                self.sync()
        self.detach()


class FdStoreCopy:
    """A memfd in systemd's fd store, named ``history``."""

    def __init__(self, manager: Manager, passed: int | None) -> None:
        self.manager = manager
        self.name = "systemd's fd store"
        self._fd = passed

    def load(self) -> mmap.mmap | None:
        if self._fd is None:
            return None
        size = os.fstat(self._fd).st_size
        return mmap.mmap(self._fd, size, prot=mmap.PROT_READ) if size else None

    def append(self, data: bytes) -> None:
        if self._fd is None:
            raise OSError(errno.EBADF, "no memfd yet")
        os.lseek(self._fd, 0, os.SEEK_END)
        _write_all(self._fd, data)

    def replace(self, chunks: Iterable[bytes]) -> None:
        fd = os.memfd_create("ipcd-history", os.MFD_CLOEXEC)
        try:
            for chunk in chunks:
                _write_all(fd, chunk)
        except BaseException:
            os.close(fd)
            raise
        self.manager.remove_fds(FDSTORE_NAME)
        if not self.manager.store_fds(FDSTORE_NAME, [fd]):
            os.close(fd)
            raise OSError(errno.EIO, "systemd did not take the memfd (FileDescriptorStoreMax= too low?)")
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd

    def sync(self) -> None:
        pass

    def fds(self) -> list[int]:
        return [] if self._fd is None else [self._fd]

    def detach(self) -> None:
        self.close()

    def discard(self) -> None:
        """Not kept any more: out of systemd's fd store too."""
        self.close()
        self.manager.remove_fds(FDSTORE_NAME)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _counted:
    """An iterable of byte strings that counts what was taken of it."""

    def __init__(self, pieces: Iterable[bytes]) -> None:
        self._pieces = pieces
        self.total = 0

    def __iter__(self) -> Iterator[bytes]:
        for piece in self._pieces:
            self.total += len(piece)
            yield piece


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[written:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class HistoryJournal:
    """The hub's history, kept in every :class:`Copy` given."""

    def __init__(self, hub: Hub, copies: list[Copy]) -> None:
        self.hub = hub
        self.copies = copies
        self.generation = 0
        self.size = 0  # bytes of the journal as written
        self._broken: set[str] = set()  # copies a write failed on: rewritten whole at the next tick

    def start(self, retired: Iterable[Copy] = ()) -> int:
        """Load the newest copy into the hub (of ours, and of ``retired``:
        copies an earlier run kept that this one does not, read once and
        discarded), then write a fresh snapshot to every copy. Returns how
        many messages were restored."""
        retired = list(retired)
        best: tuple[int, int, dict[str, RoomImage], str] | None = None
        for copy in [*self.copies, *retired]:
            data = copy.load()
            if data is None:
                continue
            reader = Reader(data)
            try:
                images = fold(reader, self.hub.limits.history)  # one pass, holding what it leaves
            finally:
                data.close()
            if reader.dropped:
                log.warning(
                    "%s: dropped %d bytes of a torn or corrupt tail (%s); kept the %d bytes before it",
                    copy.name,
                    reader.dropped,
                    reader.reason,
                    reader.good,
                )
            if reader.generation is None:
                continue
            candidate = (reader.generation, reader.good, images, copy.name)
            if best is None or candidate[:2] > best[:2]:
                best = candidate
        restored = 0
        if best is not None:
            generation, _, images, name = best
            self.generation = generation
            restored = self.hub.restore(images.values())
            rooms = sum(1 for r in self.hub.rooms.values() if r.seq)
            log.info("restored %d messages in %d rooms from %s", restored, rooms, name)
        self.compact()
        for copy in retired:
            copy.discard()
        self.hub.changes = []
        return restored

    def stats(self) -> dict[str, Any]:
        """For STATUS: where the journal is, how large, and whether it is written."""
        return {
            "where": [copy.name for copy in self.copies],
            "bytes": self.size,
            "generation": self.generation,
            "retained_bytes": self.hub.kept.total,
            "failing": sorted(self._broken),
        }

    def flush(self) -> None:
        """What the hub noted, appended to every copy: before any reply goes."""
        changes = self.hub.changes
        if not changes:
            return
        self.hub.changes = []
        data = encode_changes(changes)
        self.size += len(data)
        for copy in self.copies:
            if copy.name in self._broken:
                continue
            try:
                copy.append(data)
            except OSError as exc:
                self._failed(copy, exc)

    def tick(self, sync: bool = False) -> None:
        """Once a second: repair or compact when due, and fsync if ``sync``."""
        if sync:
            self.sync()
        retained = self.hub.kept.total
        if self._broken or (self.size > COMPACT_MIN and self.size > 2 * retained):
            self.compact()

    def sync(self) -> None:
        """What was appended, onto the disk (--sync-interval, and at stop)."""
        for copy in self.copies:
            try:
                copy.sync()
            except OSError as exc:
                self._failed(copy, exc)

    def compact(self) -> None:
        """Every copy rewritten as a snapshot of the hub, the next generation."""
        self.flush()
        self.generation += 1
        for copy in self.copies:
            # made again for each copy as it is written: never the whole snapshot in memory at once
            pieces = _counted(snapshot(self.generation, self.hub.export()))
            try:
                copy.replace(pieces)
                self.size = pieces.total
            except OSError as exc:
                self._failed(copy, exc)
            else:
                if copy.name in self._broken:
                    self._broken.discard(copy.name)
                    log.info("%s is written again", copy.name)

    def fds(self) -> list[int]:
        """The open fds of the copies (a daemonizer must keep them)."""
        return [fd for copy in self.copies for fd in copy.fds()]

    def detach(self) -> None:
        """In a forked worker: the fds are the master's."""
        for copy in self.copies:
            copy.detach()

    def close(self) -> None:
        self.flush()
        for copy in self.copies:
            try:
                copy.close()
            except OSError as exc:
                log.error("cannot close %s: %s", copy.name, exc.strerror)

    def _failed(self, copy: Copy, exc: OSError) -> None:
        if copy.name not in self._broken:
            self._broken.add(copy.name)
            log.error(
                "cannot write the history journal to %s: %s; history posted from now on may not survive "
                "a restart until it can be written again (retried every second)",
                copy.name,
                exc.strerror or exc,
            )
