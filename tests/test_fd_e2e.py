"""FlexDeploy packages end to end: signed Slack requests → the real bot → the simulated FlexDeploy.

Everything is real HTTP on 127.0.0.1: the fake Slack records what the bot posts, the simulated
FlexDeploy server records every call (with its raw, percent-encoded path) and holds the
packages, and the assertions are on what a user would see, what FlexDeploy holds and the rows
in the database.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlmodel import select

from bot.flexdeploy.payloads import FdData
from bot.sandbox.embedded import NOTIFY_CHANNEL, SANDBOX_APPROVERS, Sandbox, running_sandbox
from bot.sandbox.fake_slack import Message
from bot.sandbox.flexdeploy_server import FlexDeploySim
from bot.settings import ApprovalRule
from bot.store import repo
from bot.store.models import AuditEvent, Operation, OpKind, OpState
from tests.helpers import CHANNEL, click, ephemerals, eventually, full_text, next_ephemeral

ALICE, BOB, CAROL, DAVE = "U0ALICE", "U0BOB", "U0CAROL", "U0DAVE"
SF = 101
PACKAGE = "/flexdeploy/rest/v1/project/101/package"


def sim_of(sandbox: Sandbox) -> FlexDeploySim:
    server = sandbox.servers["flexdeploy"]
    assert isinstance(server, FlexDeploySim)
    return server


async def fd(sandbox: Sandbox, user: str, text: str) -> str:
    """Run ``/fd <text>`` as ``user``; return the first ephemeral answer it produced."""
    before = len(ephemerals(sandbox, user))
    result = await sandbox.agent.command(user=user, channel=CHANNEL, command="/fd", text=text)
    assert result.status == 200, result
    answer = await next_ephemeral(sandbox, user, before)
    return answer.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


async def fd_change(sandbox: Sandbox, user: str, text: str) -> str:
    """Run an ``/fd`` change that needs no approval: the answer says it is on its way, and the
    poller makes it; returns that answer and the card the change ends with, once both are shown."""
    answer = await fd(sandbox, user, text)
    op = await wait_fd(sandbox, ref_in(answer), states=[OpState.SUCCEEDED, OpState.FAILED], announced=True, card=True)
    await sandbox.slack.wait_quiet()  # the card (and its last edit) is delivered by the outbox
    card = sandbox.slack.find_message(CHANNEL, op.card_ts or "")
    assert card is not None, f"no card for {op.ref}"
    return answer + "\n" + full_text(card).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


async def fd_op(sandbox: Sandbox, ref: str) -> Operation:
    assert sandbox.runtime is not None
    op = await repo.get_operation(sandbox.runtime.db, operation_id=int(ref.lstrip("F")))
    assert op is not None and op.kind == OpKind.FD
    return op


async def wait_fd(
    sandbox: Sandbox, ref: str, *, states: Iterable[str] = (), announced: bool = False, card: bool = False
) -> Operation:
    wanted = set(states)
    deadline = time.monotonic() + 30
    while True:
        op = await fd_op(sandbox, ref)
        if (
            (not wanted or op.state in wanted)
            and (not announced or op.announced_state == op.state)
            and (not card or op.card_ts is not None)
        ):
            return op
        if time.monotonic() > deadline:
            raise AssertionError(f"{ref} stayed {op.state} (announced {op.announced_state}), wanted {wanted}")
        await asyncio.sleep(0.05)


def ref_in(text: str) -> str:
    import re

    match = re.search(r"\b(F\d+)\b", text)
    assert match, text
    return match.group(1)


def posts(sandbox: Sandbox, channel: str = CHANNEL) -> list[Message]:
    return [m for m in sandbox.slack.messages.get(channel, []) if not m.ephemeral_for and not m.is_reply]


async def wait_post(sandbox: Sandbox, fragment: str) -> str:
    found = await sandbox.slack.wait_for(
        lambda: next((full_text(m) for m in reversed(posts(sandbox)) if fragment in full_text(m)), None), 10
    )
    assert found is not None, f"no channel post with {fragment!r}"
    return found


def completions(sandbox: Sandbox, op: Operation) -> tuple[list[Message], list[Message]]:
    assert op.card_ts is not None
    in_thread = [
        m
        for m in sandbox.slack.thread_replies(CHANNEL, op.card_ts)
        if (m.metadata or {}).get("event_type") == "chatops_operation_finished"
    ]
    notices = [m for m in sandbox.slack.messages.get(NOTIFY_CHANNEL, []) if f"FlexDeploy {op.ref} " in (m.text or "")]
    return in_thread, notices


async def wait_completions(sandbox: Sandbox, op: Operation) -> tuple[list[Message], list[Message]]:
    """The completion notice in the thread and in the notifications channel, once they are delivered."""
    await sandbox.slack.wait_for(lambda: all(completions(sandbox, op)) or None, 15)
    await sandbox.slack.wait_quiet()  # a second notice, if one were owed, would arrive now
    return completions(sandbox, op)


async def wait_card(sandbox: Sandbox, op: Operation, fragment: str) -> str:
    """The card's text once it shows ``fragment`` (cards are edited in place, possibly a moment later)."""

    def shown() -> str | None:
        card = sandbox.slack.find_message(CHANNEL, op.card_ts or "")
        text = full_text(card) if card is not None else ""
        return text if fragment in text else None

    text = await sandbox.slack.wait_for(shown, 15)
    assert text is not None, f"the card of {op.ref} never showed {fragment!r}"
    return text


def files_of(sim: FlexDeploySim, name: str) -> list[tuple[int, str, str]]:
    package = sim.package(SF, name)
    assert package is not None
    return [(f["sequenceNumber"], f["filePath"], f["objectType"]) for f in package["files"]]


async def audit_rows(sandbox: Sandbox) -> list[AuditEvent]:
    """The audit trail once the command's row is written (the ack goes out first, for speed)."""
    assert sandbox.runtime is not None
    db = sandbox.runtime.db
    deadline = time.monotonic() + 10
    while True:
        async with db.session() as session:
            rows = list((await session.exec(select(AuditEvent))).all())
        if any(row.action == "command" for row in rows) or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.05)


async def ops(sandbox: Sandbox) -> list[Operation]:
    assert sandbox.runtime is not None
    async with sandbox.runtime.db.session() as session:
        return list((await session.exec(select(Operation))).all())


async def test_create_add_replace_complete_refuse_delete_and_delete_again(sandbox: Sandbox) -> None:
    sim = sim_of(sandbox)
    name = "Release 43"
    encoded = f"{PACKAGE}/Release%2043"

    # create: POST, files numbered 1.., posted in the channel for the team.
    answer = await fd_change(
        sandbox,
        ALICE,
        f'create 101 "{name}" --description "Tax rounding" '
        '--files "/src/classes/TaxService.cls, /src/classes/TaxServiceTest.cls"',
    )
    assert "Done: create `Release 43`" in answer and "posted in the channel" in answer
    assert files_of(sim, name) == [
        (1, "/src/classes/TaxService.cls", "ApexClass"),
        (2, "/src/classes/TaxServiceTest.cls", "ApexClass"),
    ]
    assert sim.package(SF, name)["description"] == "Tax rounding"  # type: ignore[index]
    created = await wait_post(sandbox, "created `Release 43`")
    assert "<@U0ALICE> created" in created and "/src/classes/TaxServiceTest.cls" in created

    # add: PATCH appends; the sequence numbers continue; the rest stays as it was.
    sim.reset_calls()
    await fd_change(sandbox, ALICE, f'add 101 "{name}" --files "/src/triggers/RefundTrigger.trigger"')
    assert [m for m, _ in sim.calls] == ["GET", "PATCH"] and sim.calls[-1] == ("PATCH", encoded)
    assert sim.requests[-1].body == {"files": [{"filePath": "/src/triggers/RefundTrigger.trigger"}]}
    assert [seq for seq, _, _ in files_of(sim, name)] == [1, 2, 3]
    assert files_of(sim, name)[-1] == (3, "/src/triggers/RefundTrigger.trigger", "ApexTrigger")
    assert sim.package(SF, name)["description"] == "Tax rounding"  # type: ignore[index]
    assert "it now has 3" in await wait_post(sandbox, "added 1 file(s)")

    # replace: PUT carries the other attributes over and sets exactly these files.
    sim.reset_calls()
    await fd_change(
        sandbox,
        ALICE,
        f'replace 101 "{name}" --files "10:/src/classes/RefundService.cls, 20:/src/classes/RefundServiceTest.cls"',
    )
    assert [m for m, _ in sim.calls] == ["GET", "PUT"]
    assert files_of(sim, name) == [
        (10, "/src/classes/RefundService.cls", "ApexClass"),
        (20, "/src/classes/RefundServiceTest.cls", "ApexClass"),
    ]
    assert sim.package(SF, name)["description"] == "Tax rounding"  # type: ignore[index]
    assert "3 → 2 file(s)" in await wait_post(sandbox, "replaced the files")

    # status COMPLETED: waits for approval; nothing is written before it.
    sim.reset_calls()
    answer = await fd(sandbox, ALICE, f'status 101 "{name}" COMPLETED')
    ref = ref_in(answer)
    assert "waiting for approval" in answer
    op = await wait_fd(sandbox, ref, card=True)
    assert op.state == OpState.AWAITING_APPROVAL and sim.writes() == []
    assert sim.package(SF, name)["packageStatus"] == "ACTIVE"  # type: ignore[index]
    assert "someone else has to approve it" in await click(sandbox, ALICE, op, "Approve")
    assert "You approved" in await click(sandbox, BOB, op, "Approve")
    op = await wait_fd(sandbox, ref, states=[OpState.SUCCEEDED], announced=True)
    assert sim.package(SF, name)["packageStatus"] == "COMPLETED"  # type: ignore[index]
    assert [m for m, _ in sim.writes()] == ["PATCH"] and sim.requests[-1].body == {"packageStatus": "COMPLETED"}
    assert "Approve" not in await wait_card(sandbox, op, "Succeeded")
    in_thread, notices = await wait_completions(sandbox, op)
    assert len(in_thread) == 1 and len(notices) == 1

    # add to a COMPLETED package: refused with the reason, after a GET and before any write.
    sim.reset_calls()
    answer = await fd(sandbox, ALICE, f'add 101 "{name}" --files "/src/classes/LedgerService.cls"')
    assert "is COMPLETED, and FlexDeploy does not allow completed packages to be modified" in answer
    assert sim.calls == [("GET", encoded)]
    assert len(files_of(sim, name)) == 2

    # delete: waits for approval, then one DELETE.
    sim.reset_calls()
    ref = ref_in(await fd(sandbox, ALICE, f'delete 101 "{name}"'))
    op = await wait_fd(sandbox, ref, card=True)
    assert sim.writes() == [] and sim.package(SF, name) is not None
    assert "You approved" in await click(sandbox, CAROL, op, "Approve")
    op = await wait_fd(sandbox, ref, states=[OpState.SUCCEEDED], announced=True)
    assert sim.package(SF, name) is None and sim.writes() == [("DELETE", encoded)]
    await wait_card(sandbox, op, "is deleted from FlexDeploy project 101")

    # delete again: quietly fine, no approval, no card.
    before_ops = len(await ops(sandbox))
    answer = await fd(sandbox, ALICE, f'delete 101 "{name}"')
    assert "not in FlexDeploy project 101 (any more); nothing to delete" in answer
    assert len(await ops(sandbox)) == before_ops
    assert sim.writes() == [("DELETE", encoded)]  # only the approved one: nothing unapproved is sent
    assert "not found in project 101" in answer  # what FlexDeploy said

    assert sandbox.runtime is not None
    async with sandbox.runtime.db.session() as session:
        audit = (await session.exec(select(AuditEvent))).all()
    actions = [row.action for row in audit]
    for action in ("fd.create", "fd.add", "fd.replace", "fd.complete", "fd.delete", "approve", "call", "completed"):
        assert action in actions, action


@pytest.mark.parametrize(
    ("status", "method", "command", "fragment"),
    [
        (401, None, 'show 101 "Release 42"', "rejected the bot's credentials (HTTP 401)"),
        (403, None, 'show 101 "Release 42"', "not allowed to do that (HTTP 403)"),
        (404, None, 'show 101 "Release 42"', "FlexDeploy has no package `Release 42` in project 101"),
    ],
)
async def test_each_error_status_has_its_own_message(
    sandbox: Sandbox, status: int, method: str | None, command: str, fragment: str
) -> None:
    sim = sim_of(sandbox)
    sim.force(status, method=method, times=None)
    answer = await fd(sandbox, ALICE, command)
    assert fragment in answer
    assert "<html" not in answer.lower() and "NullPointer" not in answer and sim.password not in answer
    assert await ops(sandbox) == []


async def test_an_unknown_outcome_of_a_create_is_shown_and_checked_before_it_is_repeated(sandbox: Sandbox) -> None:
    """A 500 to the POST: the change may or may not have been made. The poller says so on the card,
    and its next attempt reads the package before sending the POST again (made at once, a create
    goes through the same start step as an approved change)."""
    sim = sim_of(sandbox)
    sim.force(500, method="POST", times=1)
    answer = await fd(sandbox, ALICE, 'create 101 "Brand new" --files "/src/classes/TaxService.cls"')
    op = await wait_fd(sandbox, ref_in(answer), card=True)
    card = await wait_card(sandbox, op, "may or may not have been applied")
    assert "unexpected internal error (HTTP 500)" in card and "retrying automatically" in card
    assert "<html" not in card.lower() and "NullPointer" not in card and sim.password not in card
    op = await wait_fd(sandbox, op.ref, states=[OpState.SUCCEEDED], announced=True)
    # The plan's GET, the POST answered 500, the check that found nothing, the POST that went through.
    assert [m for m, _ in sim.calls] == ["GET", "POST", "GET", "POST"]
    assert sim.package(SF, "Brand new") is not None
    await wait_card(sandbox, op, "created `Brand new`")


async def test_a_forbidden_project_is_a_real_403(sandbox: Sandbox) -> None:
    answer = await fd(sandbox, ALICE, "show 103 Payroll")
    assert "HTTP 403" in answer and "Execute Project permission" in answer
    assert sim_of(sandbox).calls == [("GET", "/flexdeploy/rest/v1/project/103/package/Payroll")]


async def test_a_wrong_password_is_a_real_401(tmp_path: Path) -> None:
    from pydantic import SecretStr

    async with running_sandbox(workdir=tmp_path, flexdeploy_password=SecretStr("wrong-password")) as sandbox:
        answer = await fd(sandbox, ALICE, 'show 101 "Release 42"')
        assert "HTTP 401" in answer and "wrong-password" not in answer
        assert sim_of(sandbox).calls == [("GET", f"{PACKAGE}/Release%2042")]  # 401 is not retried


@pytest.mark.parametrize("name", ["Release 44/hotfix", "Größe ✓ 2025", "50% off? #1"])
async def test_names_with_spaces_slashes_and_unicode_are_url_encoded(sandbox: Sandbox, name: str) -> None:
    sim = sim_of(sandbox)
    encoded = f"{PACKAGE}/{quote(name, safe='')}"
    await fd_change(sandbox, ALICE, f'create 101 "{name}" --files "/src/classes/TaxService.cls"')
    assert sim.package(SF, name) is not None
    assert ("GET", encoded) in sim.calls and ("POST", PACKAGE) in sim.calls
    assert sim.requests[-1].body["name"] == name  # type: ignore[index]
    shown = await fd(sandbox, ALICE, f'show 101 "{name}"')
    assert name in shown and "TaxService.cls" in shown
    await fd_change(sandbox, ALICE, f'add 101 "{name}" --files "/src/classes/TaxServiceTest.cls"')
    assert ("PATCH", encoded) in sim.calls and len(files_of(sim, name)) == 2
    assert all("/package/" not in path.split("/package/", 1)[1] for _, path in sim.calls if "/package/" in path)


@pytest.mark.parametrize(
    ("command", "fragment"),
    [
        ('create 101 Profiles --type DYNAMIC --include "(.*\\.profile"', "is not a valid regular expression"),
        ('add 101 "Release 42" --files "1:/src/classes/A.cls, /src/classes/B.cls"', "for all files or for none"),
        ('add 101 "Release 42" --include ".*\\.cls"', "only apply to DYNAMIC packages, and this one is USER_MANAGED"),
        ('status 101 "Release 42" DONE', "`DONE` is not a package status"),
        ('add 101 "Hotfix 41.1" --files "/src/classes/A.cls"', "is COMPLETED, and FlexDeploy does not allow"),
        ('status 101 "Hotfix 41.1" ACTIVE', "is COMPLETED"),
        ('add 101 "Release 42" --files "2:/src/classes/A.cls"', "Sequence number 2 is already used"),
        ('add 101 "All Profiles" --files "/src/classes/A.cls"', "come from its `--include`"),
        ('create 101 "Release 42"', "already has a package `Release 42`"),
        ('replace 101 "Release 42" --description x', "give `--files <list>`"),
        ('add 101 "Release 42" --files "/src/classes/InvoiceService.cls"', "already in `Release 42`; nothing to add"),
        ('status 101 "Release 42" ACTIVE', "is already ACTIVE"),
        ('show 101 "release 42"', "case-sensitive"),
        ("cancel F99", "No FlexDeploy request `F99`"),
    ],
)
async def test_bad_input_is_refused_specifically_and_changes_nothing(
    sandbox: Sandbox, command: str, fragment: str
) -> None:
    sim = sim_of(sandbox)
    before = {name: sim.package(SF, name) for name in sim.projects[SF].packages}
    answer = await fd(sandbox, ALICE, command)
    assert fragment in answer, answer
    assert sim.writes() == []
    assert {name: sim.package(SF, name) for name in sim.projects[SF].packages} == before
    assert await ops(sandbox) == []
    audit = await audit_rows(sandbox)
    assert [row.action for row in audit] == ["command"] and audit[0].outcome.startswith("refused")
    assert audit[0].detail == f"/fd {command}"


async def test_a_long_file_list_comes_as_a_file(sandbox: Sandbox) -> None:
    answer = await fd(sandbox, ALICE, 'show 101 "Big Bang"')
    assert "first 15 of 60" in answer and "INACTIVE" in answer and "only ACTIVE packages" in answer
    found = await sandbox.slack.wait_for(
        lambda: next(
            (f for f in sandbox.slack.files.values() if f.name == "fd-101-Big_Bang-files.csv" and f.channels), None
        ),
        10,
    )
    assert found is not None and found.channels == [CHANNEL]  # shared once the upload completed
    rows = (found.text() or "").strip().splitlines()
    assert rows[0] == "sequenceNumber,objectType,filePath" and len(rows) == 61
    assert rows[1].startswith("1,ApexClass,/src/classes/")


async def test_dynamic_package_shows_its_expressions_and_matching_files(sandbox: Sandbox) -> None:
    answer = await fd(sandbox, ALICE, 'show 101 "All Profiles"')
    assert "Dynamic" in answer and ".*\\.profile" in answer and "/src/profiles/Admin.profile" in answer
    await fd_change(sandbox, ALICE, 'add 101 "All Profiles" --exclude ".*Admin.*"')
    package = sim_of(sandbox).package(SF, "All Profiles")
    assert package is not None and package["excludePath"] == ".*Admin.*"
    assert [f["filePath"] for f in package["files"]] == [
        "/src/profiles/Finance.profile",
        "/src/profiles/Sales.profile",
        "/src/profiles/Support.profile",
    ]


async def test_cancel_withdraws_a_request_and_a_double_click_calls_once(sandbox: Sandbox) -> None:
    sim = sim_of(sandbox)
    ref = ref_in(await fd(sandbox, ALICE, 'status 101 "Release 42" COMPLETED'))
    await wait_fd(sandbox, ref, card=True)
    assert f"{ref} is withdrawn" in await fd(sandbox, ALICE, f"cancel {ref}")
    op = await wait_fd(sandbox, ref, states=[OpState.CANCELED], announced=True)
    await wait_card(sandbox, op, "Withdrawn by")
    assert "already ended" in await fd(sandbox, ALICE, f"cancel {ref}")

    ref = ref_in(await fd(sandbox, ALICE, 'status 101 "Release 42" COMPLETED'))
    op = await wait_fd(sandbox, ref, card=True)
    before = len(ephemerals(sandbox, BOB))
    await asyncio.gather(
        *(
            sandbox.agent.click_label(user=BOB, channel=CHANNEL, label="Approve", message_ts=op.card_ts)
            for _ in range(2)
        )
    )
    await next_ephemeral(sandbox, BOB, before + 1)
    await wait_fd(sandbox, ref, states=[OpState.SUCCEEDED], announced=True)
    assert [m for m, _ in sim.writes()] == ["PATCH"]
    assert sim.package(SF, "Release 42")["packageStatus"] == "COMPLETED"  # type: ignore[index]


async def test_a_refusal_after_approval_ends_the_card_failed(sandbox: Sandbox) -> None:
    ref = ref_in(await fd(sandbox, ALICE, 'delete 101 "Release 40"'))
    op = await wait_fd(sandbox, ref, card=True)
    await click(sandbox, BOB, op, "Approve")
    op = await wait_fd(sandbox, ref, states=[OpState.FAILED], announced=True)
    assert "part of release" in op.data["error"]
    assert sim_of(sandbox).package(SF, "Release 40") is not None
    assert "part of release" in await wait_card(sandbox, op, "Failed")
    in_thread, notices = await wait_completions(sandbox, op)
    assert len(in_thread) == 1 and len(notices) == 1


async def test_an_ambiguous_write_is_checked_before_it_is_repeated(sandbox: Sandbox) -> None:
    sim = sim_of(sandbox)
    ref = ref_in(await fd(sandbox, ALICE, 'status 101 "Release 42" COMPLETED'))
    op = await wait_fd(sandbox, ref, card=True)
    sim.force(500, method="PATCH", times=1)
    await click(sandbox, BOB, op, "Approve")
    op = await wait_fd(sandbox, ref, states=[OpState.SUCCEEDED], announced=True)
    assert [m for m, _ in sim.writes()] == ["PATCH", "PATCH"]  # the first answered 500, the repeat went through
    assert sim.package(SF, "Release 42")["packageStatus"] == "COMPLETED"  # type: ignore[index]
    assert "last_problem" not in op.data


async def test_a_delete_whose_answer_was_lost_is_checked_before_it_is_sent_again(sandbox: Sandbox) -> None:
    """FlexDeploy deleted the package but every answer was lost (5xx): once the bot backs off, the
    next attempt reads first and finds the delete done, instead of sending another DELETE."""
    sim = sim_of(sandbox)
    ref = ref_in(await fd(sandbox, ALICE, 'delete 101 "Release 42"'))
    op = await wait_fd(sandbox, ref, card=True)
    sim.force(502, method="DELETE", times=None)
    await click(sandbox, BOB, op, "Approve")
    backing_off = await eventually(
        lambda: fd_op(sandbox, ref), until=lambda o: FdData.read(o.data).transient_failures > 0, timeout=30
    )
    assert FdData.read(backing_off.data).attempted_at is not None
    # What FlexDeploy did behind the lost answers: the package is gone.
    del sim.projects[SF].packages["Release 42"]
    sim.clear_forced()
    sent = len(sim.writes())
    op = await wait_fd(sandbox, ref, states=[OpState.SUCCEEDED], announced=True)
    assert len(sim.writes()) == sent  # no DELETE after the lost ones
    assert ("GET", "/flexdeploy/rest/v1/project/101/package/Release%2042") in sim.calls
    assert sim.package(SF, "Release 42") is None


def package_rules() -> list[ApprovalRule]:
    """Completing needs Dave; deleting "Protected" needs Dave."""
    return [
        ApprovalRule(action="push", org_kind="production", approvers=SANDBOX_APPROVERS),
        ApprovalRule(action="fd_complete", approvers=[DAVE]),
        ApprovalRule(action="fd_delete", package="Protected", approvers=[DAVE]),
    ]


@pytest.fixture
async def package_ruled_sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with running_sandbox(workdir=tmp_path, job_seconds=0.01, approval=package_rules()) as running:
        yield running


@pytest.fixture
async def ruled_sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    """The package rules, and deleting "Big Bang" waived (rule #4)."""
    waiver = ApprovalRule(action="fd_delete", org="101", package="Big Bang", count=0, waiver="kept only for reference")
    async with running_sandbox(workdir=tmp_path, job_seconds=0.01, approval=[*package_rules(), waiver]) as running:
        yield running


async def test_approval_rules_are_configurable(package_ruled_sandbox: Sandbox) -> None:
    sandbox = package_ruled_sandbox
    sim = sim_of(sandbox)
    ref = ref_in(await fd(sandbox, ALICE, 'status 101 "Release 42" COMPLETED'))
    op = await wait_fd(sandbox, ref, card=True)
    assert "not an approver" in await click(sandbox, BOB, op, "Approve")
    assert "You approved" in await click(sandbox, DAVE, op, "Approve")
    await wait_fd(sandbox, ref, states=[OpState.SUCCEEDED], announced=True)
    assert sim.package(SF, "Release 42")["packageStatus"] == "COMPLETED"  # type: ignore[index]


async def test_finding_1_a_rule_for_one_fd_package_keeps_the_minimum_for_every_other(
    package_ruled_sandbox: Sandbox,
) -> None:
    """A rule for "Protected" used to leave deletes of every other package unapproved."""
    sandbox = package_ruled_sandbox
    sim = sim_of(sandbox)
    ref = ref_in(await fd(sandbox, ALICE, 'delete 101 "All Profiles"'))
    op = await wait_fd(sandbox, ref, card=True)
    assert op.state == OpState.AWAITING_APPROVAL and op.data["approval"]["rule"] == "built-in minimum"
    assert sim.writes() == [] and sim.package(SF, "All Profiles") is not None
    assert "someone else has to approve" in await click(sandbox, ALICE, op, "Approve")
    assert "You approved" in await click(sandbox, CAROL, op, "Approve")  # anyone but the requester
    await wait_fd(sandbox, ref, states=[OpState.SUCCEEDED], announced=True)
    assert sim.package(SF, "All Profiles") is None


async def test_finding_1_a_waiver_is_shown_in_the_channel_and_audited(ruled_sandbox: Sandbox) -> None:
    sandbox = ruled_sandbox
    sim = sim_of(sandbox)
    answer = await fd_change(sandbox, ALICE, 'delete 101 "Big Bang"')
    assert "Done: delete `Big Bang`" in answer and sim.package(SF, "Big Bang") is None
    post = await wait_post(sandbox, "deleted `Big Bang`")
    assert "Waiver (rule #4 for fd_delete): no approval needed, because kept only for reference" in post
    # Made at once like every unapproved change: an operation that never waited for approval.
    [op] = await ops(sandbox)
    assert op.state == OpState.SUCCEEDED and op.data["approval"]["waiver"] == "kept only for reference"
    assert sim.writes() == [("DELETE", f"{PACKAGE}/Big%20Bang")]
    rows = [row for row in await audit_rows(sandbox) if row.action == "approval.waived"]
    assert [(r.actor, r.detail, r.outcome) for r in rows] == [
        (ALICE, "rule #4 for fd_delete: kept only for reference", "no approval")
    ]


async def test_not_configured_says_so(tmp_path: Path) -> None:
    async with running_sandbox(workdir=tmp_path, flexdeploy=None) as sandbox:
        answer = await fd(sandbox, ALICE, 'show 101 "Release 42"')
        assert "FlexDeploy is not configured" in answer
        assert sim_of(sandbox).calls == []
