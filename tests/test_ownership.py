"""Who may read and cancel an operation, and which sfp task types may run (issue 12, findings 8
and 4c), end to end: signed Slack requests → the real bot → the simulators.

Cancel is for the requester, the operation's approvers (listed, or members of a listed user
group) and ``[access] admins``. Reads answer in the operation's channel or to those people, and
elsewhere say where to look and nothing else. An sfp task the bot did not submit is for admins
only. A refusal is ephemeral, audited, and changes nothing anywhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from pydantic import ValidationError

from bot.sandbox.embedded import Sandbox, running_sandbox
from bot.sandbox.sfp_server import SfpServerSim
from bot.settings import ApprovalRule, SfpConfig
from bot.store.models import AuditEvent, OpState
from tests.helpers import CHANNEL, full_text
from tests.test_access import (
    answers,
    audit_of,
    card_with,
    click,
    external_calls,
    operation,
    operations,
    ref_in,
    run,
    writes_since,
)

ALICE, BOB, CAROL, DAVE = "U0ALICE", "U0BOB", "U0CAROL", "U0DAVE"
ADMIN = DAVE
GROUP = "S0SFPAPPROVERS"  # a Slack user group; Bob is its member
OTHER_CHANNEL = "C0RANDOM"
LOOK_ELSEWHERE = "{ref} runs in <#{channel}>; ask there or ask its requester <@{requester}>."
NOT_YOURS = "Only the requester of {ref}, its approvers or a bot admin"
NOT_OURS = "was not submitted by this bot; only a bot admin"


def approval_rules() -> list[ApprovalRule]:
    return [
        ApprovalRule(action="push", org_kind="production", approvers=[BOB], count=1),
        ApprovalRule(action="deploy", org_kind="production", approvers=[BOB], count=1),
        ApprovalRule(action="sfp", task_type="unassignReviewEnvironment", approvers=[GROUP], count=1),
    ]


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with running_sandbox(
        workdir=tmp_path,
        job_seconds=0.01,
        subscribers=40,
        approval=approval_rules(),
        access={"admins": [ADMIN]},
    ) as running:
        running.slack.usergroups = {GROUP: [BOB]}
        running.slack.add_channel(OTHER_CHANNEL, "random")
        sim = sfp_sim(running)
        sim.task_seconds = 0.3
        sim.queue_seconds = 0.1
        yield running


def sfp_sim(sandbox: Sandbox) -> SfpServerSim:
    sim = sandbox.servers["sfp"]
    assert isinstance(sim, SfpServerSim)
    return sim


def raw_answers(sandbox: Sandbox, user: str, channel: str) -> list[str]:
    """Ephemeral texts exactly as Slack received them (mentions render only if not escaped)."""
    return [full_text(m) for m in answers(sandbox, user, channel)]


async def refused_rows(sandbox: Sandbox, user: str, *, at_least: int) -> list[AuditEvent]:
    rows = await audit_of(sandbox, user, at_least=at_least)
    return [row for row in rows if row.outcome.startswith("refused")]


async def wait_state(sandbox: Sandbox, ref: str, states: set[str], timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if (await operation(sandbox, ref)).state in states:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{ref} is {(await operation(sandbox, ref)).state}, wanted {states}")


async def submit_as_ci(sim: SfpServerSim, task_type: str) -> str:
    """A task someone else (CI) submitted straight to the sfp server, with the same token."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{sim.url}/sfp/api/tasks",
            json={"type": task_type, "data": {"env": "ci-1", "status": "Available"}},
            headers={"Authorization": f"Bearer {sim.token}"},
        ) as response,
    ):
        assert response.status == 201, await response.text()
        return str((await response.json())["operationId"])


# --------------------------------------------------------------------------- finding 8: cancel


async def test_finding_8_cancel_of_someone_elses_operation_is_refused_and_changes_nothing(sandbox: Sandbox) -> None:
    """Carol (no role) cannot cancel Alice's production deployment, push, sfp task or FlexDeploy
    request, by command or by button; the requester, a listed approver, a member of a listed
    user group and an admin can."""
    # One after the other: each answer is matched to its command by order.
    push_ref = ref_in(await run(sandbox, ALICE, "push", "create Acme Billing@1.4.0 --orgs production"), "P")
    deploy_ref = ref_in(await run(sandbox, ALICE, "deploy", "start prod good-release.zip"), "D")
    sfp_ref = ref_in(await run(sandbox, ALICE, "sfp", "submit unassignReviewEnvironment env=rev1"), "S")
    fd_ref = ref_in(await run(sandbox, ALICE, "fd", 'status 101 "Release 42" COMPLETED'), "F")
    cards = await asyncio.gather(
        *(card_with(sandbox, ref, "Cancel") for ref in (push_ref, deploy_ref, sfp_ref, fd_ref))
    )
    assert all(op.state == OpState.AWAITING_APPROVAL for op in cards), [(op.ref, op.state) for op in cards]
    count = await operations(sandbox)
    before = external_calls(sandbox)

    commands = [
        ("push", f"cancel {push_ref}", push_ref),
        ("deploy", f"cancel {deploy_ref}", deploy_ref),
        ("sfp", f"cancel {sfp_ref}", sfp_ref),
        ("sfp", f"stop {sfp_ref}", sfp_ref),
        ("fd", f"cancel {fd_ref}", fd_ref),
    ]
    for command, text, ref in commands:
        answer = await run(sandbox, CAROL, command, text)
        assert NOT_YOURS.format(ref=ref) in answer, (text, answer)
    for op in cards:  # the Cancel buttons on the cards, pressed in the operation's own channel
        answer = await click(sandbox, CAROL, op, "Cancel")
        assert NOT_YOURS.format(ref=op.ref) in answer, (op.ref, answer)

    assert writes_since(before, external_calls(sandbox)) == {}
    assert await operations(sandbox) == count
    for op in cards:
        assert (await operation(sandbox, op.ref)).state == OpState.AWAITING_APPROVAL, op.ref
    refused = await refused_rows(sandbox, CAROL, at_least=len(commands) + len(cards))
    assert len(refused) == len(commands) + len(cards), [(r.action, r.outcome) for r in refused]
    assert all("Only the requester" in row.outcome for row in refused)

    # Those it belongs to: Bob is the push's listed approver and in the sfp rule's user group,
    # Dave is an admin, Alice requested the FlexDeploy change.
    assert f"{push_ref} is canceled" in await run(sandbox, BOB, "push", f"cancel {push_ref}", channel=OTHER_CHANNEL)
    assert f"{deploy_ref} is canceled" in await run(sandbox, ADMIN, "deploy", f"cancel {deploy_ref}")
    assert f"{sfp_ref} is cancelled" in await run(sandbox, BOB, "sfp", f"cancel {sfp_ref}")
    assert f"{fd_ref} is withdrawn" in await run(sandbox, ALICE, "fd", f"cancel {fd_ref}")
    for ref in (push_ref, deploy_ref, sfp_ref, fd_ref):
        assert (await operation(sandbox, ref)).state == OpState.CANCELED, ref


# --------------------------------------------------------------------------- finding 8: reads


async def test_finding_8_reads_from_another_channel_say_where_to_look_and_reveal_nothing(sandbox: Sandbox) -> None:
    """Carol, in another channel, asks for the status and result of Alice's push, deployment and
    sfp tasks: she is told where to look, and nothing else; the sfp server is not even asked."""
    sim = sfp_sim(sandbox)
    push_ref = ref_in(await run(sandbox, ALICE, "push", "create Acme Billing@1.4.0 --orgs sandbox"), "P")
    deploy_ref = ref_in(await run(sandbox, ALICE, "deploy", "validate uat good-release.zip"), "D")
    sfp_ref = ref_in(await run(sandbox, ALICE, "sfp", "submit checkReviewEnvironment env=rev1"), "S")
    every_ref = ref_in(await run(sandbox, ALICE, "sfp", "submit checkReviewEnvironment env=rev2 --every 1h"), "S")
    await wait_state(sandbox, sfp_ref, {OpState.SUCCEEDED})
    await wait_state(sandbox, every_ref, {OpState.RUNNING})
    task_id = (await operation(sandbox, sfp_ref)).external_id
    assert task_id is not None

    reads = [
        ("push", f"status {push_ref}", push_ref),
        ("push", f"retry {push_ref}", push_ref),  # a retry shows the earlier push's failures
        ("deploy", f"status {deploy_ref}", deploy_ref),
        ("sfp", f"status {sfp_ref}", sfp_ref),
        ("sfp", f"result {sfp_ref}", sfp_ref),
        ("sfp", f"runs {every_ref}", every_ref),
        ("sfp", f"result op:{task_id}", sfp_ref),  # its sfp id names the same task
    ]
    sim_calls = len(sim.calls)
    count = await operations(sandbox)
    for command, text, ref in reads:
        answer = await run(sandbox, CAROL, command, text, channel=OTHER_CHANNEL)
        expected = LOOK_ELSEWHERE.format(ref=ref, channel=CHANNEL, requester=ALICE)
        assert answer == f":warning: {expected}", (text, answer)
    # The mentions reach Slack as mentions (not escaped), so they link to the channel and person.
    shown = raw_answers(sandbox, CAROL, OTHER_CHANNEL)
    assert len(shown) == len(reads) and all(f"<#{CHANNEL}>" in text and f"<@{ALICE}>" in text for text in shown)
    assert not any(word in text for text in shown for word in ("Status of", "Result of", "Runs of", "Succeeded"))
    assert sim.calls[sim_calls:] == []  # refused before any call to the sfp server
    assert await operations(sandbox) == count  # the retry created nothing
    refused = await refused_rows(sandbox, CAROL, at_least=len(reads))
    assert len(refused) == len(reads) and all(row.channel == OTHER_CHANNEL for row in refused)

    # In the operation's channel anyone (whom [access] lets run the command) may read it ...
    assert f"Status of {push_ref}" in await run(sandbox, CAROL, "push", f"status {push_ref}")
    assert f"Status of {deploy_ref}" in await run(sandbox, CAROL, "deploy", f"status {deploy_ref}")
    # ... and its requester and admins anywhere.
    assert f"Result of {sfp_ref}" in await run(sandbox, ALICE, "sfp", f"result {sfp_ref}", channel=OTHER_CHANNEL)
    assert f"Status of {deploy_ref}" in await run(
        sandbox, ADMIN, "deploy", f"status {deploy_ref}", channel=OTHER_CHANNEL
    )


async def test_finding_8_list_shows_only_this_channels_operations_and_your_own(sandbox: Sandbox) -> None:
    alice_push = ref_in(await run(sandbox, ALICE, "push", "create Acme Billing@1.4.0 --orgs sandbox"), "P")
    alice_deploy = ref_in(await run(sandbox, ALICE, "deploy", "validate uat good-release.zip"), "D")
    alice_sfp = ref_in(await run(sandbox, ALICE, "sfp", "submit checkReviewEnvironment env=rev1"), "S")
    bob_sfp = ref_in(
        await run(sandbox, BOB, "sfp", "submit checkReviewEnvironment env=rev2", channel=OTHER_CHANNEL), "S"
    )

    # Carol in the other channel sees that channel's operations only.
    assert "No pushes yet in this channel" in await run(sandbox, CAROL, "push", "list", channel=OTHER_CHANNEL)
    assert "No deployments yet in this channel" in await run(sandbox, CAROL, "deploy", "list", channel=OTHER_CHANNEL)
    listed = await run(sandbox, CAROL, "sfp", "list", channel=OTHER_CHANNEL)
    assert f"`{bob_sfp}`" in listed and f"`{alice_sfp}`" not in listed, listed
    # Alice there sees that channel's and her own.
    listed = await run(sandbox, ALICE, "sfp", "list", channel=OTHER_CHANNEL)
    assert f"`{bob_sfp}`" in listed and f"`{alice_sfp}`" in listed, listed
    assert f"`{alice_push}`" in await run(sandbox, ALICE, "push", "list", channel=OTHER_CHANNEL)
    # In the operations' channel everyone sees them.
    assert f"`{alice_deploy}`" in await run(sandbox, CAROL, "deploy", "list")
    listed = await run(sandbox, CAROL, "sfp", "list")
    assert f"`{alice_sfp}`" in listed and f"`{bob_sfp}`" not in listed, listed


# --------------------------------------------------------------------------- finding 8: op:<id>


async def test_finding_8_an_sfp_task_the_bot_did_not_submit_is_for_admins_only(sandbox: Sandbox) -> None:
    """A CI task on the sfp server, named by ``op:<id>``: nobody but an admin may read, cancel or
    stop it through the bot's token."""
    sim = sfp_sim(sandbox)
    sim.durations = {"transitionReviewEnvironment": 60.0}
    ci_task = await submit_as_ci(sim, "transitionReviewEnvironment")
    calls = len(sim.calls)
    for user in (CAROL, ALICE):
        for action in ("status", "result", "runs", "cancel", "stop"):
            answer = await run(sandbox, user, "sfp", f"{action} op:{ci_task}")
            assert f"Operation `{ci_task}` {NOT_OURS}" in answer, (user, action, answer)
    assert sim.calls[calls:] == []  # not one call reached the sfp server
    assert sim.status_of(ci_task)["status"] in {"pending", "active"}
    refused = await refused_rows(sandbox, CAROL, at_least=5) + await refused_rows(sandbox, ALICE, at_least=5)
    assert len(refused) == 10 and all(NOT_OURS in row.outcome for row in refused)
    assert await operations(sandbox) == 0

    # An admin may: the live status, then the cancel reaches the sfp server.
    assert f"Status of operation `{ci_task}`" in await run(sandbox, ADMIN, "sfp", f"status op:{ci_task}")
    assert "The sfp server answered" in await run(sandbox, ADMIN, "sfp", f"cancel op:{ci_task}")
    assert sim.status_of(ci_task)["status"] == "cancelled"


# --------------------------------------------------------------------------- finding 4c


async def test_finding_4c_sfp_submit_with_no_task_types_is_refused_naming_the_setting(tmp_path: Path) -> None:
    async with running_sandbox(workdir=tmp_path, job_seconds=0.01, subscribers=20, sfp_task_types=None) as sandbox:
        sim = sfp_sim(sandbox)
        for text in (
            "submit checkReviewEnvironment env=rev1",
            "review-env fetch --repo acme/sf-core --pool core --branch feature/ABC-1",
        ):
            answer = await run(sandbox, ALICE, "sfp", text)
            assert "add `task_types = [" in answer and "under `[sfp]`" in answer, answer
        assert sim.calls == [] and sim.tasks == {}
        assert await operations(sandbox) == 0
        refused = await refused_rows(sandbox, ALICE, at_least=2)
        assert len(refused) == 2


async def test_finding_4c_only_the_listed_sfp_task_types_run(tmp_path: Path) -> None:
    """``task_types = ["fetchReviewEnvironment"]``: another type is refused before any call;
    ``/sfp review-env fetch`` counts as fetchReviewEnvironment and runs."""
    async with running_sandbox(
        workdir=tmp_path, job_seconds=0.01, subscribers=20, sfp_task_types=["fetchReviewEnvironment"]
    ) as sandbox:
        sim = sfp_sim(sandbox)
        sim.durations = {"fetchReviewEnvironment": 0.3}
        answer = await run(sandbox, ALICE, "sfp", "submit unassignReviewEnvironment env=rev1")
        assert "Task type `unassignReviewEnvironment` is not allowed here" in answer, answer
        assert "allowed: `fetchReviewEnvironment`" in answer and "`task_types` under `[sfp]`" in answer
        assert sim.calls == [] and await operations(sandbox) == 0
        assert len(await refused_rows(sandbox, ALICE, at_least=1)) == 1

        fetch = "review-env fetch --repo acme/sf-core --pool core --branch feature/ABC-1"
        ref = ref_in(await run(sandbox, ALICE, "sfp", fetch), "S")
        await wait_state(sandbox, ref, {OpState.SUCCEEDED})
        assert [body["type"] for body in sim.bodies] == ["fetchReviewEnvironment"]


def test_finding_4c_sfp_task_types_are_checked_at_start_up() -> None:
    url = "https://sfp.example.com"
    for bad, why in (
        ([], "empty"),
        ([""], "not a task type"),
        (["  "], "not a task type"),
        (["fetch ReviewEnvironment"], "not a task type"),
        (["*", "fetchReviewEnvironment"], "list it alone"),
    ):
        with pytest.raises(ValidationError, match=why):
            SfpConfig(url=url, task_types=bad)
    assert not SfpConfig(url=url).allows("fetchReviewEnvironment")
    assert SfpConfig(url=url, task_types=["*"]).allows("anything")
    listed = SfpConfig(url=url, task_types=["fetchReviewEnvironment"])
    assert listed.allows("fetchReviewEnvironment") and not listed.allows("checkReviewEnvironment")
