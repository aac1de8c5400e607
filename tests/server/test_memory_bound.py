"""The worst-case memory of the master and a worker moves with the settings
that bound it, and only with those (ipcd.server.flow)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from ipcd.server.flow import master_memory_bound, worker_memory_bound
from ipcd.server.forwarded import largest_forward
from ipcd.settings import Settings

BASE = Settings(workers=2, connections_per_uid=100)
UNSERVED = "frames received, not served (partial or held)"
FORWARDED = "requests waiting for the master"


def master(settings: Settings) -> tuple[int, int, int]:
    bound = master_memory_bound(settings, workers=2)
    return sum(bound.fixed.values()), bound.total(1) - bound.total(0), bound.total(0, privileged=1)


def worker(settings: Settings) -> tuple[int, int, int]:
    bound = worker_memory_bound(settings, connections=50)
    return sum(bound.fixed.values()), bound.total(1) - bound.total(0), bound.total(0, privileged=1)


@pytest.mark.parametrize(
    ("change", "fixed_moves", "per_uid_moves"),
    [
        ({"history_size": 200}, False, False),  # history is charged to its posters
        ({"max_message": 32 * 1024}, True, True),  # a page holds one more message; and one past each budget
        ({"history_bytes_per_uid": 128 << 20}, False, True),
        ({"waiters_per_uid": 2048}, False, True),
        ({"joins_per_uid": 2048}, False, True),
        ({"message_ids_per_uid": 8192}, False, True),
        ({"message_id_window": 1200.0}, False, False),  # the count bounds the memory
        ({"connections_per_uid": 200}, False, True),
        ({"fd_quota": 128}, False, True),
        ({"max_frame_size": 2 << 20}, True, False),
    ],
)
def test_master_bound_moves_with_its_settings(
    change: dict[str, Any], fixed_moves: bool, per_uid_moves: bool
) -> None:
    before, after = master(BASE), master(dataclasses.replace(BASE, **change))
    assert (after[0] > before[0]) is fixed_moves
    assert (after[1] > before[1]) is per_uid_moves
    assert after[0] >= before[0]
    assert after[1] >= before[1]


@pytest.mark.parametrize(
    ("change", "fixed_moves", "per_uid_moves"),
    [
        ({"max_outbuf": 8 << 20}, True, False),
        ({"max_frame_size": 2 << 20}, False, True),  # the request that crossed the forward budget
        ({"partial_bytes_per_uid": 32 << 20}, False, True),
        ({"forward_bytes_per_uid": 32 << 20}, False, True),
        ({"fd_quota": 128}, False, True),
        ({"max_fds": 32}, False, True),
    ],
)
def test_worker_bound_moves_with_its_settings(
    change: dict[str, Any], fixed_moves: bool, per_uid_moves: bool
) -> None:
    before, after = worker(BASE), worker(dataclasses.replace(BASE, **change))
    assert (after[0] > before[0]) is fixed_moves
    assert (after[1] > before[1]) is per_uid_moves


def test_settings_that_hold_no_memory_leave_both_bounds_alone() -> None:
    other = dataclasses.replace(BASE, log_level="debug", send_timeout=5.0, idle_timeout=9.0, rate_limit=10.0)
    assert master(other) == master(BASE)
    assert worker(other) == worker(BASE)


def test_the_waiter_budget_does_not_touch_a_worker_nor_partial_bytes_the_master() -> None:
    assert worker(dataclasses.replace(BASE, waiters_per_uid=9999)) == worker(BASE)
    assert master(dataclasses.replace(BASE, partial_bytes_per_uid=1 << 30)) == master(BASE)
    assert master(dataclasses.replace(BASE, forward_bytes_per_uid=1 << 30)) == master(BASE)


def test_privileged_uids_get_the_factor_on_their_budgets() -> None:
    bound = master_memory_bound(BASE, workers=2)
    assert bound.privileged_per_uid["parked waiters"] == 4 * bound.per_uid["parked waiters"]
    assert bound.privileged_per_uid["stored entries"] == bound.per_uid["stored entries"]  # root included
    ids = "message ids of its recent posts (--message-ids-per-uid)"
    assert bound.privileged_per_uid[ids] == bound.per_uid[ids] == 4096 * 400


def test_unserved_frames_never_count_more_than_two_frames_per_connection() -> None:
    """One held, one being received."""
    few = worker_memory_bound(BASE, connections=2)
    assert few.per_uid[UNSERVED] == 2 * 2 * BASE.max_frame_size
    many = worker_memory_bound(BASE, connections=1000)
    assert many.per_uid[UNSERVED] == BASE.partial_bytes_per_uid + 256 * 1024


def test_requests_for_the_master_are_bounded_per_uid_not_per_connection() -> None:
    """The term is the uid's budget and the request that crossed it, however
    many connections there are (it was 256 frames for each), and never more
    than those connections may have in flight."""
    envelope = largest_forward(BASE) - BASE.max_frame_size
    small = dataclasses.replace(BASE, max_frame_size=4096)
    one = worker_memory_bound(small, connections=1)
    assert one.per_uid[FORWARDED] == 256 * (4096 + envelope)
    for connections in (100, 4096, 100_000):
        bound = worker_memory_bound(BASE, connections)
        assert bound.per_uid[FORWARDED] == BASE.forward_bytes_per_uid + BASE.max_frame_size + envelope
        assert (
            bound.privileged_per_uid[FORWARDED]
            == 4 * BASE.forward_bytes_per_uid + BASE.max_frame_size + envelope
        )
        assert not [name for name in bound.fixed if "master" in name and "from the master" not in name]
    # What a connection adds daemon-wide is its output and objects, not 256 frames.
    grow = worker_memory_bound(BASE, 4096).total(0) - worker_memory_bound(BASE, 4095).total(0)
    assert grow == BASE.max_outbuf + 4096


def test_workers_and_connections_scale_their_terms() -> None:
    assert master_memory_bound(BASE, 4).total(1) > master_memory_bound(BASE, 2).total(1)
    assert worker_memory_bound(BASE, 100).total(1) > worker_memory_bound(BASE, 50).total(1)
