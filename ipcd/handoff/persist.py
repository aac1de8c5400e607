"""Keeping the fd store across daemon restarts with systemd's fd store.

Theory of operation: systemd can hold fds for a service across its restarts
(``FDSTORE=1``; the unit needs ``FileDescriptorStoreMax=``) and passes them
back at the next start like socket-activated fds, by name. Every stored fd
is pushed as ``s<N>``; the entries' metadata (name, owner, access list, TTL,
which ``s<N>`` belong to it) is a small JSON document in a memfd pushed as
``meta``, replaced on every change. On start the daemon reads ``meta`` back
and rebuilds the entries; fds that no entry names are closed and dropped
from systemd's store. Without systemd (or without its fd store) nothing of
this happens: a daemon stopped by hand loses its entries, as documented.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from ipcd import fdpass

if TYPE_CHECKING:
    from ipcd.handoff.store import Entry
    from ipcd.systemd import Manager

log = logging.getLogger("ipcd.master")

META = "meta"


class SystemdPersistence:
    def __init__(self, manager: Manager) -> None:
        self.manager = manager
        self._next = 0
        self.names: dict[str, tuple[str, ...]] = {}  # entry name -> its fd-store names

    def added(self, entry: Entry, entries: list[Entry]) -> None:
        names = []
        for fd in entry.fds:
            self._next += 1
            name = f"s{self._next}"
            if self.manager.store_fds(name, [fd]):
                names.append(name)
        self.names[entry.name] = tuple(names)
        self._write_meta(entries)

    def removed(self, entry: Entry, entries: list[Entry]) -> None:
        for name in self.names.pop(entry.name, ()):
            self.manager.remove_fds(name)
        self._write_meta(entries)

    def _write_meta(self, entries: list[Entry]) -> None:
        doc = {"version": 1, "entries": [self._describe(e) for e in entries if e.name in self.names]}
        memfd = os.memfd_create("ipcd-meta", os.MFD_CLOEXEC)
        try:
            os.write(memfd, json.dumps(doc).encode())
            self.manager.remove_fds(META)
            self.manager.store_fds(META, [memfd])
        finally:
            os.close(memfd)

    def _describe(self, entry: Entry) -> dict[str, Any]:
        remaining = None if entry.expires is None else entry.expires - time.monotonic()
        return {
            "name": entry.name,
            "owner": entry.owner,
            "owner_gid": entry.owner_gid,
            "store": list(self.names[entry.name]),
            "fd_names": list(entry.fd_names),
            "allow_uids": sorted(entry.allow_uids),
            "allow_gids": sorted(entry.allow_gids),
            "public": entry.public,
            "created": entry.created,
            "expires_at": None if remaining is None else time.time() + remaining,
        }

    def recover(self, passed: dict[str, int]) -> list[dict[str, Any]]:
        """Entries to rebuild from the fds systemd passed back: each dict is
        the metadata plus ``fds``. Unused fds are closed and dropped."""
        meta_fd = passed.pop(META, None)
        recovered: list[dict[str, Any]] = []
        if meta_fd is not None:
            try:
                raw = os.pread(meta_fd, 16 << 20, 0)
                doc = json.loads(raw)
            except (OSError, ValueError) as exc:
                log.error("cannot read the fd store's metadata (%s); stored entries are lost", exc)
                doc = {"entries": []}
            finally:
                os.close(meta_fd)
            for item in doc.get("entries", []):
                try:
                    fds = tuple(passed.pop(name) for name in item["store"])
                except KeyError:
                    log.error(
                        "fd entry %r lost some of its fds across the restart; dropped", item.get("name")
                    )
                    continue
                expires_at = item.get("expires_at")
                if expires_at is not None and expires_at <= time.time():
                    fdpass.close_fds(fds)
                    for name in item["store"]:
                        self.manager.remove_fds(name)
                    continue
                self.names[item["name"]] = tuple(item["store"])
                recovered.append({**item, "fds": fds})
        for name, fd in passed.items():  # nobody's: forget them
            os.close(fd)
            self.manager.remove_fds(name)
        numbers = [int(n[1:]) for names in self.names.values() for n in names if n[1:].isdigit()]
        self._next = max(numbers, default=0)
        return recovered
