"""The master's count of connections per uid, and the budgets' defaults."""

from __future__ import annotations

import dataclasses

from ipcd.server.uidbudgets import (
    ConnectionLedger,
    connection_capacity,
    connection_limit,
    partial_bound,
    partial_budget,
)
from ipcd.settings import READ_BUFFER_SIZE, Settings

A, B = 1001, 1002
W1, W2 = 11, 12


def test_a_uid_past_its_budget_is_refused_and_others_are_not() -> None:
    ledger = ConnectionLedger(limit=2, privileged_factor=4)
    for worker in (W1, W2):
        assert ledger.admit(A) is None
        ledger.passed(worker, A)
    assert ledger.admit(A) == (
        f"uid {A} holds 2 connections, its limit (the daemon's --connections-per-uid is 2 per uid): "
        "close some of your connections, or retry later"
    )
    assert ledger.admit(B) is None
    assert ledger.refused == 1


def test_closes_reported_by_a_worker_give_the_budget_back() -> None:
    ledger = ConnectionLedger(limit=2, privileged_factor=1)
    ledger.passed(W1, A)
    ledger.passed(W1, A)
    ledger.passed(W2, B)
    ledger.closed(W1, {A: 1})
    assert ledger.holdings() == {A: {"connections": 1}, B: {"connections": 1}}
    assert ledger.admit(A) is None
    ledger.closed(W1, {A: 1})
    assert ledger.holdings() == {B: {"connections": 1}}  # a uid holding nothing is not listed


def test_a_report_cannot_release_more_than_its_worker_was_given() -> None:
    ledger = ConnectionLedger(limit=2, privileged_factor=1)
    ledger.passed(W1, A)
    ledger.passed(W2, A)
    ledger.closed(W1, {A: 5, B: 3})  # more than W1 took, and a uid it never had
    ledger.closed(99, {A: 1})  # a worker the master never passed to
    assert ledger.holdings() == {A: {"connections": 1}}


def test_a_dead_workers_connections_are_released_with_it() -> None:
    ledger = ConnectionLedger(limit=3, privileged_factor=1)
    for worker in (W1, W1, W2):
        ledger.passed(worker, A)
    ledger.partial_reported(W1, {A: 500})
    ledger.partial_reported(W2, {A: 200, B: 7})
    assert ledger.holdings() == {A: {"connections": 3, "partial_bytes": 700}, B: {"partial_bytes": 7}}
    ledger.worker_gone(W1)
    assert ledger.holdings() == {A: {"connections": 1, "partial_bytes": 200}, B: {"partial_bytes": 7}}
    ledger.partial_reported(W2, {})
    ledger.worker_gone(W2)
    assert ledger.holdings() == {}


def test_bytes_waiting_for_the_master_are_summed_over_workers_and_go_with_them() -> None:
    ledger = ConnectionLedger(limit=3, privileged_factor=1)
    ledger.passed(W1, A)
    ledger.forwarding_reported(W1, {A: 1000})
    ledger.forwarding_reported(W2, {A: 24, B: 5})
    ledger.partial_reported(W2, {B: 7})
    assert ledger.holdings() == {
        A: {"connections": 1, "forward_bytes": 1024},
        B: {"partial_bytes": 7, "forward_bytes": 5},
    }
    ledger.forwarding_reported(W2, {})  # all written: the worker's last report says so
    ledger.worker_gone(W1)
    assert ledger.holdings() == {B: {"partial_bytes": 7}}


def test_refusals_are_logged_once_per_interval_per_uid() -> None:
    ledger = ConnectionLedger(limit=1, privileged_factor=1)
    assert ledger.should_log(A, 100.0)
    assert not ledger.should_log(A, 105.0)
    assert ledger.should_log(B, 105.0)
    assert ledger.should_log(A, 110.0)


def test_the_default_keeps_a_privileged_uid_to_half_the_workers_capacity() -> None:
    settings = Settings(workers=2)
    assert connection_capacity(2, 20_000) == 39_872
    assert connection_limit(settings, 20_000) == 4096  # 39,872 / 8 = 4984: the default stands
    assert connection_limit(settings, 1024) == 240  # (1024 - 64) * 2 / 8
    assert connection_limit(Settings(workers=1), 65) == 1
    # An explicit setting is the operator's: kept as given.
    assert connection_limit(dataclasses.replace(settings, connections_per_uid=30_000), 1024) == 30_000


def test_the_partial_frame_budget_is_per_uid_in_each_worker() -> None:
    settings = Settings(partial_bytes_per_uid=1 << 20, privileged_budget_factor=4)
    budget = partial_budget(settings)
    budget.charge(A, (1 << 20) + 1)
    assert not budget.admits(A, 0)
    assert budget.refusal(A, "advice") == (
        f"uid {A} holds {(1 << 20) + 1} bytes of partly received frames, its limit (the daemon's "
        "--partial-bytes-per-uid is 1048576 per uid in each worker): advice"
    )
    assert partial_bound(settings) == (1 << 20) + READ_BUFFER_SIZE
    assert partial_bound(settings, privileged=True) == (4 << 20) + READ_BUFFER_SIZE
