"""Push rows written by the release before typed payloads read unchanged and round-trip (upgrade safety)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bot.push.payloads import PushData, PushParams

ROWS = json.loads((Path(__file__).parent / "fixtures" / "operations_r2_push.json").read_text())


def kept(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Every key ``before`` had is in ``after`` with the same value; a null may be left out (it reads back as null)."""
    for key, value in before.items():
        if value is None and key not in after:
            continue
        assert key in after, key
        if isinstance(value, dict) and isinstance(after[key], dict):
            kept(value, after[key])
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            assert len(value) == len(after[key])
            for one, other in zip(value, after[key], strict=True):
                kept(one, other)
        else:
            assert after[key] == value, (key, after[key], value)


def test_the_fixture_covers_every_state_and_data_shape() -> None:
    states = {row["state"] for row in ROWS}
    assert {"awaiting_approval", "starting", "scheduled", "running", "succeeded", "failed"} <= states
    assert {"canceled", "rejected", "expired", "error"} <= states
    keys = set().union(*(row["data"] for row in ROWS))
    assert {"bulk_failures", "bulk_job_id", "jobs_attempted_at", "summary", "counts", "last_problem"} <= keys


@pytest.mark.parametrize("row", ROWS, ids=[f"{i}-{row['state']}-{row['step']}" for i, row in enumerate(ROWS)])
def test_a_captured_row_validates_and_round_trips(row: dict[str, Any]) -> None:
    params = PushParams.read(row["params"])
    data = PushData.read(row["data"])
    kept(row["params"], params.dump())
    kept(row["data"], data.dump())
    # Read again from what this release writes: the same values.
    assert PushParams.read(params.dump()) == params
    assert PushData.read(data.dump()) == data
