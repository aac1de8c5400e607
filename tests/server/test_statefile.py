"""The history journal's files, in-process: real files in a temp state dir,
a hub fed through the test model of the workers (tests.chat.test_hub.Sim)."""

from __future__ import annotations

import logging
import os
import resource
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipcd.chat.hub import Hub, Limits
from ipcd.chat.journal import Header, decode, fold
from ipcd.server import statefile
from ipcd.server.statefile import JOURNAL_FILE, HistoryJournal, StateFile
from tests.chat.test_hub import W1, Sim


def _rooms(hub: Hub) -> dict[str, tuple[int, list[int]]]:
    return {r.name: (r.seq, [s for s, _, _ in r.history]) for r in hub.rooms.values() if r.seq}


def _loaded(path: Path, limits: Limits | None = None) -> tuple[int, dict[str, tuple[int, list[int]]]]:
    """The generation and the rooms a journal file restores (under ``limits``)."""
    decoded = decode(path.read_bytes())
    assert decoded.dropped == 0, decoded.reason
    header = decoded.records[0]
    assert isinstance(header, Header)
    hub = Hub(limits)
    hub.restore(fold(decoded.records[1:], hub.limits.history).values())
    return header.generation, _rooms(hub)


@pytest.fixture
def sim() -> Sim:
    return Sim(Limits(history=10))


@pytest.fixture
def journal(sim: Sim, tmp_path: Path) -> Iterator[HistoryJournal]:
    kept = HistoryJournal(sim.hub, [StateFile(tmp_path / "state")])
    kept.start()
    yield kept
    kept.close()


def test_a_journal_past_twice_the_retained_bytes_is_compacted_to_a_snapshot(
    sim: Sim, journal: HistoryJournal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(statefile, "COMPACT_MIN", 64 << 10)
    path = tmp_path / "state" / JOURNAL_FILE
    poster = sim.connect(W1, uid=70001)
    sizes = []
    for i in range(400):
        poster.say("ops", f"message {i} " + "x" * 500)
        journal.flush()
        sizes.append(path.stat().st_size)
        journal.tick()
    assert max(sizes) > 2 * sim.hub.kept.total  # it grew past the trigger ...
    assert path.stat().st_size < 2 * sim.hub.kept.total + (64 << 10)  # ... and was brought back
    generation, rooms = _loaded(path, sim.hub.limits)
    assert generation > 2  # the start's snapshot, then at least one compaction
    assert rooms == _rooms(sim.hub) == {"ops": (400, list(range(391, 401)))}
    assert not (tmp_path / "state" / (JOURNAL_FILE + ".new")).exists()


def test_of_two_copies_the_newer_generation_wins_then_the_longer(sim: Sim, tmp_path: Path) -> None:
    old, new = StateFile(tmp_path / "old"), StateFile(tmp_path / "new")
    first = HistoryJournal(sim.hub, [old, new])
    first.start()
    poster = sim.connect(W1, uid=70001)
    poster.say("ops", "in both")
    first.flush()
    first.copies = [new]  # from here on only one copy is written
    poster.say("ops", "only in new")
    first.flush()
    first.close()
    old.close()
    later = Hub()
    second = HistoryJournal(later, [StateFile(tmp_path / "old"), StateFile(tmp_path / "new")])
    second.start()  # same generation: the one with more valid bytes
    assert _rooms(later) == {"ops": (2, [1, 2])}
    second.close()
    assert _loaded(tmp_path / "old" / JOURNAL_FILE) == _loaded(
        tmp_path / "new" / JOURNAL_FILE
    )  # rewritten alike


def test_a_copy_left_at_an_older_generation_loses_however_long(sim: Sim, tmp_path: Path) -> None:
    """Its rewrite failed (so nothing more was appended to it either): the
    copy rewritten since is the newer state."""
    old, new = StateFile(tmp_path / "old"), StateFile(tmp_path / "new")
    first = HistoryJournal(sim.hub, [old, new])
    first.start()
    poster = sim.connect(W1, uid=70001)
    poster.say("ops", "one")
    first.flush()
    first.copies = [new]
    sim.hub.rooms["ops"].history.clear()  # what the rewrite holds differs from the old copy
    sim.hub.kept.clear()
    first.compact()
    first.close()
    old.close()
    assert len((tmp_path / "old" / JOURNAL_FILE).read_bytes()) > len(
        (tmp_path / "new" / JOURNAL_FILE).read_bytes()
    )
    later = Hub()
    second = HistoryJournal(later, [StateFile(tmp_path / "old"), StateFile(tmp_path / "new")])
    second.start()
    second.close()
    assert _rooms(later) == {"ops": (1, [])}  # the newer generation's: seq 1, its history cleared


def test_a_write_that_fails_is_logged_once_and_the_copy_rewritten_when_it_can(
    sim: Sim, journal: HistoryJournal, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk, made real with RLIMIT_FSIZE: appends fail (EFBIG), the
    journal is left alone (no record after a torn one), and the next tick
    that can write it rewrites it whole."""
    path = tmp_path / "state" / JOURNAL_FILE
    poster = sim.connect(W1, uid=70001)
    poster.say("ops", "before")
    journal.flush()
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 10, hard))
        with caplog.at_level(logging.ERROR, "ipcd.master"):
            for i in range(3):
                poster.say("ops", f"while full {i} " + "x" * 100)
                journal.flush()
                journal.tick()
        failures = [r for r in caplog.records if "cannot write the history journal" in r.getMessage()]
        assert len(failures) == 1
        assert "may not survive a restart" in failures[0].getMessage()
        assert decode(path.read_bytes()).records[1:] == decode(before).records[1:]  # as it was
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    journal.tick()  # the disk has room again
    assert _loaded(path)[1] == _rooms(sim.hub) == {"ops": (4, [1, 2, 3, 4])}
    os.sync()
