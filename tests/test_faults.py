"""Faults: Salesforce latency, 5xx, dropped connections, limits, expired sessions; Slack 429.

Transient faults must be invisible to users (the push completes, no error shown); a real
failure must still be reported as one.
"""

from __future__ import annotations

from bot.sandbox.embedded import Sandbox
from bot.store.models import OpState
from tests.helpers import CHANNEL, completion_notices, full_text, push, ref_in, stale_approve, wait_for_op

ALICE = "U0ALICE"
ERROR_WORDS = ("did not accept", "Could not run", "trouble", "went wrong", "❗")


async def test_transient_faults_everywhere_and_the_push_still_completes_quietly(sandbox: Sandbox) -> None:
    sim, slack = sandbox.packaging, sandbox.slack
    sim.latency = 0.02
    slack.rate_limit_next("chat.postMessage", 2, retry_after=1)
    slack.rate_limit_next("chat.update", 2, retry_after=1)
    sim.fail_next(2, status=503)
    sim.limit_exceeded_next(1)
    sim.drop_next(2)
    ref = ref_in(await push(sandbox, ALICE, "create Acme Billing@1.4.0 --orgs sandbox"))
    await wait_for_op(sandbox, ref, states=[OpState.RUNNING, OpState.SUCCEEDED, OpState.FAILED], timeout=90)
    sim.expire_sessions()
    sim.fail_next(2, status=502)
    sim.drop_next(2)
    op = await wait_for_op(sandbox, ref, states=[OpState.SUCCEEDED, OpState.FAILED], announced=True, timeout=120)
    in_thread, notices = completion_notices(sandbox, op)
    assert len(in_thread) == 1 and len(notices) == 1
    shown = [full_text(m) for m in slack.messages[CHANNEL] if m.ephemeral_for in (None, ALICE)]
    assert not [t for t in shown if any(word in t for word in ERROR_WORDS)]
    assert any(name == "chat.postMessage" for name, _ in slack.calls)  # the 429s were retried, not dropped
    jobs = sim.push_jobs(op.external_id or "")
    assert len({j["SubscriberOrganizationKey"] for j in jobs}) == len(jobs)


async def test_a_real_failure_is_still_reported(sandbox: Sandbox) -> None:
    refused = sorted(sandbox.packaging.refuse_org_keys)
    ref = ref_in(await push(sandbox, ALICE, f"create Acme Billing@1.4.0 --orgs {','.join(refused)}"))
    op = await wait_for_op(sandbox, ref, card=True)
    if op.state == OpState.AWAITING_APPROVAL:
        await stale_approve(sandbox, "U0BOB", op.card_ts or "", op.id or 0)
    op = await wait_for_op(sandbox, ref, states=[OpState.ERROR], announced=True, timeout=60)
    card = full_text(sandbox.slack.find_message(CHANNEL, op.card_ts or ""))  # type: ignore[arg-type]
    assert "Could not run" in card and "Salesforce refused every org; nothing was pushed" in card
    in_thread, _ = completion_notices(sandbox, op)
    assert len(in_thread) == 1 and "refused every org" in full_text(in_thread[0])
    request = sandbox.packaging.push_request(op.external_id or "")
    assert request is not None and request["Status"] == "Canceled"  # nothing left behind half-made
