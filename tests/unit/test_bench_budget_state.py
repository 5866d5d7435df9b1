"""bench/budget_state.py runs and measures what it says: a queue of the given depth."""

from __future__ import annotations

import pytest

from bench.budget_state import main, measure


def test_it_fills_the_queue_it_names_and_prints_a_row_per_depth(capsys):
    row = measure(25, 5)
    assert row["waiting"] == 25 and row["handle_ms"] > 0 and row["record_ms"] > 0
    main(["--waiting", "10", "40", "--events", "5"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["waiting", "handle", "ms", "x", "baseline", "record", "ms"]
    assert [line.split()[0] for line in lines[1:]] == ["0", "10", "40"]
    assert lines[1].split()[2] == "1.0"  # the baseline against itself


@pytest.mark.parametrize("args", [["--events", "0"], ["--waiting", "-1"]])
def test_it_refuses_what_it_cannot_measure(args):
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code == 2
