"""Push upgrades end to end: signed Slack requests → the real bot → simulated packaging org.

Everything is real HTTP on 127.0.0.1: the fake Slack records what the bot posts, the simulated
org records every Salesforce call, and the assertions are on what a user would see there.
"""

from __future__ import annotations

import asyncio
import csv
import io
import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlmodel import select

from bot.sandbox.embedded import Sandbox, running_sandbox
from bot.store import repo
from bot.store.models import AuditEvent, Operation, OpState
from tests.helpers import (
    CHANNEL,
    click,
    completion_notices,
    ephemerals,
    full_text,
    next_ephemeral,
    push,
    ref_in,
    thread,
    wait_for_op,
    writes,
)

ALICE, BOB, CAROL = "U0ALICE", "U0BOB", "U0CAROL"
TARGET = (1, 4, 0)


def expected_targets(sandbox: Sandbox, *, org_type: str | None = None) -> set[str]:
    """Computed from the simulated org's own records, independently of the bot."""
    versions = {v["Id"]: (v["MajorVersion"], v["MinorVersion"], v["PatchVersion"]) for v in sandbox.packaging.versions}
    billing = next(p["Id"] for p in sandbox.packaging.packages if p["Name"] == "Acme Billing")
    return {
        s["OrgKey"][:15]
        for s in sandbox.packaging.subscribers
        if s["MetadataPackageId"] == billing
        and s["InstalledStatus"] == "i"
        and s["OrgStatus"] != "Inactive"
        and versions[s["MetadataPackageVersionId"]] < TARGET
        and (org_type is None or s["OrgType"] == org_type)
    }


@pytest.fixture
async def slow_sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    """Jobs take long enough that a push stays In Progress while the test acts."""
    async with running_sandbox(workdir=tmp_path, job_seconds=3.0) as running:
        yield running


async def test_dry_run_shows_the_plan_and_creates_nothing(sandbox: Sandbox) -> None:
    sandbox.packaging.reset_calls()
    text = await push(sandbox, ALICE, "create Acme Billing@1.4.0 --orgs all --dry-run")
    eligible = expected_targets(sandbox)
    assert "Dry run — nothing created" in text
    assert f"{len(eligible):,} org(s) would be upgraded" in text
    assert "Production org(s) on 1.0.0" in text and "Sandbox org(s) on 1.3.0" in text
    versions = {v["Id"]: (v["MajorVersion"], v["MinorVersion"], v["PatchVersion"]) for v in sandbox.packaging.versions}
    billing = next(p["Id"] for p in sandbox.packaging.packages if p["Name"] == "Acme Billing")
    current = [
        s
        for s in sandbox.packaging.subscribers
        if s["MetadataPackageId"] == billing
        and s["InstalledStatus"] == "i"
        and s["OrgStatus"] != "Inactive"
        and versions[s["MetadataPackageVersionId"]] >= TARGET
    ]
    assert current and f"Left out: {len(current):,} already on this version or newer" in text
    # Only the orgs to upgrade are read, the rest only counted.
    subscriber_queries = [q for q in sandbox.packaging.queries if "FROM PackageSubscriber" in q]
    assert len(subscriber_queries) == 2, subscriber_queries
    assert "MetadataPackageVersionId IN (" in subscriber_queries[0]
    assert subscriber_queries[1].startswith("SELECT COUNT() FROM PackageSubscriber")
    assert writes(sandbox.packaging.calls) == []
    assert sandbox.runtime is not None
    assert await repo.count_operations(sandbox.runtime.db) == 0


async def test_push_to_all_orgs_with_approval_bulk_jobs_failures_and_csv(sandbox: Sandbox) -> None:
    sim = sandbox.packaging
    eligible = expected_targets(sandbox)
    assert len(sim.subscribers) >= 2000 and len(eligible) > 1000
    sim.reset_calls()

    answer = await push(sandbox, ALICE, "create Acme Billing@1.4.0 --orgs all")
    ref = ref_in(answer)
    assert "waiting for approval" in answer
    op = await wait_for_op(sandbox, ref, card=True)
    assert writes(sim.calls) == []  # nothing is written to Salesforce before approval

    # The requester and a non-approver are refused; nothing starts.
    assert "someone else has to approve" in await click(sandbox, ALICE, op, "Approve")
    assert "not an approver" in await click(sandbox, CAROL, op, "Approve")
    assert (await wait_for_op(sandbox, ref)).state == OpState.AWAITING_APPROVAL

    # Bob double-clicks: two deliveries at once, one start.
    before = len(ephemerals(sandbox, BOB))
    await asyncio.gather(
        *(
            sandbox.agent.click_label(user=BOB, channel=CHANNEL, label="Approve", message_ts=op.card_ts)
            for _ in range(2)
        )
    )
    await next_ephemeral(sandbox, BOB, before + 1)
    answers = sorted(full_text(m) for m in ephemerals(sandbox, BOB)[before:])
    assert len(answers) == 2 and "You approved" in answers[1], answers
    assert "already decided" in answers[0] or "not waiting for approval" in answers[0], answers
    op = await wait_for_op(sandbox, ref, states=[OpState.FAILED, OpState.SUCCEEDED], announced=True, timeout=90)

    # One job per eligible org, created through one Bulk API 2.0 ingest job, none refused silently.
    request_id = op.external_id
    assert request_id
    jobs = {job["SubscriberOrganizationKey"][:15] for job in sim.push_jobs(request_id)}
    refused = set(sim.refuse_org_keys) & eligible
    assert refused, "the sandbox refuses a few orgs"
    assert jobs == eligible - refused
    paths = [path for _, path in sim.calls]
    assert sum(1 for method, path in sim.calls if method == "POST" and path.endswith("/jobs/ingest")) == 1
    assert not any("/composite/sobjects" in path for path in paths)
    pending = [(m, p) for m, p in sim.calls if m == "PATCH" and "/sobjects/PackagePushRequest/" in p]
    assert len(pending) == 1, pending  # the double click sent one Pending PATCH

    # Call budget to resolve, create and start: everything up to the Pending PATCH.
    upto = sim.calls.index(pending[0]) + 1
    budget = math.ceil(len(eligible) / 2000) + 15
    assert upto <= budget, (upto, budget, sim.calls[:upto])

    # The thread lists the refused orgs with their reason, and the rest went on.
    replies = [full_text(m) for m in thread(sandbox, op)]
    created = next(r for r in replies if r.startswith("Created"))
    assert f"Created {len(jobs):,} push job(s)" in created
    for org_key in refused:
        assert org_key in created and sim.refuse_org_keys[org_key][:30] in created

    # Completion: grouped failures on the card, the CSV in the thread, one notice each place.
    failed = [job for job in sim.push_jobs(request_id) if job["Status"] == "Failed"]
    assert failed
    summary = op.data["summary"]
    assert summary["failed"] == len(failed) and summary["succeeded"] == len(jobs) - len(failed)
    card = sandbox.slack.find_message(CHANNEL, op.card_ts or "")
    assert card is not None and "Failures by error" in full_text(card)
    in_thread, notices = completion_notices(sandbox, op)
    assert len(in_thread) == 1 and len(notices) == 1
    csv_files = [f for f in sandbox.slack.files.values() if f.name == f"push-{ref}-failures.csv"]
    assert len(csv_files) == 1
    # Read as CSV: Salesforce's messages carry line breaks, which stay inside their quoted cells.
    rows = list(csv.reader(io.StringIO(csv_files[0].text() or "")))
    assert rows[0][:5] == ["org_key", "org_name", "org_type", "from_version", "error_type"]
    assert len(rows) == 1 + len(failed)

    # The card was edited in place: one top-level message for this push.
    cards = [
        m
        for m in sandbox.slack.messages[CHANNEL]
        if not m.is_reply and not m.ephemeral_for and f"Push {ref} " in (m.text or "")
    ]
    assert len(cards) == 1 and cards[0].edited


async def test_retry_leaves_out_what_retrying_cannot_fix(sandbox: Sandbox) -> None:
    answer = await push(sandbox, ALICE, "create Acme Billing@1.4.0 --orgs sandbox")
    ref = ref_in(answer)
    op = await wait_for_op(sandbox, ref, states=[OpState.FAILED], announced=True, timeout=60)
    assert sandbox.runtime is not None
    failed = [
        t for t in await repo.push_targets(sandbox.runtime.db, operation_id=op.id or 0) if t.job_status == "Failed"
    ]
    sticky = [t for t in failed if t.error_type in {"IneligibleUpgrade", "FeatureMissing"}]
    assert failed and sticky

    text = await push(sandbox, ALICE, f"retry {ref}")
    retry_ref = ref_in(text.replace(ref, ""))
    assert f"Left out of the retry of {ref}" in text
    assert f"{len(sticky)} — " in text or "— IneligibleUpgrade" in text
    retry = await wait_for_op(sandbox, retry_ref, states=[OpState.SUCCEEDED, OpState.FAILED], announced=True)
    jobs = {j["SubscriberOrganizationKey"][:15] for j in sandbox.packaging.push_jobs(retry.external_id or "")}
    assert jobs == {t.org_key for t in failed} - {t.org_key for t in sticky}
    assert retry.params["retry_of"] == ref


async def test_cancel_scheduled_push_and_refuse_in_progress(slow_sandbox: Sandbox) -> None:
    sandbox = slow_sandbox
    sim = sandbox.packaging
    scheduled = ref_in(await push(sandbox, ALICE, "create Acme Billing@1.3.0 --orgs sandbox --at +2h"))
    op = await wait_for_op(sandbox, scheduled, states=[OpState.SCHEDULED])
    assert sim.push_request(op.external_id or "")["Status"] == "Pending"

    running = ref_in(await push(sandbox, ALICE, "create Acme Billing@1.4.0 --orgs sandbox"))
    run_op = await wait_for_op(
        sandbox, running, states=[OpState.RUNNING], predicate=lambda o: o.data.get("request_status") == "In Progress"
    )
    refusal = await push(sandbox, ALICE, f"cancel {running}")
    assert (
        f"{running} is In Progress in Salesforce" in refusal and "only be canceled while Created or Pending" in refusal
    )
    assert sim.push_request(run_op.external_id or "")["Status"] == "In Progress"

    answer = await push(sandbox, ALICE, f"cancel {scheduled}")
    assert f"{scheduled} is canceled" in answer
    op = await wait_for_op(sandbox, scheduled, states=[OpState.CANCELED], announced=True)
    assert sim.push_request(op.external_id or "")["Status"] == "Canceled"
    card = sandbox.slack.find_message(CHANNEL, op.card_ts or "")
    assert card is not None and "Canceled" in full_text(card)
    again = await push(sandbox, ALICE, f"cancel {scheduled}")
    assert "already ended" in again


async def test_cancel_while_waiting_for_approval_writes_nothing(sandbox: Sandbox) -> None:
    sandbox.packaging.reset_calls()
    ref = ref_in(await push(sandbox, ALICE, "create Acme Billing@1.4.0 --orgs production"))
    await wait_for_op(sandbox, ref, card=True)
    assert f"{ref} is canceled" in await push(sandbox, ALICE, f"cancel {ref}")
    op = await wait_for_op(sandbox, ref, states=[OpState.CANCELED], announced=True)
    assert "Approve" not in full_text(sandbox.slack.find_message(CHANNEL, op.card_ts or ""))  # type: ignore[arg-type]
    assert writes(sandbox.packaging.calls) == []


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("create Nope Package@1.0.0", "No package called `Nope Package`"),
        ("create Acme Billing@1.x.0", "is not a version"),
        ("create Acme Billing@1.4.0 --orgs 00Dbogus", "not valid: `00Dbogus`"),
        ("create \"Acme Billing' OR Name LIKE 'A@1.4.0\"", "No package called `Acme Billing' OR Name LIKE 'A`"),
        ("create Acme Billing@1.4.0 --at 2020-01-01 10:00", "is in the past"),
        ("promote Acme Billing@1.4.0", "Unknown subcommand `promote`"),
        ("create Acme Billing@1.5.0", "is Beta; only Released versions"),
        ("status P999", "No push `P999`"),
    ],
)
async def test_bad_input_is_refused_specifically_and_changes_nothing(
    sandbox: Sandbox, text: str, fragment: str
) -> None:
    sandbox.packaging.reset_calls()
    answer = await push(sandbox, ALICE, text)
    assert fragment in answer.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    assert writes(sandbox.packaging.calls) == []
    assert sandbox.runtime is not None
    db = sandbox.runtime.db
    assert await repo.count_operations(db) == 0
    audit: list[AuditEvent] = []
    for _ in range(100):  # the audit row is written just after the answer goes out
        audit = list(await repo.audit_events(db))
        if audit:
            break
        await asyncio.sleep(0.02)
    async with db.session() as session:
        ops = (await session.exec(select(Operation))).all()
    assert ops == []
    assert [row.action for row in audit] == ["command"] and audit[0].outcome.startswith("refused")
    assert audit[0].actor == ALICE and audit[0].detail == f"/push {text}"


async def test_hostile_package_name_stays_inside_the_soql_literal(sandbox: Sandbox) -> None:
    answer = await push(sandbox, ALICE, "create \"Acme' OR MetadataPackage.Name LIKE 'A@1.4.0\"")
    assert "No package called" in answer
    queries = [path for method, path in sandbox.packaging.calls if method == "GET" and "/query" in path]
    assert queries  # the lookup was made, with the quote escaped, and found nothing
    assert not any(path.endswith("/query/") for path in queries)


async def test_session_expiry_mid_push_is_invisible_to_the_user(sandbox: Sandbox) -> None:
    ref = ref_in(await push(sandbox, ALICE, "create Acme Billing@1.4.0 --orgs sandbox"))
    await wait_for_op(sandbox, ref, states=[OpState.RUNNING, OpState.FAILED, OpState.SUCCEEDED])
    sandbox.packaging.expire_sessions()
    op = await wait_for_op(sandbox, ref, states=[OpState.FAILED, OpState.SUCCEEDED], announced=True)
    assert "last_problem" not in op.data
    texts = [full_text(m) for m in sandbox.slack.messages[CHANNEL]]
    assert not any("trouble" in t or "did not accept" in t for t in texts)
    tokens = [(m, p) for m, p in sandbox.packaging.calls if p.endswith("/oauth2/token")]
    assert len(tokens) >= 2  # the expired session was refreshed


async def test_slack_retry_of_the_same_command_creates_one_push(sandbox: Sandbox) -> None:
    first = await sandbox.agent.command(
        user=ALICE, channel=CHANNEL, command="/push", text="create Acme Billing@1.4.0 --orgs sandbox"
    )
    again = await sandbox.agent.command(
        user=ALICE,
        channel=CHANNEL,
        command="/push",
        text="create Acme Billing@1.4.0 --orgs sandbox",
        retry_num=1,
        trigger_id=first.trigger_id,
    )
    assert first.status == 200 and again.status == 200
    await asyncio.sleep(1.0)
    assert sandbox.runtime is not None
    assert await repo.count_operations(sandbox.runtime.db) == 1


@pytest.mark.parametrize(
    "delay",
    [
        0.0,
        0.05,
        0.15,
        0.3,
        0.8,
        1.5,
    ],
)
async def test_cancel_racing_the_start_ends_in_one_consistent_state(sandbox: Sandbox, delay: float) -> None:
    ref = ref_in(await push(sandbox, ALICE, "create Acme Billing@1.4.0 --orgs sandbox"))
    await asyncio.sleep(delay)
    answer = await push(sandbox, ALICE, f"cancel {ref}")
    op = await wait_for_op(
        sandbox, ref, states=[OpState.CANCELED, OpState.SUCCEEDED, OpState.FAILED, OpState.ERROR], announced=True
    )
    request = sandbox.packaging.push_request(op.external_id) if op.external_id else None
    card = full_text(sandbox.slack.find_message(CHANNEL, op.card_ts or ""))  # type: ignore[arg-type]
    if f"{ref} is canceled" in answer:
        assert op.state == OpState.CANCELED and "Canceled" in card
        assert request is None or request["Status"] == "Canceled"
    else:
        assert "can only be canceled while Created or Pending" in answer or "already ended" in answer
        assert op.state in {OpState.SUCCEEDED, OpState.FAILED} and request is not None
        assert request["Status"] in {"Succeeded", "Failed"} and "Canceled" not in card
    # Whatever won, nothing else was created for it.
    requests = [r for r in sandbox.packaging.state.table("PackagePushRequest").rows if r["Status"] != "Canceled"]
    assert len(requests) <= 1
