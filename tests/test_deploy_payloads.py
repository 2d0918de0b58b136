"""Rows written by the release before typed payloads (captured from the sandbox) load, round-trip
and advance with today's code."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest

from bot.deploy.payloads import DeployData, DeployParams

FIXTURE = Path(__file__).parent / "fixtures" / "operations_r2_deploy.json"
ROWS: list[dict[str, Any]] = json.loads(FIXTURE.read_text())["rows"]


def test_the_fixture_covers_every_state_and_data_shape() -> None:
    states = {row["state"] for row in ROWS}
    assert {"awaiting_approval", "scheduled", "starting", "running", "canceling"} <= states
    assert {"succeeded", "failed", "canceled", "rejected", "error"} <= states
    keys = set().union(*(row["data"] for row in ROWS))
    for key in ("result", "progress", "component_failures", "test_failures", "coverage", "queued_announced"):
        assert key in keys, key
    assert {row["params"]["action"] for row in ROWS} == {"deploy", "validate", "quick_deploy"}


@pytest.mark.parametrize("row", ROWS, ids=[row["label"] for row in ROWS])
def test_a_captured_row_validates_and_round_trips(row: dict[str, Any]) -> None:
    params, data = DeployParams.read(row["params"]), DeployData.read(row["data"])
    assert params.dump() == {"v": 1, **row["params"]}
    assert data.dump() == {"v": 1, **row["data"]}
    assert DeployData.read(data.dump()).dump() == data.dump()


@pytest.mark.parametrize("label", ["deploy_starting", "deploy_approved_starting_prod"])
async def test_a_row_written_by_the_previous_release_advances_to_completion(tmp_path: Path, label: str) -> None:
    """Upgrade safety: an approved deployment the previous release recorded but had not sent yet is
    sent, followed and reported by today's code, from the row exactly as that release wrote it."""
    from bot.sandbox.embedded import running_sandbox
    from bot.store import repo
    from bot.store.models import Operation, OpKind, OpState
    from tests.test_deploy_e2e import mdapi, wait_op

    row = next(row for row in ROWS if row["label"] == label)
    async with running_sandbox(workdir=tmp_path, job_seconds=0.01) as sandbox:
        assert sandbox.runtime is not None
        # The sample zip is written afresh for each sandbox (new timestamps, new checksum): point the
        # recorded checksum at this one, or the bot rightly refuses an artifact that changed.
        artifact = tmp_path / "artifacts" / row["params"]["artifact"]["ref"]
        params = {
            **row["params"],
            "artifact": {**row["params"]["artifact"], "sha256": sha256(artifact.read_bytes()).hexdigest()},
        }
        operation, created = await repo.insert_operation(
            sandbox.runtime.db,
            operation=Operation(
                kind=OpKind.DEPLOY,
                state=row["state"],
                step=row["step"],
                org=row["org"],
                summary=row["summary"],
                params=params,
                data=row["data"],
                requester=row["requester"],
                channel=row["channel"],
                idempotency_key=f"fixture:{label}",
                next_poll_at=datetime.now(UTC),
            ),
        )
        assert created and operation.state == OpState.STARTING
        done = await wait_op(sandbox, operation.ref, states=[OpState.SUCCEEDED, OpState.FAILED, OpState.ERROR])
        assert done.state == OpState.SUCCEEDED, done.data
        (sent,) = mdapi(sandbox, row["org"]).calls("deploy")
        assert sent.args["checkOnly"] is False
        data = DeployData.read(done.data)
        assert data.result is not None and data.result.status == "Succeeded" and data.submitted_at
        assert data.approved_by == row["data"].get("approved_by", [])
        assert DeployParams.read(done.params).dump() == {"v": 1, **params}
