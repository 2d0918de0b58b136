"""Handler concerns in process: signed requests dispatched straight to the runtime's Bolt app
(``app.async_dispatch``, no HTTP server), as bolt-python's own scenario tests do.

The simulators and the fake Slack still answer over 127.0.0.1 (the bot's ``respond`` and Web API
calls go there); only the way in is shortened. The end-to-end files keep the whole path.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.response import BoltResponse

from bot.runtime import Runtime, build_runtime
from bot.sandbox.embedded import Sandbox, running_sandbox
from bot.sandbox.fake_slack import Message
from bot.settings import AccessRule
from bot.store import repo
from bot.store.models import AuditEvent, OpKind
from tests.helpers import CHANNEL, full_text

ALICE, CAROL = "U0ALICE", "U0CAROL"


@dataclass
class Bot:
    sandbox: Sandbox
    runtime: Runtime

    async def command(
        self, user: str, command: str, text: str, *, trigger_id: str | None = None, retry_num: int | None = None
    ) -> BoltResponse:
        """Dispatch ``command text`` as Slack delivers it, and wait for the work after the ack."""
        slack = self.sandbox.slack
        form = {
            "team_id": self.sandbox.agent.team_id,
            "channel_id": CHANNEL,
            "channel_name": "releases",
            "user_id": user,
            "user_name": slack.users[user]["name"],
            "command": command,
            "text": text,
            "api_app_id": self.sandbox.agent.api_app_id,
            "response_url": slack.response_url_for(channel=CHANNEL, user=user, kind="commands"),
            "trigger_id": trigger_id or slack.issue_trigger_id(user),
        }
        return await self._dispatch(urlencode(form), retry_num=retry_num)

    async def click(self, user: str, action_id: str, value: str) -> BoltResponse:
        """Dispatch a click on a card button, as Slack delivers a ``block_actions`` payload."""
        slack = self.sandbox.slack
        team = self.sandbox.agent.team_id
        payload = {
            "type": "block_actions",
            "team": {"id": team},
            "user": {"id": user, "team_id": team},
            "api_app_id": self.sandbox.agent.api_app_id,
            "channel": {"id": CHANNEL},
            "container": {"type": "message", "channel_id": CHANNEL, "message_ts": "1.000001"},
            "trigger_id": slack.issue_trigger_id(user),
            "response_url": slack.response_url_for(channel=CHANNEL, user=user, kind="actions"),
            "actions": [{"type": "button", "action_id": action_id, "block_id": "b", "value": value}],
        }
        return await self._dispatch(urlencode({"payload": json.dumps(payload)}), retry_num=None)

    async def _dispatch(self, body: str, *, retry_num: int | None) -> BoltResponse:
        timestamp = str(int(time.time()))
        base = f"v0:{timestamp}:{body}".encode()
        signature = hmac.new(self.sandbox.signing_secret.encode(), base, hashlib.sha256).hexdigest()
        headers = {
            "content-type": "application/x-www-form-urlencoded",
            "x-slack-request-timestamp": timestamp,
            "x-slack-signature": f"v0={signature}",
        }
        if retry_num is not None:
            headers |= {"x-slack-retry-num": str(retry_num), "x-slack-retry-reason": "http_timeout"}
        response = await self.runtime.app.async_dispatch(AsyncBoltRequest(body=body, headers=headers))
        await self.runtime.ack_first.drain(timeout=20.0)
        return response

    def seen_by(self, user: str) -> list[Message]:
        """Ephemeral messages shown to ``user`` in the channel."""
        return [m for m in self.sandbox.slack.messages.get(CHANNEL, []) if m.ephemeral_for == user]

    def in_channel(self) -> list[Message]:
        return [m for m in self.sandbox.slack.messages.get(CHANNEL, []) if m.ephemeral_for is None]

    async def audit(self) -> list[AuditEvent]:
        return list(await repo.audit_events(self.runtime.db))


@pytest.fixture
async def bot(tmp_path: Path) -> AsyncIterator[Bot]:
    """/push restricted to Alice; the runtime built as ``bot.runtime`` builds it, its poller off."""
    access = {"push": AccessRule(users=[ALICE])}
    async with running_sandbox(
        workdir=tmp_path, job_seconds=0.01, subscribers=20, start_bot=False, access=access
    ) as sandbox:
        runtime = await build_runtime(sandbox.settings)
        try:
            yield Bot(sandbox=sandbox, runtime=runtime)
        finally:
            await runtime.close()


async def test_a_parse_error_is_answered_in_the_ack_with_usage_and_audited(bot: Bot) -> None:
    response = await bot.command(ALICE, "/push", "promote Acme Billing@1.4.0")

    assert response.status == 200
    answer = response.body  # Bolt sends an ack with text only as plain text
    assert "Unknown subcommand `promote`" in answer and "/push create" in answer  # the usage follows
    assert bot.seen_by(ALICE) == []  # the ack was the whole answer
    [row] = await bot.audit()
    assert (row.actor, row.channel, row.action) == (ALICE, CHANNEL, "command")
    assert row.detail == "/push promote Acme Billing@1.4.0" and row.outcome.startswith("refused: ")


async def test_an_access_refusal_is_ephemeral_and_audited(bot: Bot) -> None:
    response = await bot.command(CAROL, "/push", "list")

    assert (response.status, response.body) == (200, "")  # acked empty; the refusal follows
    [refusal] = bot.seen_by(CAROL)
    assert "You are not allowed to use `/push`" in full_text(refusal)
    assert bot.in_channel() == []
    [row] = await bot.audit()
    assert (row.actor, row.action, row.detail) == (CAROL, "command", "/push list")
    assert row.outcome.startswith("refused: ")


async def test_a_command_leaves_an_audit_row_and_answers_only_the_user(bot: Bot) -> None:
    await bot.command(ALICE, "/push", "help")

    [answer] = bot.seen_by(ALICE)
    assert "/push create" in full_text(answer)
    assert bot.in_channel() == []
    assert [(row.actor, row.channel, row.action, row.detail, row.outcome) for row in await bot.audit()] == [
        (ALICE, CHANNEL, "command", "/push help", "ok")
    ]


async def test_a_change_is_acknowledged_to_the_user_and_left_to_the_poller(bot: Bot) -> None:
    """Every /fd change is an operation: the listener records it and says where it will be posted;
    the card in the channel is the poller's (off here), so nothing is posted by the listener."""
    await bot.command(ALICE, "/fd", 'create 101 "Listener Test" --files "/src/classes/ListenerTest.cls"')

    [ack] = bot.seen_by(ALICE)
    assert "F1 (" in full_text(ack) and "is being sent to FlexDeploy" in full_text(ack)
    assert bot.in_channel() == []
    actions = [(row.action, row.operation_ref, row.outcome) for row in await bot.audit()]
    assert actions == [("fd.create", "F1", "starting"), ("command", "", "ok")]


async def test_slack_retries_of_a_command_create_nothing_twice(bot: Bot) -> None:
    trigger = bot.sandbox.slack.issue_trigger_id(ALICE)
    text = "create Acme Billing@1.4.0 --orgs sandbox"

    first = await bot.command(ALICE, "/push", text, trigger_id=trigger)
    retried = await bot.command(ALICE, "/push", text, trigger_id=trigger, retry_num=1)
    again = await bot.command(ALICE, "/push", text, trigger_id=trigger, retry_num=2)

    assert [r.status for r in (first, retried, again)] == [200, 200, 200]
    pushes = await repo.list_operations(bot.runtime.db, kind=OpKind.PUSH)
    assert len(pushes) == 1
    creations = [row for row in await bot.audit() if row.action == "push.create"]
    assert len(creations) == 2  # the first delivery and the first retry; the second retry was dropped
    assert {row.operation_ref for row in creations} == {pushes[0].ref}
    assert len(bot.seen_by(ALICE)) == 2


async def test_a_card_button_is_access_checked_and_audited_with_its_operation(bot: Bot) -> None:
    """Every card button goes through one frame: the command's access rules, errors audited
    under the button's action with the operation it names (0 when its value is not a number)."""
    await bot.click(CAROL, "push_cancel", "7")
    await bot.click(ALICE, "push_cancel", "not-a-number")

    [refusal] = bot.seen_by(CAROL)
    assert "You are not allowed to use `/push`" in full_text(refusal)
    assert len(bot.seen_by(ALICE)) == 1  # no operation 0: a refusal, not a crash
    rows = [(row.actor, row.channel, row.action, row.detail) for row in await bot.audit()]
    assert rows == [
        (CAROL, CHANNEL, "push.cancel", "operation 7"),
        (ALICE, CHANNEL, "push.cancel", "operation 0"),
    ]
    outcomes = [row.outcome for row in await bot.audit()]
    assert all(outcome.startswith("refused: ") for outcome in outcomes), outcomes
