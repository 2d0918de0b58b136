"""Pushes against what real orgs answer (issue 13): Bulk jobs that end Failed, error texts as
Salesforce writes them, the ids people paste, and links out.

End to end: signed Slack requests → the real bot → the simulated packaging org over HTTP.
"""

from __future__ import annotations

import math
import re

import pytest

from bot.sandbox.embedded import NOTIFY_CHANNEL, Sandbox
from bot.store import repo
from bot.store.models import OpKind, OpState
from tests.helpers import (
    CHANNEL,
    click,
    ephemerals,
    eventually,
    full_text,
    next_ephemeral,
    push,
    ref_in,
    thread,
    wait_for_op,
)
from tests.test_push_e2e import expected_targets

ALICE, BOB = "U0ALICE", "U0BOB"
# Calls one more ingest job costs after a Failed one: the PackagePushJob read-back (one page up to
# 2,000 orgs), create, upload, close, a few polls, result sets.
CALLS_PER_BULK_RETRY = 8
MAX_BULK_JOBS = 3  # the bound the README documents: ingest jobs that may end Failed for one push


async def _approved_push_to_all(sandbox: Sandbox) -> str:
    ref = ref_in(await push(sandbox, ALICE, "create Acme Billing@1.4.0 --orgs all"))
    op = await wait_for_op(sandbox, ref, card=True)
    assert "You approved" in await click(sandbox, BOB, op, "Approve")
    return ref


def _created_reply(sandbox: Sandbox, ref_op: object) -> str:
    replies = [full_text(m) for m in thread(sandbox, ref_op)]  # type: ignore[arg-type]
    return next(r for r in replies if r.startswith("Created"))


@pytest.mark.parametrize(
    "message", ["UNKNOWN_EXCEPTION: An unexpected error occurred. Please include this ErrorId: 99-1", None]
)
async def test_finding_2_bulk_job_ending_failed_loses_no_push_job_and_duplicates_none(
    sandbox: Sandbox, message: str | None
) -> None:
    sim = sandbox.packaging
    eligible = expected_targets(sandbox)
    refused_by_org = set(sim.refuse_org_keys) & eligible
    assert len(eligible) > 1000 and refused_by_org
    sim.fail_bulk_next(after=600, message=message)
    sim.reset_calls()

    ref = await _approved_push_to_all(sandbox)
    op = await wait_for_op(sandbox, ref, states=[OpState.FAILED, OpState.SUCCEEDED], announced=True, timeout=90)

    # Exactly one PackagePushJob per eligible org: none lost, none duplicated.
    keys = [job["SubscriberOrganizationKey"][:15] for job in sim.push_jobs(op.external_id or "")]
    assert len(keys) == len(set(keys))
    assert set(keys) == eligible - refused_by_org
    assert sum(1 for m, p in sim.calls if m == "POST" and p.endswith("/jobs/ingest")) == 2

    # The bot recorded every job, including the 600 the Failed job made, and refused only what the
    # org refuses (no "duplicate value" refusals).
    assert sandbox.runtime is not None
    targets = await repo.push_targets(sandbox.runtime.db, operation_id=op.id or 0)
    assert {t.org_key for t in targets if t.job_id} == set(keys)
    assert {t.org_key for t in targets if t.refused_reason} == refused_by_org
    created = _created_reply(sandbox, op)
    assert f"Created {len(keys):,} push job(s)" in created and "DUPLICATE" not in created
    assert f"ended Failed after 600 of {len(eligible):,} records" in created
    if message:
        assert "Salesforce said: UNKNOWN_EXCEPTION: An unexpected error occurred" in created
    else:
        assert "Salesforce gave no message" in created
    assert "ended Failed: " not in created

    # Call budget up to Pending: the SPEC §11 budget plus one bounded retry.
    pending = [(m, p) for m, p in sim.calls if m == "PATCH" and "/sobjects/PackagePushRequest/" in p]
    assert len(pending) == 1
    upto = sim.calls.index(pending[0]) + 1
    budget = math.ceil(len(eligible) / 2000) + 15 + CALLS_PER_BULK_RETRY
    assert upto <= budget, (upto, budget, sim.calls[:upto])


async def test_finding_2_bulk_retries_are_bounded_and_the_rest_are_listed_as_refused(sandbox: Sandbox) -> None:
    sim = sandbox.packaging
    eligible = expected_targets(sandbox)
    refused_by_org = set(sim.refuse_org_keys) & eligible
    for _ in range(MAX_BULK_JOBS):
        sim.fail_bulk_next(after=200)
    sim.reset_calls()

    ref = await _approved_push_to_all(sandbox)
    op = await wait_for_op(sandbox, ref, states=[OpState.FAILED, OpState.SUCCEEDED], announced=True, timeout=90)

    keys = [job["SubscriberOrganizationKey"][:15] for job in sim.push_jobs(op.external_id or "")]
    assert len(keys) == len(set(keys))
    assert 0 < len(keys) <= MAX_BULK_JOBS * 200
    assert sum(1 for m, p in sim.calls if m == "POST" and p.endswith("/jobs/ingest")) == MAX_BULK_JOBS
    assert sandbox.runtime is not None
    targets = await repo.push_targets(sandbox.runtime.db, operation_id=op.id or 0)
    assert {t.org_key for t in targets if t.job_id} == set(keys)
    given_up = {t.org_key for t in targets if (t.refused_reason or "").startswith("no push job created")}
    # Every eligible org either has its one job or is listed with why it has none.
    assert given_up | set(keys) | refused_by_org == eligible
    created = _created_reply(sandbox, op)
    assert created.count("ended Failed after 200 of") == MAX_BULK_JOBS
    assert f"no push job created: {MAX_BULK_JOBS} Bulk API jobs ended Failed" in created
    assert "the orgs still without one are listed below" in created
    assert f"Salesforce refused {len(given_up | (refused_by_org - set(keys))):,} org(s)" in created


# -- the ids people paste (SPEC §15 "Refs") ------------------------------------------------------------


async def test_finding_5_push_status_retry_and_cancel_take_the_0DV_id_of_either_length(sandbox: Sandbox) -> None:
    ref = ref_in(await push(sandbox, ALICE, "create Acme Billing@1.4.0 --orgs sandbox"))
    op = await wait_for_op(sandbox, ref, states=[OpState.FAILED, OpState.SUCCEEDED], announced=True)
    request_id = op.external_id or ""
    assert len(request_id) == 18 and request_id.startswith("0DV")
    for pasted in (request_id, request_id[:15]):
        answer = await push(sandbox, ALICE, f"status {pasted}")
        assert f"Push {ref} " in answer, answer
    assert "already ended" in await push(sandbox, ALICE, f"cancel {request_id[:15]}")
    assert f"Left out of the retry of {ref}" in await push(sandbox, ALICE, f"retry {request_id} --dry-run")
    # A stored 15-character id is found from the 18 characters Setup shows, and the other way round.
    assert sandbox.runtime is not None
    await repo.update_operation(sandbox.runtime.db, operation_id=op.id or 0, values={"external_id": request_id[:15]})
    assert f"Push {ref} " in await push(sandbox, ALICE, f"status {request_id}")
    # Another record's id, or one differing in case within the first 15 characters, is not this push.
    other = request_id[:3] + request_id[3:15].swapcase() + request_id[15:]
    assert "No push" in await push(sandbox, ALICE, f"status {other}")
    bad = await push(sandbox, ALICE, "status 0DVnot-an-id")
    assert "is not a reference" in bad and "`P12`" in bad


async def test_finding_5_deploy_status_takes_the_0Af_id(sandbox: Sandbox) -> None:
    before = len(ephemerals(sandbox, ALICE))
    await sandbox.agent.command(user=ALICE, channel=CHANNEL, command="/deploy", text="validate uat good-release.zip")
    ref = re.findall(r"\b(D\d+)\b", await next_ephemeral(sandbox, ALICE, before))[0]
    assert sandbox.runtime is not None
    op = await eventually(
        lambda: repo.find_operation(sandbox.runtime.db, kind=OpKind.DEPLOY, ref=ref),  # type: ignore[union-attr]
        until=lambda o: o is not None and o.external_id is not None,
        timeout=30,
    )
    assert op is not None and (op.external_id or "").startswith("0Af")
    for pasted in (op.external_id or "", (op.external_id or "")[:15]):
        before = len(ephemerals(sandbox, ALICE))
        await sandbox.agent.command(user=ALICE, channel=CHANNEL, command="/deploy", text=f"status {pasted}")
        assert ref in await next_ephemeral(sandbox, ALICE, before)
    before = len(ephemerals(sandbox, ALICE))
    await sandbox.agent.command(user=ALICE, channel=CHANNEL, command="/deploy", text=f"status {op.external_id}x")
    answer = await next_ephemeral(sandbox, ALICE, before)
    assert "`D12`" in answer and "`P12`" not in answer


async def test_finding_5_and_6_sfp_status_takes_the_operation_id_and_the_notice_carries_it(sandbox: Sandbox) -> None:
    before = len(ephemerals(sandbox, ALICE))
    await sandbox.agent.command(
        user=ALICE, channel=CHANNEL, command="/sfp", text="submit checkReviewEnvironment env=r1"
    )
    ref = re.findall(r"\b(S\d+)\b", await next_ephemeral(sandbox, ALICE, before))[0]
    assert sandbox.runtime is not None
    op = await eventually(
        lambda: repo.find_operation(sandbox.runtime.db, kind=OpKind.SFP, ref=ref),  # type: ignore[union-attr]
        until=lambda o: o is not None and o.external_id is not None,
        timeout=30,
    )
    assert op is not None and op.external_id
    before = len(ephemerals(sandbox, ALICE))
    await sandbox.agent.command(user=ALICE, channel=CHANNEL, command="/sfp", text=f"status {op.external_id}")
    assert ref in await next_ephemeral(sandbox, ALICE, before)
    # The completion notice carries the operationId (SPEC §15 "Links out").
    notice = await sandbox.slack.wait_for(
        lambda: next(
            (m for m in sandbox.slack.messages.get(NOTIFY_CHANNEL, []) if f"sfp task {ref} " in (m.text or "")), None
        ),
        30,
    )
    assert notice is not None and f"operation `{op.external_id}`" in (notice.text or "")
    before = len(ephemerals(sandbox, ALICE))
    await sandbox.agent.command(user=ALICE, channel=CHANNEL, command="/sfp", text="status P3")
    answer = await next_ephemeral(sandbox, ALICE, before)
    assert "`S12`" in answer and "`P12`" not in answer


# -- text people read, links and ids in notices ----------------------------------------------------------


async def test_finding_4_failures_group_by_type_and_title_with_numbers_normalised_and_blank_lines_collapsed(
    sandbox: Sandbox,
) -> None:
    sim = sandbox.packaging
    ref = await _approved_push_to_all(sandbox)
    op = await wait_for_op(sandbox, ref, states=[OpState.FAILED, OpState.SUCCEEDED], announced=True, timeout=90)
    errors = sim.push_errors(op.external_id or "")
    unexpected = [e for e in errors if e["ErrorType"] == "UnclassifiedError"]
    apex = [e for e in errors if e["ErrorType"] == "ApexTestFailure"]
    # The org answers as Salesforce does: a different ErrorId per org, messages with blank lines.
    assert len({e["ErrorMessage"] for e in unexpected}) == len(unexpected) > 1
    assert apex and "\n\n" in apex[0]["ErrorMessage"]

    card = full_text(sandbox.slack.find_message(CHANNEL, op.card_ts or ""))  # type: ignore[arg-type]
    lines = [line for line in card.splitlines() if "*UnclassifiedError*" in line]
    assert len(lines) == 1, lines  # one group, not one per ErrorId
    assert lines[0].startswith(f"• {len(unexpected)} × *UnclassifiedError* — Internal server error: ")
    assert "the numbers differ from org to org" in lines[0]
    assert f"{len(apex)} × *ApexTestFailure* — Apex test failure: Test failure: InvoiceTriggerTest.testBulkInsert" in (
        card
    )
    assert "Test failure: InvoiceTriggerTest.testBulkInsert 1 of 12 test methods failed." in card
    # The CSV keeps every message whole.
    csv_file = next(f for f in sandbox.slack.files.values() if f.name == f"push-{ref}-failures.csv")
    content = csv_file.text() or ""
    assert all(e["ErrorMessage"] in content for e in unexpected)


async def test_finding_4_soql_errors_show_the_message_without_the_query_and_caret(sandbox: Sandbox) -> None:
    sandbox.packaging.hidden_objects.add("MetadataPackageVersion")
    answer = await push(sandbox, ALICE, "create Acme Billing@1.4.0 --orgs sandbox --dry-run")
    assert "Salesforce did not accept that: sObject type 'MetadataPackageVersion' is not supported." in answer
    assert "^" not in answer and "ERROR at Row" not in answer and "SELECT" not in answer


def test_finding_4_readable_message_keeps_the_sentence_that_matters() -> None:
    from bot.clients.salesforce.rest import readable_message  # here, so the rest of the file runs without it

    echoed = (
        "\nSELECT Id FROM PackagePushJobs\n               ^\nERROR at Row:1:Column:16\n"
        "sObject type 'PackagePushJobs' is not supported."
    )
    assert readable_message(echoed) == "sObject type 'PackagePushJobs' is not supported."
    assert readable_message("Unknown error parsing query\n  ^\n  near  here") == "near here"
    assert readable_message("Line one.\n\n\n   Line   two.\n") == "Line one. Line two."


async def test_finding_6_push_card_links_the_request_page_and_the_notice_carries_the_0DV_id(sandbox: Sandbox) -> None:
    sim = sandbox.packaging
    ref = ref_in(await push(sandbox, ALICE, "create Acme Billing@1.4.0 --orgs sandbox"))
    op = await wait_for_op(sandbox, ref, states=[OpState.FAILED, OpState.SUCCEEDED], announced=True)
    request_id = op.external_id or ""
    assert request_id.startswith("0DV")
    # Built from the packaging org's instance URL and the id Salesforce returned.
    card = full_text(sandbox.slack.find_message(CHANNEL, op.card_ts or ""))  # type: ignore[arg-type]
    assert f"<{sim.url}/{request_id}|{request_id}>" in card
    notices = [m for m in sandbox.slack.messages.get(NOTIFY_CHANNEL, []) if f"push {ref} " in (m.text or "")]
    assert len(notices) == 1 and request_id in (notices[0].text or "")
    in_thread = [m for m in thread(sandbox, op) if (m.metadata or {}).get("event_type") == "chatops_operation_finished"]
    assert len(in_thread) == 1 and request_id in (in_thread[0].text or "")
