"""Pushes against what real orgs answer (issue 13): Bulk jobs that end Failed, error texts as
Salesforce writes them, the ids people paste, and links out.

End to end: signed Slack requests → the real bot → the simulated packaging org over HTTP.
"""

from __future__ import annotations

import math

import pytest

from bot.sandbox.embedded import Sandbox
from bot.store import repo
from bot.store.models import OpState
from tests.helpers import click, full_text, push, ref_in, thread, wait_for_op
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
