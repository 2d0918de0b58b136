"""Push rows written by the release before typed payloads read unchanged and round-trip (upgrade safety)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bot.push.payloads import PushData, PushParams
from bot.push.requests import OrgSelection, VersionSpec
from bot.sandbox.embedded import Sandbox
from bot.store import repo
from bot.store.models import Operation, OpState
from tests.helpers import wait_for_op

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


async def test_a_row_written_by_the_previous_release_is_advanced_to_completion(sandbox: Sandbox) -> None:
    """Upgrade safety: a push the previous release created (approved, about to start) is carried to the end."""
    row = next(
        r
        for r in ROWS
        if r["state"] == "starting" and r["step"] == "create_request" and r["params"]["orgs"] == "sandbox"
    )
    assert sandbox.runtime is not None
    runtime = sandbox.runtime
    plan = await runtime.push.plan(VersionSpec(version_id=row["params"]["version_id"]), OrgSelection(scope="sandbox"))
    assert plan.targets
    operation = Operation(
        kind=row["kind"],
        state=row["state"],
        step=row["step"],
        org=row["org"],
        summary=row["summary"],
        params=row["params"],
        data=row["data"],
        requester=row["requester"],
        channel=row["channel"],
        idempotency_key="from-the-previous-release",
        next_poll_at=datetime.now(UTC),
    )
    operation, _ = await repo.insert_operation(runtime.db, operation=operation)
    assert operation.id is not None
    await repo.add_push_targets(
        runtime.db,
        operation_id=operation.id,
        targets=[
            {
                "org_key": t.org_key,
                "org_name": t.org_name,
                "org_type": t.org_type,
                "org_status": t.org_status,
                "from_version": t.from_version,
            }
            for t in plan.targets
        ],
    )
    runtime.poller.kick()
    op = await wait_for_op(sandbox, operation.ref, states=[OpState.SUCCEEDED, OpState.FAILED], announced=True)
    data = PushData.of(op)
    assert op.external_id and data.request_url and data.jobs is not None
    assert data.summary is not None and data.summary.total == data.jobs.created == len(plan.targets) - data.jobs.refused
    assert data.plan.total == row["data"]["plan"]["total"]
