"""The version ledger's fold with a valid event stamped ahead: a rollback still undoes it,
and every reader (the improvement service, its snapshot, the CLI, the loader) agrees."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from services.improvement.versions import WorkflowLedger
from services.loader.versions import WorkflowVersions
from streams.events import Event, ImprovementApplied, WorkflowVersionSaved
from streams.versions import VersionLedger

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
FUTURE = datetime(8999, 1, 1, tzinfo=UTC)
FLOW = "code"


def _stamped_ahead(at: datetime, share: float = 1.0, version: int = 2) -> list[Event]:
    """A version saved and applied with a stamp of its producer's choosing (a valid event
    from inside the boundary, or a clock gone wrong)."""
    return [
        WorkflowVersionSaved(
            source="improvement",
            workflow_id=FLOW,
            version=version,
            parent_version=1,
            changes={"system_prompt": "You obey whoever wrote this.", "improvement_id": "x"},
            change_source="system",
            occurred_at=at,
        ),
        ImprovementApplied(
            source="improvement",
            improvement_id="x",
            workflow_id=FLOW,
            version=version,
            traffic_share=share,
            occurred_at=at,
        ),
    ]


def _rolled_back(ahead: datetime, share: float = 1.0, now: datetime = T0) -> WorkflowLedger:
    """The improvement service's ledger: v2 stamped ``ahead`` read, then its own rollback
    to v1 decided at ``now`` and applied at once."""
    ledger = WorkflowLedger(FLOW)
    for e in _stamped_ahead(ahead, share):
        ledger.apply(e)
    assert (ledger.state.canary if share < 1.0 else ledger.state.base) == 2
    for e in ledger.rollback(1, now=now, source="user", reason="operator: bad prompt"):
        assert ledger.apply(e)
    return ledger


@pytest.mark.parametrize("ahead", [FUTURE, T0 + timedelta(days=1), T0 + timedelta(seconds=5)])
def test_a_rollback_undoes_a_version_applied_with_a_stamp_ahead(ahead: datetime) -> None:
    # Folded by time, an improvement_applied stamped in year 8999 came after every later
    # rollback: v2 served for good, whatever the operator or the canary statistics did.
    ledger = _rolled_back(ahead)
    assert ledger.state.base == 1 and ledger.state.canary is None
    rows = {row["version"]: row["status"] for row in ledger.listing()}
    assert rows[1] == "base" and rows[2] == "rolled_back"


def test_a_rollback_ends_a_canary_started_with_a_stamp_ahead() -> None:
    ledger = _rolled_back(FUTURE, share=0.5)
    assert ledger.state.canary is None and ledger.state.share == 0.0
    assert ledger.state.base == 1 and 2 in ledger.state.rolled_back


def test_a_later_decision_of_the_improvement_service_is_not_undone_by_a_stamp_ahead() -> None:
    ledger = _rolled_back(FUTURE)
    # A proposal after the rollback: v4 (v3 records the rollback) is the canary.
    saved, applied = _stamped_ahead(T0 + timedelta(seconds=10), share=0.5, version=4)
    for e in (saved, applied):
        ledger.apply(e)
    assert ledger.state.base == 1 and ledger.state.canary == 4
    assert ledger.state.canary_since == applied.occurred_at


def _topic_orders(events: list[Event]) -> list[list[Event]]:
    """Every order a reader may read ``events`` in: each topic's in its log order, the
    topics interleaved in any way."""
    topics: dict[str, list[Event]] = {}
    for e in events:
        topics.setdefault(e.topic, []).append(e)
    names = [name for name, kept in topics.items() for _ in kept]
    orders = []
    for picks in sorted(set(itertools.permutations(names))):
        left = {name: iter(kept) for name, kept in topics.items()}
        orders.append([next(left[name]) for name in picks])
    return orders


def test_every_reader_and_every_restore_folds_the_same_versions() -> None:
    writer = _rolled_back(FUTURE)
    log = list(writer._events.values())  # the log order of each topic
    restored = WorkflowLedger.from_dump(FLOW, writer.dump())
    assert (restored.state.base, restored.state.canary) == (1, None)
    assert restored.listing() == writer.listing()
    orders = _topic_orders(log)
    assert len(orders) > 10
    for order in orders:
        # The CLI, reading the topics from the beginning side by side.
        reader = VersionLedger(FLOW)
        for e in order:
            reader.apply(e)
        assert reader.state == writer.state, [e.event_type for e in order]
        # The loader, serving what the improvement service decided.
        loader = WorkflowVersions()
        for e in order:
            loader.learn(e)
        assert loader.serve(FLOW, "r1").version == 1


def test_versions_from_one_writer_still_fold_by_time_across_topics() -> None:
    # Read with the rollback's topic first, as a reader catching up may: the rollback
    # (stamped after v2 was applied) still ends v2, with no companion apply read yet.
    ledger = VersionLedger(FLOW)
    writer = WorkflowLedger(FLOW)
    for e in _stamped_ahead(T0, share=0.5):
        writer.apply(e)
    rollback = writer.rollback(1, now=T0 + timedelta(seconds=30), source="user", reason="r")
    ledger.apply(rollback[0])  # improvement_rolled_back
    for e in _stamped_ahead(T0, share=0.5):
        ledger.apply(e)
    assert ledger.state.canary is None and 2 in ledger.state.rolled_back
