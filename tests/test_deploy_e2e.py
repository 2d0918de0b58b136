"""Metadata deployments end to end: signed Slack requests → the real bot → the simulated orgs'
SOAP Metadata API. Assertions are on what a user would see in the fake Slack, on what the
simulated org received and did, and on the rows in the database."""

from __future__ import annotations

import asyncio
import io
import itertools
import re
import time
import zipfile
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from bot.deploy.commands import DeployFlags, DeployHelp, DeployQuick, DeployRef, DeployStart, parse_deploy
from bot.deploy.service import DeployService
from bot.errors import UsageError
from bot.sandbox.embedded import NOTIFY_CHANNEL, SANDBOX_APPROVERS, Sandbox, running_sandbox
from bot.sandbox.fake_slack import Message
from bot.sandbox.metadata_api import MetadataApiSim
from bot.settings import ApprovalRule
from bot.store import repo
from bot.store.models import AuditEvent, Operation, OpKind, OpState
from tests.helpers import CHANNEL, ephemerals, full_text, next_ephemeral, outbox_drained

ALICE, BOB, CAROL, DAVE = "U0ALICE", "U0BOB", "U0CAROL", "U0DAVE"
PACKAGE = (
    '<?xml version="1.0"?><Package xmlns="http://soap.sforce.com/2006/04/metadata"><version>61.0</version></Package>'
)


def mdapi(sandbox: Sandbox, org: str) -> MetadataApiSim:
    sim = (sandbox.production if org == "prod" else sandbox.sandbox_org).metadata
    assert sim is not None
    return sim


def soap_posts(sandbox: Sandbox) -> int:
    return sum(1 for org in (sandbox.production, sandbox.sandbox_org) for _, path in org.calls if "/Soap/m/" in path)


async def deploy(sandbox: Sandbox, user: str, text: str) -> str:
    """Run ``/deploy <text>`` as ``user``; the first ephemeral answer, with Slack's escapes undone."""
    before = len(ephemerals(sandbox, user))
    result = await sandbox.agent.command(user=user, channel=CHANNEL, command="/deploy", text=text)
    assert result.status == 200, result
    return unescape(await next_ephemeral(sandbox, user, before))


def unescape(text: str) -> str:
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def ref_in(text: str, *, exclude: Iterable[str] = ()) -> str:
    refs = [ref for ref in re.findall(r"\b(D\d+)\b", text) if ref not in set(exclude)]
    assert refs, text
    return refs[0]


async def operation(sandbox: Sandbox, ref: str) -> Operation:
    assert sandbox.runtime is not None
    op = await repo.get_operation(sandbox.runtime.db, operation_id=int(ref.lstrip("D")))
    assert op is not None and op.kind == OpKind.DEPLOY
    return op


async def wait_op(
    sandbox: Sandbox,
    ref: str,
    *,
    states: Iterable[str] = (),
    announced: bool = False,
    card: bool = False,
    predicate: Any = None,
    timeout: float = 60.0,
) -> Operation:
    wanted = set(states)
    deadline = time.monotonic() + timeout
    while True:
        op = await operation(sandbox, ref)
        if (
            (not wanted or op.state in wanted)
            and (not announced or op.announced_state == op.state)
            and (not card or op.card_ts is not None)
            and (predicate is None or predicate(op))
            and (not announced or await outbox_drained(sandbox, op.id or 0))
        ):
            return op
        if time.monotonic() > deadline:
            raise AssertionError(f"{ref} stayed {op.state} ({op.data.get('progress')}), wanted {wanted}")
        await asyncio.sleep(0.05)


def card_of(sandbox: Sandbox, op: Operation) -> Message:
    message = sandbox.slack.find_message(CHANNEL, op.card_ts or "")
    assert message is not None
    return message


async def card_text_when(sandbox: Sandbox, op: Operation, fragment: str, timeout: float = 15.0) -> str:
    """The card's text once it contains ``fragment`` (cards are sent by the outbox, a moment later)."""

    def current() -> str | None:
        text = unescape(full_text(card_of(sandbox, op)))
        return text if fragment in text else None

    found = await sandbox.slack.wait_for(current, timeout)
    assert found is not None, (
        f"{op.ref}'s card never showed {fragment!r}: {current() or full_text(card_of(sandbox, op))}"
    )
    return found


def version_text(text: str, blocks: list[dict[str, Any]]) -> str:
    return full_text(Message(channel=CHANNEL, ts="", user="", text=text, blocks=blocks))


def thread_texts(sandbox: Sandbox, op: Operation) -> list[str]:
    assert op.card_ts is not None
    return [unescape(full_text(m)) for m in sandbox.slack.thread_replies(CHANNEL, op.card_ts)]


async def click(sandbox: Sandbox, user: str, op: Operation, label: str) -> str:
    before = len(ephemerals(sandbox, user))
    result = await sandbox.agent.click_label(user=user, channel=CHANNEL, label=label, message_ts=op.card_ts)
    assert result.status == 200, result
    return unescape(await next_ephemeral(sandbox, user, before))


def write_zip(sandbox: Sandbox, name: str, entries: dict[str, bytes | str]) -> None:
    directory = sandbox.settings.artifacts.dir
    assert directory is not None
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for entry, content in entries.items():
            archive.writestr(entry, content)
    (Path(directory) / name).write_bytes(buffer.getvalue())


async def no_operations_and_refusals(sandbox: Sandbox, texts: list[str]) -> None:
    """Nothing was sent to Salesforce, no operation exists, and each command left one refusal."""
    assert soap_posts(sandbox) == 0
    assert sandbox.runtime is not None
    db = sandbox.runtime.db
    assert await repo.count_operations(db) == 0
    deadline = time.monotonic() + 5
    while True:  # a syntax error is answered in the ack; its audit row is written right after
        async with db.session() as session:
            audit = (await session.exec(select(AuditEvent))).all()
        if len(audit) >= len(texts) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert sorted(row.detail for row in audit) == sorted(f"/deploy {text}" for text in texts)
    assert all(row.action == "command" and row.outcome.startswith("refused") for row in audit)


# --------------------------------------------------------------------------- the main flows


def test_deploy_grammar() -> None:
    parsed = parse_deploy(
        "validate uat 'my release.zip' --tests InvoiceTest, acme__TaxTest.testRound --ignore-warnings "
        "--single-package --at tomorrow 09:00"
    )
    assert isinstance(parsed, DeployStart) and parsed.check_only and parsed.artifact == "my release.zip"
    assert parsed.flags.test_level == "RunSpecifiedTests"  # --tests implies it
    assert parsed.flags.tests == ("InvoiceTest", "acme__TaxTest.testRound")
    assert parsed.flags.ignore_warnings and parsed.flags.single_package and parsed.flags.rollback_on_error is None
    assert parsed.at == "tomorrow 09:00"
    start = parse_deploy("start prod x.zip --test-level runlocaltests --no-rollback-on-error")
    assert isinstance(start, DeployStart) and not start.check_only
    assert start.flags.test_level == "RunLocalTests" and start.flags.rollback_on_error is False
    assert parse_deploy("quick d7") == DeployQuick(ref="D7")
    assert parse_deploy("cancel 12") == DeployRef(action="cancel", ref="D12")
    assert isinstance(parse_deploy(""), DeployHelp)
    for text, fragment in [
        ("start uat", "takes an org and an artifact"),
        ("start 'u a t' x.zip", "is not an org alias"),
        ("status", "takes one reference"),
        ("status P3", "is not a deployment reference"),
        ("start uat x.zip --tests", "needs a value"),
        ("start uat x.zip --force", "Unknown option `--force`"),
        ("orgs now", "takes no arguments"),
    ]:
        with pytest.raises(UsageError) as error:
            parse_deploy(text)
        assert fragment in error.value.message, text
        assert error.value.usage and "/deploy start <org> <artifact>" in error.value.usage


def test_production_rules_apply_before_anything_is_created() -> None:
    options, notes = DeployService.options_for(
        DeployFlags(rollback_on_error=False, ignore_warnings=True), kind="production", check_only=False
    )
    assert options.rollback_on_error and options.ignore_warnings and notes
    sandbox_options, sandbox_notes = DeployService.options_for(
        DeployFlags(rollback_on_error=False, purge_on_delete=True, test_level="NoTestRun"),
        kind="sandbox",
        check_only=True,
    )
    assert not sandbox_options.rollback_on_error and sandbox_options.purge_on_delete and not sandbox_notes
    for flags in (
        DeployFlags(test_level="NoTestRun"),
        DeployFlags(purge_on_delete=True),
        DeployFlags(allow_missing_files=True),
        DeployFlags(auto_update_package=True),
    ):
        with pytest.raises(UsageError, match="not allowed for production orgs"):
            DeployService.options_for(flags, kind="production", check_only=True)


async def test_validate_then_approve_and_quick_deploy_to_production(sandbox: Sandbox) -> None:
    prod = mdapi(sandbox, "prod")
    answer = await deploy(sandbox, ALICE, "validate prod good-release --test-level RunLocalTests")
    ref = ref_in(answer)
    assert "is starting" in answer  # a validation needs no approval, even in production
    validation = await wait_op(sandbox, ref, states=[OpState.SUCCEEDED], card=True)
    assert validation.data["result"]["tests"] == [8, 8, 0] and validation.external_id
    card = await card_text_when(sandbox, validation, "Quick deploy")
    assert "Validated" in card and "can be quick-deployed to `prod` until" in card and "Quick deploy" in card
    sent = prod.calls("deploy")[0].args
    assert sent["checkOnly"] is True and sent["testLevel"] == "RunLocalTests" and sent["rollbackOnError"] is True

    # The requester clicks Quick deploy: production needs an approval from someone else.
    quick_answer = await click(sandbox, ALICE, validation, "Quick deploy")
    quick_ref = ref_in(quick_answer, exclude=[ref])
    assert "waiting for approval" in quick_answer
    quick = await wait_op(sandbox, quick_ref, card=True)
    assert quick.params["validation"]["ref"] == ref and prod.calls("deployRecentValidation") == []
    again = await click(sandbox, ALICE, validation, "Quick deploy")  # a second click creates nothing new
    assert f"already quick-deployed as {quick_ref}" in again
    assert "someone else has to approve" in await click(sandbox, ALICE, quick, "Approve")
    assert "You approved" in await click(sandbox, BOB, quick, "Approve")
    quick = await wait_op(sandbox, quick_ref, states=[OpState.SUCCEEDED], announced=True)

    calls = prod.calls("deployRecentValidation")
    assert [c.args["validationId"] for c in calls] == [validation.external_id]
    assert len(prod.calls("deploy")) == 1  # only the validation went through deploy()
    assert quick.external_id and quick.external_id != validation.external_id
    assert prod.snapshot(quick.external_id).status == "Succeeded"
    assert "is a quick deploy, not a validation" in await deploy(sandbox, ALICE, f"quick {quick_ref}")
    assert ("ApexClass", "InvoiceServiceTest") in prod.org_components
    notices = [m for m in sandbox.slack.messages.get(NOTIFY_CHANNEL, []) if f"quick deploy {quick_ref} " in m.text]
    assert len(notices) == 1
    assert any(f.name == f"deploy-{quick_ref}-report.txt" for f in sandbox.slack.files.values())


async def test_failing_deployment_lists_every_failure_and_edits_one_card(sandbox: Sandbox) -> None:
    uat = mdapi(sandbox, "uat")
    ref = ref_in(await deploy(sandbox, ALICE, "start uat failing-release.zip --test-level RunLocalTests"))
    op = await wait_op(sandbox, ref, states=[OpState.FAILED], announced=True)
    deploy_id = op.external_id or ""
    assert uat.snapshot(deploy_id).status == "Failed"
    assert op.data["result"]["components"] == [4, 7, 3] and op.data["result"]["tests"] == [10, 12, 2]

    replies = thread_texts(sandbox, op)
    failures = next(text for text in replies if "Component failures (3)" in text)
    for fragment in [
        "`classes/BrokenInvoiceCalc.cls` line 5 — Error: Variable does not exist: taxRate",
        "`classes/BrokenTaxRule.cls` line 3 — Error: Method does not exist",
        "`triggers/BrokenInvoiceTrigger.trigger` line 3 — Error: Field does not exist: Discount__c",
        "Apex test failures (2)",
        "`InvoiceRegressionTest.failsOnRounding` — System.AssertException: Assertion Failed: Expected: 10.01",
        "`Class.InvoiceRegressionTest.failsOnRounding: line 14, column 1`",
        "`InvoiceRegressionTest.failsOnNullCustomer` — System.NullPointerException",
    ]:
        assert fragment in failures, fragment
    report = next(f for f in sandbox.slack.files.values() if f.name == f"deploy-{ref}-report.txt")
    text = report.text() or ""
    assert "Component failures (3)" in text and "classes/BrokenTaxRule.cls:3:12" in text
    assert "Class.InvoiceRegressionTest.failsOnNullCustomer: line 29, column 1" in text
    notices = [m for m in sandbox.slack.messages.get(NOTIFY_CHANNEL, []) if f"deployment {ref} " in m.text]
    assert len(notices) == 1 and "❌ Failed" in notices[0].text

    # One card, edited in place: every edit changed it, and no more edits than status reads + 1.
    cards = [m for m in sandbox.slack.messages[CHANNEL] if not m.is_reply and not m.ephemeral_for]
    assert [m.ts for m in cards] == [op.card_ts]
    versions = [(v.text, v.blocks) for v in cards[0].history]
    assert all(a != b for a, b in itertools.pairwise(versions))
    updates = [c for c in sandbox.slack.calls_to("chat.update") if c.get("ts") == op.card_ts]
    polls = [c for c in uat.calls("checkDeployStatus") if c.args["id"] == deploy_id]
    assert 1 <= len(updates) <= len(polls) + 1
    assert any("Apex tests `" in (v.text + str(v.blocks)) for v in cards[0].history), "progress was shown"


async def test_production_deploy_is_sent_with_rollback_on_error(sandbox: Sandbox) -> None:
    prod = mdapi(sandbox, "prod")
    answer = await deploy(sandbox, ALICE, "start prod good-release.zip --no-rollback-on-error --ignore-warnings")
    assert "rollbackOnError stays on for production orgs" in answer and "waiting for approval" in answer
    ref = ref_in(answer)
    op = await wait_op(sandbox, ref, card=True)
    assert prod.calls("deploy") == []  # nothing is sent before approval
    assert "not an approver" not in await click(sandbox, BOB, op, "Approve")
    op = await wait_op(sandbox, ref, states=[OpState.SUCCEEDED])
    (sent,) = prod.calls("deploy")
    assert sent.args["rollbackOnError"] is True and sent.args["ignoreWarnings"] is True
    assert sent.args["checkOnly"] is False and "package.xml" in sent.args["entries"]
    assert op.data["result"]["tests"][1] == 8  # production ran local tests by default


BAD_INPUT = [
    (
        "start prod good-release.zip --test-level NoTestRun",
        "`--test-level NoTestRun` is not allowed for production",
    ),
    ("validate prod good-release.zip --purge-on-delete", "`--purge-on-delete` is not allowed for production"),
    ("start prod good-release.zip --allow-missing-files", "`--allow-missing-files` is not allowed for production"),
    ("start prod good-release.zip --auto-update-package", "`--auto-update-package` is not allowed for production"),
    ("start uat good-release.zip --tests InvoiceServiceTest --test-level RunLocalTests", "`--tests` only goes"),
    ("start uat good-release.zip --test-level RunSpecifiedTests", "needs `--tests A,B`"),
    ("start uat good-release.zip --test-level Everything", "`Everything` is not a test level"),
    ("start uat good-release.zip --tests 'Bad Name;DROP'", "Not an Apex test class name"),
    ("start nowhere good-release.zip", "No org called `nowhere`"),
    ("start uat missing.zip", "No artifact `missing.zip`"),
    ("start uat ../chatops.db", "points outside the artifacts directory"),
    ("start uat good-release.zip --at 2020-01-01 10:00", "is in the past"),
    ("start uat good-release.zip --rollback-on-error --no-rollback-on-error", "not both"),
    ("start uat https://evil.example.com/x.zip", "not under an allowed prefix"),
    ("quick D9", "No deployment `D9`"),
    ("promote uat x.zip", "Unknown subcommand `promote`"),
]


def bad_artifacts() -> list[tuple[str, dict[str, bytes | str], str]]:
    return [
        ("bomb.zip", {"package.xml": PACKAGE, "classes/Bomb.cls": b"\0" * (30 * 1024 * 1024)}, "looks like a zip bomb"),
        ("traversal.zip", {"package.xml": PACKAGE, "../../etc/evil.cls": "x"}, "points outside the artifact"),
        ("many.zip", {"package.xml": PACKAGE, **{f"classes/C{i}.cls": "" for i in range(10_000)}}, "10,001 files"),
        ("nopackage.zip", {"classes/A.cls": "public class A {}"}, "has no `package.xml`"),
    ]


async def test_bad_input_is_refused_before_any_soap_call(sandbox: Sandbox) -> None:
    for text, fragment in BAD_INPUT:
        answer = await deploy(sandbox, ALICE, text)
        assert fragment in answer, (text, answer)
    await no_operations_and_refusals(sandbox, [text for text, _ in BAD_INPUT])


async def test_bad_artifacts_are_refused_before_any_soap_call(sandbox: Sandbox) -> None:
    texts = []
    for name, entries, fragment in bad_artifacts():
        write_zip(sandbox, name, entries)
        texts.append(f"validate uat {name}")
        answer = await deploy(sandbox, ALICE, texts[-1])
        assert fragment in answer and f"`{name}`" in answer, (name, answer)
    await no_operations_and_refusals(sandbox, texts)


# --------------------------------------------------------------------------- resilience


async def test_session_expiry_mid_deployment_is_invisible(sandbox: Sandbox) -> None:
    uat = mdapi(sandbox, "uat")
    uat.slow_component_seconds = 1.2
    ref = ref_in(await deploy(sandbox, ALICE, "start uat slow-release.zip"))
    await wait_op(sandbox, ref, predicate=lambda o: (o.data.get("progress") or {}).get("status") == "InProgress")
    polls_before = len(uat.calls("checkDeployStatus"))
    sandbox.sandbox_org.expire_sessions()
    op = await wait_op(sandbox, ref, states=[OpState.SUCCEEDED], announced=True)
    assert len(uat.calls("checkDeployStatus")) > polls_before
    assert "last_problem" not in op.data and "transient_failures" not in op.data
    texts = [full_text(m) for m in sandbox.slack.messages[CHANNEL]]
    assert not any("trouble" in t or "did not accept" in t or "❗" in t for t in texts)
    tokens = [p for _, p in sandbox.sandbox_org.calls if p.endswith("/oauth2/token")]
    assert len(tokens) >= 2  # refreshed after the expiry


async def test_dropped_connections_and_5xx_while_polling_are_not_failures(sandbox: Sandbox) -> None:
    uat = mdapi(sandbox, "uat")
    uat.slow_component_seconds = 1.2
    ref = ref_in(await deploy(sandbox, ALICE, "start uat slow-release.zip"))
    await wait_op(sandbox, ref, predicate=lambda o: (o.data.get("progress") or {}).get("status") == "InProgress")
    uat.drop_next(1)
    uat.fail_next(1, 502)
    uat.fault_next("REQUEST_LIMIT_EXCEEDED", "ConcurrentRequests Limit exceeded.")
    op = await wait_op(sandbox, ref, states=[OpState.SUCCEEDED, OpState.FAILED, OpState.ERROR])
    assert op.data["result"]["status"] == "Succeeded"
    assert len(uat.calls("deploy")) == 1


async def test_an_ambiguous_deploy_is_never_sent_twice(sandbox: Sandbox) -> None:
    uat = mdapi(sandbox, "uat")
    uat.fail_next(1, 500)  # HTML 500, no SOAP fault: Salesforce may or may not have it
    ref = ref_in(await deploy(sandbox, ALICE, "start uat good-release.zip"))
    op = await wait_op(sandbox, ref, states=[OpState.ERROR])
    assert "may or may not have started it" in op.data["error"] and "not sent again" in op.data["error"]
    assert soap_posts(sandbox) == 1 and op.external_id is None  # ended: it is never polled again


# --------------------------------------------------------------------------- queue and cancel


async def test_queue_then_cancel_shows_canceling_then_canceled(sandbox: Sandbox) -> None:
    uat = mdapi(sandbox, "uat")
    uat.cancel_seconds = 3.0
    slow_ref = ref_in(await deploy(sandbox, ALICE, "start uat slow-release.zip"))
    slow = await wait_op(
        sandbox, slow_ref, card=True, predicate=lambda o: (o.data.get("progress") or {}).get("status") == "InProgress"
    )
    next_ref = ref_in(await deploy(sandbox, ALICE, "start uat good-release.zip"), exclude=[slow_ref])
    queued = await wait_op(
        sandbox, next_ref, card=True, predicate=lambda o: (o.data.get("progress") or {}).get("queue_ahead") == 1
    )
    assert "queued behind 1 deployment to `uat`" in await card_text_when(sandbox, queued, "queue position 2")
    assert uat.snapshot(queued.external_id or "").status == "Pending"

    # Cancel is for the requester (its approvers, admins): not for Carol.
    assert "Only the requester of" in await click(sandbox, CAROL, slow, "Cancel")
    answer = await click(sandbox, ALICE, slow, "Cancel")
    assert f"Salesforce is canceling {slow_ref}" in answer
    slow = await wait_op(sandbox, slow_ref, states=[OpState.CANCELING])
    assert uat.snapshot(slow.external_id or "").status == "Canceling"
    slow = await wait_op(sandbox, slow_ref, states=[OpState.CANCELED], announced=True)
    assert uat.snapshot(slow.external_id or "").status == "Canceled"
    history = [version_text(v.text, v.blocks) for v in card_of(sandbox, slow).history]
    assert any("Canceling" in text for text in history) and "Canceled" in history[-1]
    assert any("Cancel requested by <@U0ALICE>" in t for t in thread_texts(sandbox, slow))
    assert "already ended" in await deploy(sandbox, ALICE, f"cancel {slow_ref}")

    # The queued one starts once the org is free.
    done = await wait_op(sandbox, next_ref, states=[OpState.SUCCEEDED])
    assert done.data["result"]["status"] == "Succeeded"


@pytest.mark.parametrize("delay", [0.2, 0.5, 0.8, 1.1])
async def test_cancel_racing_the_completion_ends_in_one_consistent_state(sandbox: Sandbox, delay: float) -> None:
    """A cancel sent as the deployment finishes: whichever wins in Salesforce, the bot's state,
    the card, the user's answer and the completion notices all say the same thing, once."""
    uat = mdapi(sandbox, "uat")
    uat.component_seconds = 0.3  # about a second for the three components
    uat.cancel_seconds = 0.2
    ref = ref_in(await deploy(sandbox, ALICE, "start uat good-release.zip"))
    await wait_op(sandbox, ref, states=[OpState.RUNNING, OpState.SUCCEEDED])
    await asyncio.sleep(delay)
    answer = await deploy(sandbox, ALICE, f"cancel {ref}")
    op = await wait_op(sandbox, ref, states=[OpState.SUCCEEDED, OpState.CANCELED], announced=True)
    in_salesforce = uat.snapshot(op.external_id or "").status
    assert (op.state, in_salesforce) in {(OpState.SUCCEEDED, "Succeeded"), (OpState.CANCELED, "Canceled")}
    if "already ended" in answer or "already finished in Salesforce" in answer:
        assert op.state == OpState.SUCCEEDED
    else:
        assert f"Salesforce is canceling {ref}" in answer, answer
    label = "Succeeded" if op.state == OpState.SUCCEEDED else "Canceled"
    assert label in await card_text_when(sandbox, op, label)
    finished = [m for m in thread_texts(sandbox, op) if m.startswith(("✅", "✋ Canceled"))]
    notices = [m for m in sandbox.slack.messages.get(NOTIFY_CHANNEL, []) if f"deployment {ref} " in m.text]
    assert len(notices) == 1 and label in notices[0].text, [n.text for n in notices]
    assert len(uat.calls("deploy")) == 1 and len(finished) <= 1


async def test_cancel_before_approval_or_schedule_sends_nothing(sandbox: Sandbox) -> None:
    waiting = ref_in(await deploy(sandbox, ALICE, "start prod good-release.zip"))
    scheduled_answer = await deploy(sandbox, ALICE, "validate uat good-release.zip --at +2h")
    scheduled = ref_in(scheduled_answer, exclude=[waiting])
    assert "is scheduled for" in scheduled_answer
    await wait_op(sandbox, waiting, card=True)
    await wait_op(sandbox, scheduled, states=[OpState.SCHEDULED], card=True)
    assert f"{waiting} is canceled" in await deploy(sandbox, ALICE, f"cancel {waiting}")
    assert f"{scheduled} is canceled" in await deploy(sandbox, ALICE, f"cancel {scheduled}")
    for ref in (waiting, scheduled):
        op = await wait_op(sandbox, ref, states=[OpState.CANCELED], card=True)
        text = await card_text_when(sandbox, op, "Canceled")
        assert "Approve" not in text
    assert soap_posts(sandbox) == 0


# --------------------------------------------------------------------------- quick deploy rules


async def test_quick_deploy_of_a_validation_older_than_10_days_is_refused(sandbox: Sandbox) -> None:
    ref = ref_in(await deploy(sandbox, ALICE, "validate uat good-release.zip --test-level RunLocalTests"))
    no_tests = ref_in(await deploy(sandbox, ALICE, "validate uat good-release.zip"), exclude=[ref])
    op = await wait_op(sandbox, ref, states=[OpState.SUCCEEDED])
    assert sandbox.runtime is not None and op.id is not None
    eleven_days_ago = (datetime.now(UTC) - timedelta(days=11)).isoformat()
    result = {**op.data["result"], "completed_date": eleven_days_ago}
    await repo.update_operation(sandbox.runtime.db, operation_id=op.id, values={"data": {**op.data, "result": result}})
    mdapi(sandbox, "uat").backdate(op.external_id or "", days=11)
    answer = await deploy(sandbox, ALICE, f"quick {ref}")
    assert "more than 10 days ago" in answer and "Validate again" in answer
    assert mdapi(sandbox, "uat").calls("deployRecentValidation") == []

    await wait_op(sandbox, no_tests, states=[OpState.SUCCEEDED])
    assert "ran no Apex tests" in await deploy(sandbox, ALICE, f"quick {no_tests}")


async def test_url_artifacts_list_status_and_orgs(sandbox: Sandbox) -> None:
    store = sandbox.servers["artifacts"]
    answer = await deploy(sandbox, ALICE, f"validate uat {store.prefix}good-release.zip")
    ref = ref_in(answer)
    op = await wait_op(sandbox, ref, states=[OpState.SUCCEEDED])
    assert op.params["artifact"]["kind"] == "url" and "good-release.zip" in store.downloads
    listing = await deploy(sandbox, ALICE, "list")
    assert "Recent deployments" in listing and ref in listing
    status = await deploy(sandbox, ALICE, f"status {ref}")
    assert f"Status of {ref}" in status and "Validated" in status
    orgs = await deploy(sandbox, ALICE, "orgs")
    assert "`prod` (production): deployments need approval" in orgs and "`uat` (sandbox)" in orgs
    assert "/deploy start <org> <artifact>" in await deploy(sandbox, ALICE, "help")


# --------------------------------------------------------------------------- what real orgs answer

DEPLOY_STATUS_PAGE = (
    "/lightning/setup/DeployStatus/page?address=%2Fchangemgmt%2FmonitorDeploymentsDetails.apexp%3FasyncId%3D"
)


def report_of(sandbox: Sandbox, ref: str) -> str:
    report = next(f for f in sandbox.slack.files.values() if f.name == f"deploy-{ref}-report.txt")
    return report.text() or ""


def notices_of(sandbox: Sandbox, what: str) -> list[str]:
    return [unescape(m.text) for m in sandbox.slack.messages.get(NOTIFY_CHANNEL, []) if what in m.text]


async def test_validation_failing_on_code_coverage_alone_says_why_on_card_thread_and_report(sandbox: Sandbox) -> None:
    """Issue 13 item 1: Salesforce fails it with every component deployed, every test passed and
    no errorMessage; only runTestResult's coverage warnings say why."""
    prod = mdapi(sandbox, "prod")
    ref = ref_in(await deploy(sandbox, ALICE, "validate prod coverage-release.zip --test-level RunLocalTests"))
    op = await wait_op(sandbox, ref, states=[OpState.FAILED], announced=True)
    in_salesforce = prod.snapshot(op.external_id or "")
    assert in_salesforce.status == "Failed" and in_salesforce.error_message == ""
    assert op.data["result"]["components"] == [5, 5, 0] and op.data["result"]["tests"] == [8, 8, 0]
    coverage = op.data["coverage"]
    assert (coverage["average"], coverage["required"]) == (68, 75)
    assert [(c["name"], c["type"], c["percent"]) for c in coverage["classes"]] == [
        ("UncoveredInvoiceExport", "Apex Class", 0)
    ]
    assert [(f["name"], f["percent"]) for f in coverage["flows"]] == [("Uncovered_Invoice_Reminder", 0)]

    card = await card_text_when(sandbox, op, "Code coverage too low")
    reply = next(text for text in thread_texts(sandbox, op) if text.startswith("🧪"))
    for text in (card, reply):
        assert "Average across all Apex classes and triggers: *68%*, at least *75%* required." in text
        assert "Apex Class `UncoveredInvoiceExport`: 0% (at least 75%)" in text
        assert "Flow `Uncovered_Invoice_Reminder`: 0% (at least 75%)" in text
    assert "Validation failed" in card
    report = report_of(sandbox, ref)
    assert "Average across all Apex classes and triggers: 68% (at least 75% required)" in report
    assert "Apex Class UncoveredInvoiceExport: Test coverage of selected Apex Class is 0%" in report
    assert "Flow Uncovered_Invoice_Reminder: Test coverage of selected Flow is 0%" in report
    (notice,) = notices_of(sandbox, f"validation {ref} ")
    assert (
        "🧪 Code coverage too low: average 68%, at least 75% required; below it: `UncoveredInvoiceExport`, "
        "`Uncovered_Invoice_Reminder`"
    ) in notice


async def test_failure_without_any_reason_says_so_and_links_to_deployment_status(sandbox: Sandbox) -> None:
    uat = mdapi(sandbox, "uat")
    uat.fail_without_reason_next()
    ref = ref_in(await deploy(sandbox, ALICE, "start uat good-release.zip"))
    op = await wait_op(sandbox, ref, states=[OpState.FAILED], announced=True)
    assert uat.snapshot(op.external_id or "").status == "Failed"
    link = f"<{sandbox.sandbox_org.url}{DEPLOY_STATUS_PAGE}{op.external_id}|its Deployment Status page>"
    card = await card_text_when(sandbox, op, "gave no reason")
    (reply,) = [t for t in thread_texts(sandbox, op) if "gave no reason" in t]  # said once in the thread
    for text in (card, reply):
        assert "Salesforce marked it Failed and gave no reason" in text and link in text
    assert "Salesforce gave no reason for this failure" in report_of(sandbox, ref)
    assert f"{sandbox.sandbox_org.url}{DEPLOY_STATUS_PAGE}{op.external_id}" in report_of(sandbox, ref)
    (notice,) = notices_of(sandbox, f"deployment {ref} ")
    assert "gave no reason" in notice and link in notice


async def test_failing_test_shows_its_class_line_not_external_entry_point(sandbox: Sandbox) -> None:
    """Issue 13 item 4: real stack traces often start with `External entry point`."""
    ref = ref_in(await deploy(sandbox, ALICE, "start uat failing-release.zip --test-level RunLocalTests"))
    op = await wait_op(sandbox, ref, states=[OpState.FAILED], announced=True)
    (stored,) = [t for t in op.data["test_failures"] if t["method"] == "failsOnNullCustomer"]
    assert stored["stack_trace"].splitlines()[0] == "External entry point"  # as Salesforce sent it
    failures = next(text for text in thread_texts(sandbox, op) if "Apex test failures (2)" in text)
    assert (
        "`InvoiceRegressionTest.failsOnNullCustomer` — System.NullPointerException: Attempt to de-reference a null "
        "object\n    `Class.InvoiceRegressionTest.failsOnNullCustomer: line 29, column 1`"
    ) in failures
    assert "External entry point" not in failures
    # The report keeps the whole trace.
    assert "External entry point\n    Class.InvoiceRegressionTest.failsOnNullCustomer" in report_of(sandbox, ref)


async def test_deployment_card_links_to_its_deployment_status_page_and_notices_carry_the_id(
    sandbox: Sandbox,
) -> None:
    ref = ref_in(await deploy(sandbox, ALICE, "validate uat good-release.zip"))
    op = await wait_op(sandbox, ref, states=[OpState.SUCCEEDED], announced=True)
    deploy_id = op.external_id or ""
    assert deploy_id.startswith("0Af")
    # Built from the org's instance URL (the OAuth answer), not from anything typed in Slack.
    url = f"{sandbox.sandbox_org.url}{DEPLOY_STATUS_PAGE}{deploy_id}"
    card = await card_text_when(sandbox, op, "Deployment Status")
    assert f"Salesforce id `{deploy_id}` · <{url}|Deployment Status>" in card
    (notice,) = notices_of(sandbox, f"validation {ref} ")
    assert f"Salesforce id `{deploy_id}` · <{url}|Deployment Status>" in notice
    assert f"Deployment Status in Salesforce: {url}" in report_of(sandbox, ref)


# --------------------------------------------------------------------------- approvals fail closed (issue 12)

PUSH_RULE = ApprovalRule(action="push", org_kind="production", approvers=SANDBOX_APPROVERS)


@pytest.fixture
async def bob_approves_production(tmp_path: Path) -> AsyncIterator[Sandbox]:
    """Production deployments name one approver, Bob; no quick_deploy rule."""
    rules = [PUSH_RULE, ApprovalRule(action="deploy", org_kind="production", approvers=[BOB])]
    async with running_sandbox(workdir=tmp_path, job_seconds=0.01, subscribers=20, approval=rules) as running:
        yield running


@pytest.fixture
async def only_a_sandbox_deploy_rule(tmp_path: Path) -> AsyncIterator[Sandbox]:
    """A deploy rule exists, but only for the sandbox org: nothing names production approvers."""
    rules = [PUSH_RULE, ApprovalRule(action="deploy", org="uat", approvers=[BOB])]
    async with running_sandbox(workdir=tmp_path, job_seconds=0.01, subscribers=20, approval=rules) as running:
        yield running


async def validated(sandbox: Sandbox, user: str) -> Operation:
    ref = ref_in(await deploy(sandbox, user, "validate prod good-release --test-level RunLocalTests"))
    validation = await wait_op(sandbox, ref, states=[OpState.SUCCEEDED], card=True)
    await card_text_when(sandbox, validation, "Quick deploy")
    return validation


async def test_finding_3_quick_deploy_approvers_default_to_the_deploy_approvers(
    bob_approves_production: Sandbox,
) -> None:
    sandbox = bob_approves_production
    prod = mdapi(sandbox, "prod")
    validation = await validated(sandbox, ALICE)
    quick_ref = ref_in(await click(sandbox, ALICE, validation, "Quick deploy"), exclude=[validation.ref])
    quick = await wait_op(sandbox, quick_ref, card=True)
    assert "<@U0BOB>" in await card_text_when(sandbox, quick, "Needs 1 approval")
    for outsider in (CAROL, DAVE):
        assert "not an approver" in await click(sandbox, outsider, quick, "Approve")
    assert prod.calls("deployRecentValidation") == []
    assert "You approved" in await click(sandbox, BOB, quick, "Approve")
    quick = await wait_op(sandbox, quick_ref, states=[OpState.SUCCEEDED], announced=True)
    assert quick.data["approved_by"] == [BOB] and len(prod.calls("deployRecentValidation")) == 1


async def test_finding_3_the_validation_requester_cannot_approve_its_quick_deploy(sandbox: Sandbox) -> None:
    """Bob validated; Alice clicked Quick deploy; Bob approving would be four eyes on the click only."""
    prod = mdapi(sandbox, "prod")
    validation = await validated(sandbox, BOB)
    quick_ref = ref_in(await click(sandbox, ALICE, validation, "Quick deploy"), exclude=[validation.ref])
    quick = await wait_op(sandbox, quick_ref, card=True)
    refusal = await click(sandbox, BOB, quick, "Approve")
    assert (
        f"You requested the validation this quick deploy would deploy, so someone else has to approve {quick_ref}"
        in (refusal)
    )
    assert (await operation(sandbox, quick_ref)).state == OpState.AWAITING_APPROVAL
    assert prod.calls("deployRecentValidation") == []
    assert "You approved" in await click(sandbox, DAVE, quick, "Approve")
    quick = await wait_op(sandbox, quick_ref, states=[OpState.SUCCEEDED], announced=True)
    assert quick.params["validation"]["requester"] == BOB and quick.data["approved_by"] == [DAVE]


async def test_finding_4a_production_deploy_without_named_approvers_is_refused(
    only_a_sandbox_deploy_rule: Sandbox,
) -> None:
    sandbox = only_a_sandbox_deploy_rule
    text = "start prod good-release.zip"
    answer = await deploy(sandbox, ALICE, text)
    assert "Nobody is configured to approve deploys to production, so this request is refused" in answer
    assert 'add approvers = ["U…"] to an [[approval]] rule with action = "deploy", org_kind = "production"' in answer
    await no_operations_and_refusals(sandbox, [text])
    orgs = await deploy(sandbox, ALICE, "orgs")
    assert "`prod` (production): deployments are refused until approvers are configured" in orgs


async def test_finding_1_a_production_deploy_no_rule_matches_is_never_sent_unapproved(
    only_a_sandbox_deploy_rule: Sandbox,
) -> None:
    """Before, the rule for `uat` replaced the default, so a deployment to `prod` started at once."""
    sandbox = only_a_sandbox_deploy_rule
    await deploy(sandbox, ALICE, "start prod good-release.zip")
    await deploy(sandbox, ALICE, "start prod good-release.zip")  # a second try changes nothing either
    assert mdapi(sandbox, "prod").calls("deploy") == []
    assert sandbox.runtime is not None and await repo.count_operations(sandbox.runtime.db) == 0
    # The sandbox org's rule still applies where it matches.
    ref = ref_in(await deploy(sandbox, ALICE, "start uat good-release.zip"))
    op = await wait_op(sandbox, ref, card=True)
    assert op.state == OpState.AWAITING_APPROVAL and op.data["approval"]["approvers"] == [BOB]
