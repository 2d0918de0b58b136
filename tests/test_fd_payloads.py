"""Upgrade safety: ``fd`` rows written by the release before typed payloads load, round-trip and finish.

The rows in ``tests/fixtures/operations_r2_flexdeploy.json`` were captured from that release
running in the sandbox (waiting for approval, starting before and after an attempt, and every
ending with each data shape it wrote).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bot.flexdeploy.payloads import FdData, FdParams
from bot.flexdeploy.plan import Change

ROWS: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "fixtures" / "operations_r2_flexdeploy.json").read_text()
)


def _keys(value: Any, prefix: str = "") -> set[str]:
    """Every key path in a JSON value (list items share their list's path)."""
    if isinstance(value, dict):
        return {f"{prefix}{key}" for key in value} | {
            path for key, item in value.items() for path in _keys(item, f"{prefix}{key}.")
        }
    if isinstance(value, list):
        return {path for item in value for path in _keys(item, prefix)}
    return set()


def _without_version(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_version(item) for key, item in value.items() if key != "v"}
    if isinstance(value, list):
        return [_without_version(item) for item in value]
    return value


@pytest.mark.parametrize("row", ROWS, ids=[row["label"] for row in ROWS])
def test_every_captured_row_validates_and_round_trips(row: dict[str, Any]) -> None:
    params, data = FdParams.read(row["params"]), FdData.read(row["data"])
    assert params.dump() == {**row["params"], "v": 1}  # nothing lost, nothing changed
    dumped = data.dump()
    assert _keys(row["data"]) <= _keys(dumped)
    # The values are the same; what the model adds are the defaults of the shared fields.
    for key, value in row["data"].items():
        assert _without_version(dumped[key]) == _without_version(value), key


def test_attributes_read_what_the_keys_held() -> None:
    by_label = {row["label"]: row for row in ROWS}
    replace = by_label["succeeded replace"]
    params, data = FdParams.read(replace["params"]), FdData.read(replace["data"])
    assert params.action == "replace" and params.project_id == 101 and params.body is not None
    assert [(f.file_path, f.sequence_number) for f in params.body.files or []] == [
        ("/src/classes/RefundService.cls", 10),
        ("/src/classes/RefundServiceTest.cls", 20),
    ]
    assert data.before is not None and data.before.files == 3 and data.waited_for_approval
    after = data.after_package()
    assert after is not None and len(after.files) == 2 and after.files[1].object_type == "ApexClass"
    assert Change.of(params).body == params.body
    ambiguous = FdData.read(by_label["starting after ambiguous attempt"]["data"])
    assert ambiguous.attempted_at and ambiguous.transient_failures == 1 and ambiguous.last_problem
    assert FdData.read(by_label["canceled"]["data"]).canceled_by == "U0ALICE"
    assert "part of release" in (FdData.read(by_label["failed delete"]["data"]).error or "")
    assert FdParams.read(by_label["failed delete"]["params"]).body is None


async def test_rows_of_the_current_release_are_advanced_to_completion(sandbox: Any) -> None:
    """A row approved and started by the old release (one after an attempt with an unknown outcome,
    one before any attempt) is finished by this one: read back, checked, sent once, succeeded."""
    import asyncio
    import time
    from datetime import UTC, datetime

    from bot.store import repo
    from bot.store.models import Operation, OpState

    sim = sandbox.servers["flexdeploy"]
    by_label = {row["label"]: row for row in ROWS}
    ids = []
    for label in ("starting after ambiguous attempt", "starting transient before attempt"):
        row = by_label[label]
        operation = Operation(
            kind=row["kind"],
            state=row["state"],
            step=row["step"],
            summary=row["summary"],
            params=row["params"],
            data=row["data"],
            requester=row["requester"],
            channel=row["channel"],
            idempotency_key=f"upgrade:{label}",
            next_poll_at=datetime.now(UTC),
        )
        inserted, _ = await repo.insert_operation(sandbox.runtime.db, operation=operation)
        ids.append(inserted.id)
    sandbox.runtime.poller.kick()
    deadline = time.monotonic() + 30
    while True:
        ops = [await repo.get_operation(sandbox.runtime.db, operation_id=op_id) for op_id in ids]
        if all(op is not None and op.state == OpState.SUCCEEDED and op.announced_state == op.state for op in ops):
            break
        assert time.monotonic() < deadline, [(op.state, op.data) for op in ops if op is not None]
        await asyncio.sleep(0.05)
    assert sim.package(101, "Release 42")["packageStatus"] == "INACTIVE"
    assert sim.package(101, "All Profiles")["packageStatus"] == "INACTIVE"
    # Each was read first (both had waited for approval), then patched once.
    assert [m for m, _ in sim.writes()] == ["PATCH", "PATCH"]
    for op in ops:
        assert op is not None
        data = FdData.read(op.data)
        assert data.after is not None and data.after.package_status == "INACTIVE" and data.attempted_at is None
