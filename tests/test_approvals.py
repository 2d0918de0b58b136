"""Approval flows beyond the happy path: reject with a reason, expiry, unchanged cards stay unedited."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.cli import main
from bot.core.approvals import ApprovalFacts, requirement_for
from bot.sandbox.embedded import Sandbox, running_sandbox
from bot.settings import ApprovalRule
from bot.store import repo
from bot.store.models import OpState
from tests.helpers import (
    CHANNEL,
    completion_notices,
    full_text,
    push,
    ref_in,
    stale_approve,
    wait_for_op,
    writes,
)

ALICE, BOB, DAVE = "U0ALICE", "U0BOB", "U0DAVE"


async def test_reject_asks_for_a_reason_and_ends_the_push(sandbox: Sandbox) -> None:
    sandbox.packaging.reset_calls()
    ref = ref_in(await push(sandbox, ALICE, "create Acme Billing@1.4.0 --orgs production"))
    op = await wait_for_op(sandbox, ref, card=True)
    seq = len(sandbox.slack.events)
    result = await sandbox.agent.click_label(user=BOB, channel=CHANNEL, label="Reject", message_ts=op.card_ts)
    assert result.status == 200
    view = await sandbox.agent.wait_for_view(user=BOB, after_seq=seq)
    assert view is not None and view.payload["title"]["text"].startswith("Reject")
    submitted = await sandbox.agent.submit_view(user=BOB, view_id=view.id, values={"Reason": "Freeze <!channel> week"})
    assert submitted.status == 200
    op = await wait_for_op(sandbox, ref, states=[OpState.REJECTED], announced=True)
    card = full_text(sandbox.slack.find_message(CHANNEL, op.card_ts or ""))  # type: ignore[arg-type]
    assert "Rejected" in card and "Freeze &lt;!channel&gt; week" in card and "Approve" not in card
    in_thread, notices = completion_notices(sandbox, op)
    assert len(in_thread) == 1 and len(notices) == 1
    assert writes(sandbox.packaging.calls) == []
    # A click from a client still showing the old buttons changes nothing.
    assert "not waiting for approval" in await stale_approve(sandbox, DAVE, op.card_ts or "", op.id or 0)


@pytest.fixture
async def expiring(tmp_path: Path) -> AsyncIterator[Sandbox]:
    rule = ApprovalRule(action="push", org_kind="production", approvers=[BOB], expires="2s")
    async with running_sandbox(workdir=tmp_path, job_seconds=0.01, approval=[rule]) as running:
        yield running


async def test_approval_expires_and_nothing_is_pushed(expiring: Sandbox) -> None:
    sandbox = expiring
    sandbox.packaging.reset_calls()
    ref = ref_in(await push(sandbox, ALICE, "create Acme Billing@1.4.0 --orgs production"))
    op = await wait_for_op(sandbox, ref, card=True)
    op = await wait_for_op(sandbox, ref, states=[OpState.EXPIRED], announced=True, timeout=20)
    assert "not waiting for approval any more (it is expired)" in await stale_approve(
        sandbox, BOB, op.card_ts or "", op.id or 0
    )
    card = full_text(sandbox.slack.find_message(CHANNEL, op.card_ts or ""))  # type: ignore[arg-type]
    assert "Approval expired" in card and "Approve" not in card
    assert writes(sandbox.packaging.calls) == []


async def test_card_is_edited_only_when_it_changes(sandbox: Sandbox) -> None:
    ref = ref_in(await push(sandbox, ALICE, "create Acme Billing@1.4.0 --orgs sandbox"))
    op = await wait_for_op(sandbox, ref, states=[OpState.SUCCEEDED, OpState.FAILED], announced=True)
    await asyncio.sleep(2.5)  # a few idle poll cycles
    card = sandbox.slack.find_message(CHANNEL, op.card_ts or "")
    assert card is not None
    versions = [(v.text, json.dumps(v.blocks, sort_keys=True)) for v in card.history]
    assert all(a != b for a, b in itertools.pairwise(versions)), "an update changed nothing"
    updates = [p for name, p in sandbox.slack.calls if name == "chat.update" and p.get("ts") == op.card_ts]
    assert len(updates) == len(card.history) - 1


def test_audit_export_csv_and_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def make_rows() -> None:
        async with running_sandbox(workdir=tmp_path, job_seconds=0.01) as sandbox:
            await push(sandbox, ALICE, "create Acme Billing@1.4.0 --orgs bogus")
            await push(sandbox, ALICE, "list")

    asyncio.run(make_rows())
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'chatops.db'}")
    assert main(["audit", "--format", "json"]) == 0
    rows = sorted(json.loads(capsys.readouterr().out), key=lambda row: row["detail"])
    assert [r["detail"] for r in rows] == ["/push create Acme Billing@1.4.0 --orgs bogus", "/push list"]
    assert rows[0]["outcome"].startswith("refused") and rows[1]["outcome"] == "ok" and rows[0]["actor"] == ALICE
    out = tmp_path / "audit.csv"
    assert main(["audit", "--format", "csv", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "id,at,actor,channel,operation_ref,action,detail,outcome" and len(lines) == 3


# -- issue 12: approvals fail closed ------------------------------------------------------------

PRODUCTION_DEPLOY = ApprovalFacts(action="deploy", org="prod", org_kinds=frozenset({"production"}))


def test_finding_1_rules_for_an_action_never_drop_the_minimum_where_none_matches() -> None:
    rules = [ApprovalRule(action="deploy", org="uat", approvers=[BOB])]
    requirement = requirement_for(PRODUCTION_DEPLOY, rules)
    assert requirement is not None and requirement.count == 1 and not requirement.self_approval
    assert requirement.rule == "built-in minimum"
    fd_delete = ApprovalFacts(action="fd_delete", org="101", package="Release 40")
    requirement = requirement_for(fd_delete, [ApprovalRule(action="fd_delete", package="Protected", approvers=[DAVE])])
    assert requirement is not None and requirement.count == 1 and requirement.approvers == ()


def test_finding_1_the_strictest_matching_rule_wins_over_a_waiver() -> None:
    waiver = ApprovalRule(action="deploy", org="prod", count=0, waiver="hotfix org")
    strict = ApprovalRule(action="deploy", org_kind="production", approvers=[BOB, DAVE], count=2)
    for rules in ([waiver, strict], [strict, waiver]):
        requirement = requirement_for(PRODUCTION_DEPLOY, rules)
        assert requirement is not None and requirement.count == 2 and requirement.waiver is None
    alone = requirement_for(PRODUCTION_DEPLOY, [waiver])
    assert (
        alone is not None and alone.count == 0 and alone.waiver == "hotfix org" and alone.rule == "rule #1 for deploy"
    )
    # Outside the minimum nothing changes: no matching rule, no approval.
    sandbox_deploy = ApprovalFacts(action="deploy", org="uat", org_kinds=frozenset({"sandbox"}))
    assert requirement_for(sandbox_deploy, [strict]) is None


@pytest.fixture
async def no_production_approvers(tmp_path: Path) -> AsyncIterator[Sandbox]:
    rules = [ApprovalRule(action="push", org_kind="sandbox", approvers=[BOB])]
    async with running_sandbox(workdir=tmp_path, job_seconds=0.01, subscribers=40, approval=rules) as running:
        yield running


async def test_finding_4a_production_push_without_named_approvers_is_refused(no_production_approvers: Sandbox) -> None:
    sandbox = no_production_approvers
    sandbox.packaging.reset_calls()
    answer = await push(sandbox, ALICE, "create Acme Billing@1.4.0 --orgs all")
    assert "Nobody is configured to approve push upgrades that include production orgs" in answer
    assert 'add approvers = ["U…"] to an [[approval]] rule with action = "push", org_kind = "production"' in answer
    assert writes(sandbox.packaging.calls) == []
    assert sandbox.runtime is not None
    db = sandbox.runtime.db
    assert await repo.count_operations(db) == 0
    rows = await repo.audit_events(db)
    assert [row.outcome.split(":")[0] for row in rows] == ["refused"]
    # Sandbox-only pushes are not production actions: their own rule applies.
    ref = ref_in(await push(sandbox, ALICE, "create Acme Billing@1.4.0 --orgs sandbox"))
    op = await wait_for_op(sandbox, ref, card=True)
    assert op.state == OpState.AWAITING_APPROVAL and op.data["approval"]["approvers"] == [BOB]


@pytest.fixture
async def waived_pushes(tmp_path: Path) -> AsyncIterator[Sandbox]:
    rules = [ApprovalRule(action="push", org_kind="production", count=0, waiver="nightly patch train")]
    async with running_sandbox(workdir=tmp_path, job_seconds=0.01, subscribers=40, approval=rules) as running:
        yield running


async def test_finding_1_a_waiver_is_shown_on_the_card_and_written_to_the_audit(waived_pushes: Sandbox) -> None:
    sandbox = waived_pushes
    ref = ref_in(await push(sandbox, ALICE, "create Acme Billing@1.4.0 --orgs all"))
    op = await wait_for_op(sandbox, ref, states=[OpState.SUCCEEDED, OpState.FAILED], card=True)
    card = full_text(sandbox.slack.find_message(CHANNEL, op.card_ts or ""))  # type: ignore[arg-type]
    assert "Waiver (rule #1 for push): no approval needed, because nightly patch train" in card
    assert sandbox.runtime is not None
    rows = [row for row in await repo.audit_events(sandbox.runtime.db) if row.action == "approval.waived"]
    assert [(row.actor, row.operation_ref, row.detail) for row in rows] == [
        (ALICE, ref, "rule #1 for push: nightly patch train")
    ]
