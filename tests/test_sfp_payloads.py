"""Upgrade safety for sfp tasks: rows written by release 2 load, round-trip and run to the end.

``tests/fixtures/operations_r2_sfp.json`` holds ``operations`` rows captured from the release-2
code running in the sandbox, one per state and data shape (approval, submit attempts, progress,
results cut or whole, task errors, runs, stop records, the transient-problem note).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from bot.clients.sfp import SfpClient
from bot.sandbox.embedded import Sandbox, running_sandbox
from bot.sfp.payloads import SfpData, SfpParams
from bot.store import repo
from bot.store.models import Operation, OpState
from tests.helpers import CHANNEL
from tests.test_sfp_e2e import ALICE, BOB, card, click, done, sfp, sfp_sim, shows, thread, tune, wait_for

ROWS: dict[str, dict[str, Any]] = json.loads(
    (Path(__file__).parent / "fixtures" / "operations_r2_sfp.json").read_text()
)


@pytest.mark.parametrize("label", sorted(ROWS))
def test_every_release_2_row_validates_and_round_trips(label: str) -> None:
    row = ROWS[label]
    for model, column in ((SfpParams, "params"), (SfpData, "data")):
        dumped = model.read(row[column]).dump()
        assert dumped.pop("v") == 1
        assert dumped == row[column], (label, column)


def test_the_captured_rows_cover_every_state_and_shape() -> None:
    states = {row["state"] for row in ROWS.values()}
    assert states == {s.value for s in OpState}
    keys = {key for row in ROWS.values() for key in row["data"]}
    assert keys >= set(SfpData.model_fields) - {"v", "current_step"}, set(SfpData.model_fields) - keys
    submits = {row["data"]["submit"]["state"] for row in ROWS.values() if "submit" in row["data"]}
    assert submits == {"accepted", "not_sent", "uncertain", "refused"}


def test_a_typed_read_keeps_the_meaning_of_old_keys() -> None:
    stopped = SfpData.read(ROWS["ended_recurring_stopped"]["data"])
    assert stopped.stopped and stopped.stop is not None and stopped.ended_by == stopped.stop.by
    assert stopped.total_done == len(stopped.runs) == 2 and stopped.runs[0].number == 1
    cut = SfpData.read(ROWS["succeeded_result_text_cut"]["data"])
    assert isinstance(cut.stored_result, str) and cut.stored_result.endswith("larger than the bot keeps)")
    never_sent = SfpData.read(ROWS["canceled_never_sent"]["data"])
    assert never_sent.run_counts is None and never_sent.cancel_requested_by == ALICE
    params = SfpParams.read(ROWS["running_recurring"]["params"])
    assert params.recurring and params.every == timedelta(minutes=1)


# -- rows written by release 2, advanced by this one ------------------------------------------------


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with running_sandbox(workdir=tmp_path, job_seconds=0.01, subscribers=20) as running:
        tune(sfp_sim(running))
        yield running


async def insert(sandbox: Sandbox, label: str, **changes: Any) -> Operation:
    """The captured row as a new operation of this sandbox: no card yet, due now."""
    row = {**ROWS[label], **changes}
    for name in ("id", "card_ts", "card_digest", "lease_owner", "lease_expires_at", "announced_state"):
        row.pop(name, None)
    times = ("scheduled_for", "next_poll_at", "approval_expires_at", "created_at", "updated_at", "finished_at")
    for name in times:
        if isinstance(row.get(name), str):
            row[name] = datetime.fromisoformat(row[name])
    row.update(channel=CHANNEL, idempotency_key=f"r2:{label}", next_poll_at=datetime.now(UTC))
    assert sandbox.runtime is not None
    op, created = await repo.insert_operation(sandbox.runtime.db, operation=Operation(**row))
    assert created
    return op


async def submitted_directly(sandbox: Sandbox, params: dict[str, Any]) -> str:
    """The task as release 2 had already submitted it: the sfp server is running it."""
    sim = sfp_sim(sandbox)
    async with aiohttp.ClientSession() as session:
        client = SfpClient(session=session, base_url=sim.url, token=SecretStr(sim.token))
        return (await client.submit(SfpParams.read(params).spec())).operation_id


async def test_rows_written_by_release_2_are_advanced_to_completion(sandbox: Sandbox) -> None:
    # Approved, its first submit refused (wrong token): submitted now, and it completes.
    starting = await insert(sandbox, "starting_approved_auth_backoff")
    op = await done(sandbox, starting.ref, OpState.SUCCEEDED)
    data = SfpData.of(op)
    assert data.approved_by == [BOB] and data.approval is not None and data.last_problem is None
    assert data.submit is not None and data.submit.state == "accepted" and data.result is not None

    # Waiting for approval: Bob approves the card, then it runs.
    waiting = await insert(
        sandbox, "awaiting_approval", approval_expires_at=(datetime.now(UTC) + timedelta(hours=1)).isoformat()
    )
    waiting = await wait_for(sandbox, waiting.ref, lambda o: o.card_ts is not None)
    assert "You approved" in await click(sandbox, waiting, "Approve", user=BOB)
    await done(sandbox, waiting.ref, OpState.SUCCEEDED)

    # Running on the sfp server when the bot was upgraded: followed to its result.
    params = ROWS["running_review_env"]["params"]
    running = await insert(sandbox, "running_review_env", external_id=await submitted_directly(sandbox, params))
    op = await done(sandbox, running.ref, OpState.SUCCEEDED)
    assert "sandboxName" in card(sandbox, op) and SfpData.of(op).progress == 100

    # A recurring task with two runs reported: new runs are reported from #3 on; then stopped.
    until = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    params = {**ROWS["running_recurring"]["params"], "until": until}
    recurring = await insert(
        sandbox,
        "running_recurring",
        params=params,
        data={**ROWS["running_recurring"]["data"], "end_date": until},
        external_id=await submitted_directly(sandbox, params),
    )
    op = await wait_for(sandbox, recurring.ref, lambda o: (SfpData.of(o).run_counts or {}).get("completed", 0) >= 4)
    assert await shows(sandbox, op, "Runs so far")
    assert f"{recurring.ref} is stopped" in await sfp(sandbox, f"stop {recurring.ref}")
    op = await done(sandbox, recurring.ref, OpState.SUCCEEDED, OpState.FAILED)
    replies = thread(sandbox, op)
    assert not any(r.startswith(("✅ Run #1 ", "✅ Run #2 ")) for r in replies), replies  # reported by release 2
    assert any(r.startswith("✅ Run #3 ") for r in replies)
    stop = SfpData.of(op).stop
    assert stop is not None and stop.by == ALICE
