"""``[access]`` rules end to end (SPEC §9): signed Slack requests → the real bot → the simulators.

A refused command or click must answer the user ephemerally with the reason, leave exactly one
``refused`` audit row, and reach no simulated system at all (no Salesforce, Metadata API, sfp
or FlexDeploy call, no artifact download) and create no operation.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.sandbox.embedded import Sandbox, running_sandbox
from bot.sandbox.fake_slack import Message
from bot.settings import AccessRule
from bot.store import repo
from bot.store.models import AuditEvent, Operation, OpState
from tests.helpers import CHANNEL, full_text

ALICE, BOB, CAROL, DAVE = "U0ALICE", "U0BOB", "U0CAROL", "U0DAVE"
RELEASE_MANAGERS = "S0RELEASE"  # a Slack user group
OTHER_CHANNEL = "C0RANDOM"
NOT_ALLOWED = "You are not allowed to use `/{command}`"


def rules() -> dict[str, AccessRule]:
    return {
        "push": AccessRule(users=[ALICE], usergroups=[RELEASE_MANAGERS]),
        "deploy": AccessRule(users=[ALICE]),
        "sfp": AccessRule(users=[ALICE]),
        "fd": AccessRule(users=[ALICE], channels=[CHANNEL]),
    }


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[Sandbox]:
    """Every command restricted to Alice (and /push also to the release-managers group: Bob)."""
    async with running_sandbox(workdir=tmp_path, job_seconds=0.01, subscribers=40, access=rules()) as running:
        running.slack.usergroups = {RELEASE_MANAGERS: [BOB, DAVE]}
        running.slack.add_channel(OTHER_CHANNEL, "random")
        yield running


def answers(sandbox: Sandbox, user: str, channel: str) -> list[Message]:
    return [m for m in sandbox.slack.messages.get(channel, []) if m.ephemeral_for == user]


async def next_answer(sandbox: Sandbox, user: str, channel: str, before: int) -> str:
    found = await sandbox.slack.wait_for(
        lambda: answers(sandbox, user, channel)[before] if len(answers(sandbox, user, channel)) > before else None,
        20,
    )
    assert found is not None, f"no ephemeral answer for {user} in {channel}"
    return full_text(found).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


async def run(sandbox: Sandbox, user: str, command: str, text: str, *, channel: str = CHANNEL) -> str:
    """Run ``/<command> <text>`` as ``user``; the first ephemeral answer, Slack's escapes undone."""
    before = len(answers(sandbox, user, channel))
    result = await sandbox.agent.command(user=user, channel=channel, command=f"/{command}", text=text)
    assert result.status == 200, result
    return await next_answer(sandbox, user, channel, before)


async def click(sandbox: Sandbox, user: str, op: Operation, label: str) -> str:
    before = len(answers(sandbox, user, op.channel))
    result = await sandbox.agent.click_label(user=user, channel=op.channel, label=label, message_ts=op.card_ts)
    assert result.status == 200, result
    return await next_answer(sandbox, user, op.channel, before)


def external_calls(sandbox: Sandbox) -> dict[str, list[Any]]:
    """Every request each simulated system has received so far (copies)."""
    return {
        "packaging org": list(sandbox.packaging.calls),
        "production org": list(sandbox.production.calls),
        "sandbox org": list(sandbox.sandbox_org.calls),
        "sfp": list(sandbox.servers["sfp"].calls),
        "flexdeploy": list(sandbox.servers["flexdeploy"].calls),
        "artifact downloads": list(sandbox.servers["artifacts"].downloads),
    }


def writes_since(before: dict[str, list[Any]], after: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Calls that change something, made between two snapshots (status polls of existing
    operations are reads; the Metadata API, all POSTs, is checked by operation name instead)."""
    changed: dict[str, list[Any]] = {}
    for system, calls in after.items():
        new = calls[len(before[system]) :]
        if system != "artifact downloads":
            new = [
                (method, path)
                for method, path in new
                if method in {"POST", "PUT", "PATCH", "DELETE"} and "/oauth2/" not in path and "/Soap/m/" not in path
            ]
        if new:
            changed[system] = new
    return changed


def soap_operations(sandbox: Sandbox) -> list[str]:
    """Every Metadata API operation the production and sandbox orgs parsed, in order."""
    return [
        request.operation
        for org in (sandbox.production, sandbox.sandbox_org)
        if org.metadata is not None
        for request in org.metadata.requests
    ]


def ref_in(text: str, prefix: str) -> str:
    match = re.search(rf"\b({prefix}\d+)\b", text)
    assert match, text
    return match.group(1)


async def operation(sandbox: Sandbox, ref: str) -> Operation:
    assert sandbox.runtime is not None
    op = await repo.get_operation(sandbox.runtime.db, operation_id=int(ref[1:]))
    assert op is not None
    return op


async def card_with(sandbox: Sandbox, ref: str, label: str, timeout: float = 60.0) -> Operation:
    """The operation once its status card is posted and shows a button labelled ``label``."""
    deadline = time.monotonic() + timeout
    while True:
        op = await operation(sandbox, ref)
        message = sandbox.slack.find_message(op.channel, op.card_ts or "") if op.card_ts else None
        if message is not None:
            labels = [
                str(element.get("text", {}).get("text", ""))
                for block in message.blocks or []
                if block.get("type") == "actions"
                for element in block.get("elements", [])
            ]
            if label in labels:
                return op
        shown = full_text(message) if message is not None else "no card"
        assert time.monotonic() < deadline, f"{ref} never showed a {label!r} button ({op.state}): {shown}"
        await asyncio.sleep(0.05)


async def audit_of(sandbox: Sandbox, user: str, *, at_least: int = 0) -> list[AuditEvent]:
    """The user's audit rows, once there are ``at_least`` (an "ok" row is written after the answer)."""
    assert sandbox.runtime is not None
    deadline = time.monotonic() + 5
    while True:
        rows = [row for row in await repo.audit_events(sandbox.runtime.db) if row.actor == user]
        if len(rows) >= at_least or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.05)


async def operations(sandbox: Sandbox) -> int:
    assert sandbox.runtime is not None
    return await repo.count_operations(sandbox.runtime.db)


# --------------------------------------------------------------------------- commands


@pytest.mark.parametrize(
    ("command", "text"),
    [
        ("push", "create Acme Billing@1.4.0 --orgs sandbox"),
        ("deploy", "start uat good-release.zip"),
        ("sfp", "submit checkReviewEnvironment env=rev1"),
        ("fd", 'create 101 "Access Test" --files "/src/classes/AccessTest.cls"'),
    ],
)
async def test_a_user_not_listed_is_refused_and_nothing_happens(guarded: Sandbox, command: str, text: str) -> None:
    sandbox = guarded
    before = external_calls(sandbox)
    answer = await run(sandbox, CAROL, command, text)
    assert NOT_ALLOWED.format(command=command) in answer, answer
    assert "Something went wrong" not in answer
    assert external_calls(sandbox) == before  # not even a read: refused before any call
    assert await operations(sandbox) == 0
    rows = await audit_of(sandbox, CAROL)
    assert len(rows) == 1, [(r.action, r.outcome) for r in rows]
    assert rows[0].action == "command" and rows[0].detail == f"/{command} {text}"
    assert rows[0].outcome.startswith("refused") and "not allowed" in rows[0].outcome
    assert rows[0].channel == CHANNEL

    # The same command from someone the rule lists goes through (the refusal was about the user).
    allowed = await run(sandbox, ALICE, command, text)
    assert "not allowed" not in allowed, allowed
    assert await sandbox.slack.wait_for(lambda: external_calls(sandbox) != before or None, 10)


async def test_a_command_from_a_channel_not_listed_is_refused(guarded: Sandbox) -> None:
    sandbox = guarded
    before = external_calls(sandbox)
    text = 'create 101 "Access Test" --files "/src/classes/AccessTest.cls"'
    answer = await run(sandbox, ALICE, "fd", text, channel=OTHER_CHANNEL)
    assert f"`/fd` can only be used in these channels: {CHANNEL}" in answer, answer
    assert external_calls(sandbox) == before
    assert sandbox.servers["flexdeploy"].package(101, "Access Test") is None
    rows = await audit_of(sandbox, ALICE)
    assert [(r.action, r.channel) for r in rows] == [("command", OTHER_CHANNEL)]
    assert rows[0].outcome.startswith("refused") and "can only be used" in rows[0].outcome
    # In the listed channel Alice's same command creates the package (the poller makes the change
    # and says so on its card).
    assert "is being sent to FlexDeploy" in await run(sandbox, ALICE, "fd", text)
    done = "Done: create `Access Test`"
    card = await sandbox.slack.wait_for(
        lambda: next((m for m in sandbox.slack.messages.get(CHANNEL, []) if done in full_text(m)), None), 15
    )
    assert card is not None
    assert sandbox.servers["flexdeploy"].package(101, "Access Test") is not None


async def test_a_member_of_a_listed_user_group_is_let_in(guarded: Sandbox) -> None:
    sandbox = guarded
    answer = await run(sandbox, BOB, "push", "create Acme Billing@1.4.0 --orgs sandbox --dry-run")
    assert "not allowed" not in answer and "Dry run" in answer, answer
    assert sandbox.slack.calls_to("usergroups.users.list"), "membership was read from Slack"
    rows = await audit_of(sandbox, BOB, at_least=1)
    assert [(r.action, r.outcome) for r in rows] == [("command", "ok")]
    # The group only counts where the rule names it: /deploy lists users only.
    assert NOT_ALLOWED.format(command="deploy") in await run(sandbox, BOB, "deploy", "list")


async def test_a_user_group_slack_cannot_read_lets_nobody_in_and_does_not_crash(tmp_path: Path) -> None:
    async with running_sandbox(workdir=tmp_path, job_seconds=0.01, subscribers=40, access=rules()) as sandbox:
        assert sandbox.slack.usergroups is None  # a free workspace: plan_upgrade_required
        before = external_calls(sandbox)
        answer = await run(sandbox, BOB, "push", "create Acme Billing@1.4.0 --orgs sandbox")
        assert NOT_ALLOWED.format(command="push") in answer and "Something went wrong" not in answer, answer
        lookups = sandbox.slack.calls_to("usergroups.users.list")
        assert [call.get("usergroup") for call in lookups] == [RELEASE_MANAGERS]
        assert external_calls(sandbox) == before and await operations(sandbox) == 0
        rows = await audit_of(sandbox, BOB)
        assert len(rows) == 1 and rows[0].outcome.startswith("refused"), [(r.action, r.outcome) for r in rows]
        # Users listed by id still work without user groups.
        assert "Dry run" in await run(sandbox, ALICE, "push", "create Acme Billing@1.4.0 --orgs sandbox --dry-run")


async def test_commands_without_a_rule_are_unaffected(tmp_path: Path) -> None:
    access = {"push": AccessRule(users=[ALICE]), "sfp": AccessRule(channels=[CHANNEL])}
    async with running_sandbox(workdir=tmp_path, job_seconds=0.01, subscribers=40, access=access) as sandbox:
        sandbox.slack.add_channel(OTHER_CHANNEL, "random")
        shown = await run(sandbox, CAROL, "fd", 'show 101 "Release 42"', channel=OTHER_CHANNEL)
        assert "Release 42" in shown and "not allowed" not in shown, shown
        assert "`prod` (production)" in await run(sandbox, CAROL, "deploy", "orgs", channel=OTHER_CHANNEL)
        # A rule with channels only lets anyone in, in those channels.
        assert "can only be used" not in await run(sandbox, CAROL, "sfp", "list")
        assert f"can only be used in these channels: {CHANNEL}" in await run(
            sandbox, CAROL, "sfp", "list", channel=OTHER_CHANNEL
        )
        assert NOT_ALLOWED.format(command="push") in await run(sandbox, CAROL, "push", "list")
        rows = await audit_of(sandbox, CAROL, at_least=5)
        assert sorted(r.outcome.split(":")[0] for r in rows) == ["ok", "ok", "ok", "refused", "refused"]


# --------------------------------------------------------------------------- buttons


async def test_buttons_apply_the_same_rules_as_the_commands(guarded: Sandbox) -> None:
    """Cancel / Stop / Quick deploy on cards Alice created: Carol may not press them; Alice may."""
    sandbox = guarded
    # Each card in its own channel: Slack paces posts per channel, and /fd is limited to CHANNEL.
    for name in ("push", "deploy", "validation", "sfp", "recurring"):
        sandbox.slack.add_channel(f"C0{name.upper()}", name)

    async def requested(command: str, text: str, channel: str, prefix: str) -> str:
        return ref_in(await run(sandbox, ALICE, command, text, channel=channel), prefix)

    push_ref, deploy_ref, validation_ref, sfp_ref, stop_ref, fd_ref = await asyncio.gather(
        requested("push", "create Acme Billing@1.4.0 --orgs production", "C0PUSH", "P"),
        requested("deploy", "start prod good-release.zip", "C0DEPLOY", "D"),
        requested("deploy", "validate uat good-release.zip --test-level RunLocalTests", "C0VALIDATION", "D"),
        requested("sfp", "submit checkReviewEnvironment env=rev1 --at +2h", "C0SFP", "S"),
        requested("sfp", "submit checkReviewEnvironment env=rev2 --every 1h --at +2h", "C0RECURRING", "S"),
        requested("fd", 'status 101 "Release 42" COMPLETED', CHANNEL, "F"),
    )
    cards = [
        (push_ref, "Cancel", "push", "push.cancel"),
        (deploy_ref, "Cancel", "deploy", "deploy.cancel"),
        (validation_ref, "Quick deploy", "deploy", "deploy.quick"),
        (sfp_ref, "Cancel", "sfp", "sfp.cancel"),
        (stop_ref, "Stop", "sfp", "sfp.stop"),
        (fd_ref, "Cancel", "fd", "fd.cancel"),
    ]
    found = await asyncio.gather(*(card_with(sandbox, ref, label) for ref, label, _, _ in cards))
    ops = {op.ref: op for op in found}
    count = await operations(sandbox)
    soap_before = len(soap_operations(sandbox))

    before = external_calls(sandbox)
    clicked = await asyncio.gather(*(click(sandbox, CAROL, ops[ref], label) for ref, label, _, _ in cards))
    for (ref, _, command, _), answer in zip(cards, clicked, strict=True):
        assert NOT_ALLOWED.format(command=command) in answer, (ref, answer)
    assert writes_since(before, external_calls(sandbox)) == {}
    assert set(soap_operations(sandbox)[soap_before:]) <= {"checkDeployStatus"}  # no deploy, no cancelDeploy
    assert await operations(sandbox) == count  # no quick deploy was created
    for ref, _, _, _ in cards:
        assert (await operation(sandbox, ref)).state == ops[ref].state, ref
    rows = await audit_of(sandbox, CAROL)
    assert sorted(r.action for r in rows) == sorted(action for _, _, _, action in cards)
    assert all(r.outcome.startswith("refused") and "not allowed" in r.outcome for r in rows)

    # Alice presses the same buttons: they work for her.
    assert f"{push_ref} is canceled" in await click(sandbox, ALICE, ops[push_ref], "Cancel")
    assert f"{fd_ref} is withdrawn" in await click(sandbox, ALICE, ops[fd_ref], "Cancel")
    assert (await operation(sandbox, push_ref)).state in {OpState.CANCELED, OpState.CANCELING}


async def test_the_default_approver_must_be_allowed_to_run_the_command(guarded: Sandbox) -> None:
    """ "Anyone but the requester" means anyone [access] lets run the command: Carol, barred from
    /push, cannot start Alice's production push by approving it; Bob (via the group) can."""
    sandbox = guarded
    ref = ref_in(await run(sandbox, ALICE, "push", "create Acme Billing@1.4.0 --orgs production"), "P")
    op = await card_with(sandbox, ref, "Approve")
    before = external_calls(sandbox)
    answer = await click(sandbox, CAROL, op, "Approve")
    assert "not an approver" in answer, answer
    assert (await operation(sandbox, ref)).state == OpState.AWAITING_APPROVAL
    assert writes_since(before, external_calls(sandbox)) == {}
    rows = [r for r in await audit_of(sandbox, CAROL) if r.action == "approve"]
    assert len(rows) == 1 and rows[0].outcome.startswith("refused")

    assert "You approved" in await click(sandbox, BOB, op, "Approve")  # answered once it is applied
    assert (await operation(sandbox, ref)).state != OpState.AWAITING_APPROVAL
