"""One workspace (issue 12, finding 4b): requests signed with the app's secret but naming another
workspace's team are acknowledged, refused and audited; they never run."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlmodel import select

from bot.runtime import build_runtime
from bot.sandbox.embedded import Sandbox, running_sandbox
from bot.store import repo
from bot.store.models import Approval, AuditEvent, OpState
from tests.helpers import CHANNEL, click, ephemerals, eventually, push, ref_in, wait_for_op

ALICE, BOB = "U0ALICE", "U0BOB"
OTHER_TEAM = "T0OTHERTEAM"
REFUSED = "refused: another workspace"


@contextmanager
def as_team(sandbox: Sandbox, team_id: str) -> Iterator[None]:
    """Requests signed exactly as before, but naming ``team_id`` wherever Slack puts the team."""
    own = sandbox.agent.team_id
    sandbox.agent.team_id = team_id
    try:
        yield
    finally:
        sandbox.agent.team_id = own


async def refusals(sandbox: Sandbox) -> Sequence[AuditEvent]:
    assert sandbox.runtime is not None
    return [event for event in await repo.audit_events(sandbox.runtime.db) if event.outcome == REFUSED]


async def approvals_of(sandbox: Sandbox, operation_id: int) -> Sequence[Approval]:
    assert sandbox.runtime is not None
    async with sandbox.runtime.db.session() as session:
        return (await session.exec(select(Approval).where(Approval.operation_id == operation_id))).all()


async def test_finding_4b_approve_click_from_another_workspace_is_not_recorded(sandbox: Sandbox) -> None:
    ref = ref_in(await push(sandbox, ALICE, "create Acme Billing@1.4.0 --orgs all"))
    op = await wait_for_op(sandbox, ref, card=True)
    assert op.state == OpState.AWAITING_APPROVAL and op.card_ts is not None
    bob_saw = len(ephemerals(sandbox, BOB))

    with as_team(sandbox, OTHER_TEAM):
        result = await sandbox.agent.click_label(user=BOB, channel=CHANNEL, label="Approve", message_ts=op.card_ts)
    assert result.status == 200 and result.body == ""  # acknowledged, so Slack shows no error

    audited = await eventually(lambda: refusals(sandbox), until=lambda rows: len(rows) == 1)
    assert [(row.actor, row.action) for row in audited] == [(BOB, "action")]
    assert OTHER_TEAM in audited[0].detail
    assert (await wait_for_op(sandbox, ref)).state == OpState.AWAITING_APPROVAL  # still waiting
    assert await approvals_of(sandbox, op.id or 0) == []
    assert len(ephemerals(sandbox, BOB)) == bob_saw

    # The same click from the bot's own workspace counts: the refusal above was the team id alone.
    assert "approv" in (await click(sandbox, BOB, op, "Approve")).lower()
    assert len(await approvals_of(sandbox, op.id or 0)) == 1


async def test_finding_4b_command_from_another_workspace_creates_nothing(sandbox: Sandbox) -> None:
    sandbox.packaging.reset_calls()
    before = len(ephemerals(sandbox, ALICE))
    with as_team(sandbox, OTHER_TEAM):
        result = await sandbox.agent.command(
            user=ALICE, channel=CHANNEL, command="/push", text="create Acme Billing@1.4.0 --orgs sandbox"
        )
    assert result.status == 200
    assert "only the workspace it is installed in" in result.text  # the ack itself, shown to her alone
    assert result.ack_message is not None and result.ack_message.ephemeral_for == ALICE

    audited = await eventually(lambda: refusals(sandbox), until=lambda rows: len(rows) == 1)
    assert [(row.actor, row.channel, row.action) for row in audited] == [(ALICE, CHANNEL, "command")]
    assert audited[0].detail.startswith("/push create Acme Billing@1.4.0")
    assert sandbox.runtime is not None
    assert await repo.count_operations(sandbox.runtime.db) == 0
    assert sandbox.packaging.calls == []  # not even the version was looked up
    assert len(ephemerals(sandbox, ALICE)) == before + 1  # the refusal


async def test_commands_from_the_bot_s_own_workspace_still_run(sandbox: Sandbox) -> None:
    assert "Dry run — nothing created" in await push(sandbox, ALICE, "create Acme Billing@1.4.0 --orgs all --dry-run")
    assert await refusals(sandbox) == []


async def test_the_bot_does_not_start_without_knowing_its_workspace(tmp_path: Path) -> None:
    async with running_sandbox(workdir=tmp_path, start_bot=False) as sandbox:
        settings = sandbox.settings.model_copy(update={"slack_bot_token": SecretStr("xoxb-not-this-workspace")})
        with pytest.raises(
            ValueError, match=r"SLACK_BOT_TOKEN: Slack's auth.test refused it \(invalid_auth\)"
        ) as refused:
            await build_runtime(settings)
        assert "xoxb-not-this-workspace" not in str(refused.value)
        assert [name for name, _ in sandbox.slack.calls] == ["auth.test"]  # it asked, then stopped
