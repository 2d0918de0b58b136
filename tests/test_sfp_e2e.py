"""sfp server tasks end to end: signed Slack requests → the real bot → the simulated sfp server.

Everything is real HTTP on 127.0.0.1: the fake Slack records what the bot posts, the simulated
sfp server records every call and holds the tasks, and the assertions are on what a user would
see there, on the tasks in the simulator, and on the rows in the database.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import select

from bot.sandbox.embedded import NOTIFY_CHANNEL, Sandbox, running_sandbox
from bot.sandbox.fake_slack import Message
from bot.sandbox.sfp_server import SfpServerSim
from bot.settings import ApprovalRule
from bot.sfp.payloads import SfpData
from bot.store import repo
from bot.store.models import AuditEvent, Operation, OpKind, OpState
from tests.helpers import CHANNEL, eventually, full_text, outbox_drained

ALICE, BOB, CAROL = "U0ALICE", "U0BOB", "U0CAROL"
ADMIN = "U0DAVE"  # the sandbox's [access] admins: tasks the bot did not submit are for admins only
REVIEW_ENV = "review-env fetch --repo acme/sf-core --pool core --branch feature/ABC-123 --issue 42"
TOKENS: list[str] = []  # every simulated server's token, for the log scan after each test


@pytest.fixture(autouse=True)
def no_token_in_logs() -> Iterator[io.StringIO]:
    """Every test here keeps every log line (DEBUG, no redaction filter) and scans it for the token."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    TOKENS.clear()
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
    logs = buffer.getvalue()
    assert TOKENS and all(token not in logs for token in TOKENS)


def tune(sim: SfpServerSim) -> None:
    """Short tasks, and "every 1m" every second, so that a test sees several runs quickly."""
    TOKENS.append(sim.token)
    sim.task_seconds = 0.3
    sim.durations = {"fetchReviewEnvironment": 0.5}
    sim.queue_seconds = 0.1
    sim.time_speedup = 60.0


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with running_sandbox(workdir=tmp_path, job_seconds=0.01, subscribers=20) as running:
        tune(sfp_sim(running))
        yield running


def sfp_sim(sandbox: Sandbox) -> SfpServerSim:
    sim = sandbox.servers["sfp"]
    assert isinstance(sim, SfpServerSim)
    return sim


def new_channel(sandbox: Sandbox, name: str) -> str:
    """Slack paces posts per channel: flows in their own channels run side by side."""
    channel_id = f"C0{name.upper()}"
    sandbox.slack.add_channel(channel_id, name)
    return channel_id


def answers(sandbox: Sandbox, user: str, channel: str) -> list[Message]:
    return [m for m in sandbox.slack.messages.get(channel, []) if m.ephemeral_for == user]


async def sfp(sandbox: Sandbox, text: str, *, user: str = ALICE, channel: str = CHANNEL) -> str:
    """Run ``/sfp <text>`` as ``user``; return the first ephemeral answer it produced."""
    before = len(answers(sandbox, user, channel))
    result = await sandbox.agent.command(user=user, channel=channel, command="/sfp", text=text)
    assert result.status == 200, result
    found = await sandbox.slack.wait_for(
        lambda: answers(sandbox, user, channel)[before] if len(answers(sandbox, user, channel)) > before else None,
        20,
    )
    assert found is not None, f"no answer to /sfp {text}"
    return full_text(found)


async def click(sandbox: Sandbox, op: Operation, label: str, *, user: str = ALICE) -> str:
    before = len(answers(sandbox, user, op.channel))
    assert op.card_ts is not None
    result = await sandbox.agent.click_label(user=user, channel=op.channel, label=label, message_ts=op.card_ts)
    assert result.status == 200, result
    found = await sandbox.slack.wait_for(
        lambda: (
            answers(sandbox, user, op.channel)[before] if len(answers(sandbox, user, op.channel)) > before else None
        ),
        20,
    )
    assert found is not None, f"no answer to the {label} click"
    return full_text(found)


def ref_in(text: str) -> str:
    match = re.search(r"\b(S\d+)\b", text)
    assert match, text
    return match.group(1)


async def operation(sandbox: Sandbox, ref: str) -> Operation:
    assert sandbox.runtime is not None
    op = await repo.get_operation(sandbox.runtime.db, operation_id=int(ref.lstrip("S")))
    assert op is not None and op.kind == OpKind.SFP
    return op


async def wait_for(
    sandbox: Sandbox, ref: str, predicate: Callable[[Operation], bool], *, timeout: float = 30.0
) -> Operation:
    deadline = time.monotonic() + timeout
    while True:
        op = await operation(sandbox, ref)
        if predicate(op):
            return op
        if time.monotonic() > deadline:
            raise AssertionError(f"{ref} is {op.state} (announced {op.announced_state}); data {op.data}")
        await asyncio.sleep(0.05)


async def done(sandbox: Sandbox, ref: str, *states: OpState, timeout: float = 30.0) -> Operation:
    """Ended in one of ``states``, announced, and every Slack message about it sent."""
    await wait_for(sandbox, ref, lambda op: op.state in states and op.announced_state == op.state, timeout=timeout)
    deadline = time.monotonic() + timeout
    op = await operation(sandbox, ref)
    while not await outbox_drained(sandbox, op.id or 0):
        assert time.monotonic() < deadline, f"{ref}: Slack messages still owed"
        await asyncio.sleep(0.05)
    return await operation(sandbox, ref)


def card(sandbox: Sandbox, op: Operation) -> str:
    message = sandbox.slack.find_message(op.channel, op.card_ts or "")
    assert message is not None
    return full_text(message)


async def shows(sandbox: Sandbox, op: Operation, text: str, *, timeout: float = 10.0) -> bool:
    """The card shows ``text`` (edits are paced, so the newest state may take a moment)."""
    return bool(await sandbox.slack.wait_for(lambda: text in card(sandbox, op) or None, timeout))


def thread(sandbox: Sandbox, op: Operation) -> list[str]:
    assert op.card_ts is not None
    return [full_text(m) for m in sandbox.slack.thread_replies(op.channel, op.card_ts)]


def buttons(sandbox: Sandbox, op: Operation) -> list[str]:
    message = sandbox.slack.find_message(op.channel, op.card_ts or "")
    assert message is not None
    return [e["text"]["text"] for b in message.blocks if b.get("type") == "actions" for e in b.get("elements", [])]


def top_level_cards(sandbox: Sandbox, ref: str) -> list[Message]:
    return [
        m
        for m in sandbox.slack.messages[CHANNEL]
        if not m.is_reply and not m.ephemeral_for and f"sfp task {ref} " in (m.text or "")
    ]


def posts(sim: SfpServerSim) -> list[str]:
    return [path for method, path in sim.calls if method == "POST" and path == "/sfp/api/tasks"]


def iso_in(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- one-off tasks ----------------------------------------------------------------------------------


async def test_review_env_fetch_completes_with_the_result_on_the_card_and_in_the_thread(sandbox: Sandbox) -> None:
    sim = sfp_sim(sandbox)
    sim.durations["fetchReviewEnvironment"] = 1.5  # long enough to see the card while it runs
    answer = await sfp(sandbox, REVIEW_ENV + " --lease 2h")
    ref = ref_in(answer)
    assert "being submitted" in answer
    op = await done(sandbox, ref, OpState.SUCCEEDED)

    # The wire format: the docs' fetchReviewEnvironment example fields, defaults spelled out.
    assert posts(sim) == ["/sfp/api/tasks"]
    body = sim.bodies[0]
    assert body == {
        "type": "fetchReviewEnvironment",
        "data": {
            "repoId": "acme/sf-core",
            "pool": "core",
            "pooltype": "sandbox",
            "branch": "feature/ABC-123",
            "issue": "42",
            "leasefor": 7200,
        },
        "priority": "low",
        "scheduleType": "immediate",
    }
    task = sim.task(op.external_id or "")
    assert sim.status_of(task.operation_id)["status"] == "completed"

    # One card, edited in place up to "Completed", with the result readable on it.
    cards = top_level_cards(sandbox, ref)
    assert len(cards) == 1 and cards[0].edited
    assert await shows(sandbox, op, "Completed")
    shown = card(sandbox, op)
    assert "sandboxName" in shown and "environment_assigned" in shown
    assert [version for version in cards[0].history if "Running" in version.text or "Queued" in version.text]

    # The completion is posted once in the thread and once in the notifications channel.
    assert f"operation `{op.external_id}`" in shown
    replies = thread(sandbox, op)
    completions = [r for r in replies if r.startswith(f"✅ Completed: sfp task {ref}")]
    assert len(completions) == 1 and "rev" in completions[0]
    notices = [m for m in sandbox.slack.messages.get(NOTIFY_CHANNEL, []) if f"sfp task {ref} " in (m.text or "")]
    assert len(notices) == 1

    # The result carries a credential (sfdxAuthUrl): it is shown redacted and stored redacted.
    secret = sim._result_of(task)["environmentDetails"]["sfdxAuthUrl"]
    assert secret.startswith("force://")
    everything = "\n".join(full_text(m) for msgs in sandbox.slack.messages.values() for m in msgs)
    assert secret not in everything and "[redacted]" in shown
    assert secret not in str(op.data)

    assert "Result of" in (result := await sfp(sandbox, f"result {ref}")) and "sandboxName" in result
    assert secret not in result


async def test_long_results_failures_retries_and_the_list(sandbox: Sandbox) -> None:
    sim = sfp_sim(sandbox)
    sim.fail_types["extendReviewEnvironment"] = 1  # its first attempt fails

    async def long_result() -> str:
        channel = new_channel(sandbox, "long")
        ref = ref_in(await sfp(sandbox, "submit listAssignedReviewEnvironments pool=core", channel=channel))
        op = await done(sandbox, ref, OpState.SUCCEEDED)
        files = [f for f in sandbox.slack.files.values() if f.name == f"sfp-{ref}-result.json"]
        assert len(files) == 1 and (files[0].text() or "").count('"sandboxName"') == 40
        assert await shows(sandbox, op, "full result is attached")
        return ref

    async def failure() -> None:
        channel = new_channel(sandbox, "failure")
        ref = ref_in(
            await sfp(sandbox, "submit checkReviewEnvironment env=rev1 simulateFailure:=true", channel=channel)
        )
        op = await done(sandbox, ref, OpState.FAILED)
        completion = next(r for r in thread(sandbox, op) if r.startswith("❌ Failed"))
        assert "the sfp worker exited with code 1" in completion
        assert await shows(sandbox, op, "Failed")
        stack = [f for f in sandbox.slack.files.values() if f.name == f"sfp-{ref}-error.txt"]
        assert len(stack) == 1 and "TaskWorker.execute" in (stack[0].text() or "")

    async def retried() -> None:
        channel = new_channel(sandbox, "retried")
        ref = ref_in(
            await sfp(sandbox, "submit extendReviewEnvironment env=rev1 --retries 2 --priority high", channel=channel)
        )
        op = await done(sandbox, ref, OpState.SUCCEEDED)
        body = next(b for b in sim.bodies if b["type"] == "extendReviewEnvironment")
        assert body["retryConfig"]["maxRetries"] == 2 and body["priority"] == "high"
        assert len(sim.task(op.external_id or "").attempts) == 2

    assert "No sfp tasks yet" in await sfp(sandbox, "list")
    long_ref, _, _ = await asyncio.gather(long_result(), failure(), retried())
    listing = await sfp(sandbox, "list")
    assert "Recent sfp tasks" in listing and listing.count("• `S") == 3 and "listAssignedReviewEnvironments" in listing
    assert "Live from the sfp server: completed" in await sfp(sandbox, f"status {long_ref}")


async def test_scheduled_task_starts_at_its_time(sandbox: Sandbox) -> None:
    sim = sfp_sim(sandbox)
    at = iso_in(3)
    ref = ref_in(await sfp(sandbox, f"submit checkReviewEnvironment env=rev1 --at {at}"))
    op = await wait_for(sandbox, ref, lambda o: o.state == OpState.SCHEDULED and o.card_ts is not None)
    assert sim.bodies[0]["scheduleType"] == "scheduled"
    assert sim.bodies[0]["scheduledFor"] == at.replace("Z", ".000Z")
    assert sim.status_of(op.external_id or "")["status"] == "pending"
    assert await shows(sandbox, op, "Scheduled")

    op = await done(sandbox, ref, OpState.SUCCEEDED)
    task = sim.task(op.external_id or "")
    started = task.attempts[0].start
    assert started >= datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()
    assert any("it starts" in r for r in thread(sandbox, op))


# -- recurring tasks --------------------------------------------------------------------------------


async def test_recurring_tasks_runs_stop_second_stop_and_end_date(sandbox: Sandbox) -> None:
    sim = sfp_sim(sandbox)

    async def stopped_by_the_button() -> None:
        ref = ref_in(await sfp(sandbox, "submit checkReviewEnvironment env=rev1 --every 1m --until +2h"))
        op = await wait_for(sandbox, ref, lambda o: (SfpData.of(o).run_counts or {}).get("completed", 0) >= 2)
        body = next(b for b in sim.bodies if b["data"] == {"env": "rev1"})
        assert body["scheduleType"] == "recurring" and body["recurrenceConfig"]["every"] == 60_000
        assert "endDate" in body["recurrenceConfig"]

        runs = await sfp(sandbox, f"runs {ref}")
        assert f"Runs of {ref}" in runs and "#1 completed" in runs and "#2 completed" in runs

        # Stop from the card's button; a second stop gets the server's 400 as "already stopped".
        assert await shows(sandbox, op, "Stop")
        stopped = await click(sandbox, op, "Stop")
        assert f"{ref} is stopped: no further runs will start" in stopped
        assert "already stopped" in await sfp(sandbox, f"stop {ref}")

        op = await done(sandbox, ref, OpState.SUCCEEDED, OpState.FAILED)
        parent = sim.task(op.external_id or "")
        assert parent.stopped_at is not None
        sim.status_of(parent.operation_id)  # brings the server up to now: runs due by now would start
        assert all(sim.task(i).start_at < parent.stopped_at for i in parent.instances)

        # Every run's outcome is in the thread exactly once; the card has no Stop button any more.
        replies = thread(sandbox, op)
        for number in range(1, len(parent.instances) + 1):
            assert sum(1 for r in replies if re.match(rf"^\S+ Run #{number} ", r)) == 1, (number, replies)
        assert any(r.startswith("✋ Stopped: no further runs") for r in replies)
        assert "Stop" not in buttons(sandbox, op)
        assert [f for f in sandbox.slack.files.values() if f.name == f"sfp-{ref}-runs.csv"]

    async def ended_by_its_end_date() -> None:
        channel = new_channel(sandbox, "enddate")
        text = f"submit checkReviewEnvironment env=rev2 simulateFailure:=true --every 1m --until {iso_in(6)}"
        ref = ref_in(await sfp(sandbox, text, channel=channel))
        op = await done(sandbox, ref, OpState.FAILED)
        replies = thread(sandbox, op)
        assert any(r.startswith("❌ Run #1 failed") and "exited with code 1" in r for r in replies)
        assert any(r.startswith("🏁 Reached its end date") for r in replies)
        assert await shows(sandbox, op, "Ended with failed runs")
        assert "already stopped, or it has completed" in await sfp(sandbox, f"stop {ref}", channel=channel)

    await asyncio.gather(stopped_by_the_button(), ended_by_its_end_date())


# -- cancel -----------------------------------------------------------------------------------------


async def test_cancel_of_an_active_task_shows_cancelled(sandbox: Sandbox) -> None:
    sim = sfp_sim(sandbox)
    sim.durations["checkReviewEnvironment"] = 60.0
    ref = ref_in(await sfp(sandbox, "submit checkReviewEnvironment env=rev1"))
    op = await wait_for(sandbox, ref, lambda o: SfpData.of(o).status == "active" and o.card_ts is not None)
    assert await shows(sandbox, op, "Running")

    answer = await sfp(sandbox, f"cancel {ref}")
    assert f"cancelling {ref}" in answer
    op = await done(sandbox, ref, OpState.CANCELED)
    assert await shows(sandbox, op, "Cancelled")
    assert sim.status_of(op.external_id or "")["status"] == "cancelled"
    assert ("DELETE", f"/sfp/api/tasks/{op.external_id}") in sim.calls
    assert "already ended" in await sfp(sandbox, f"cancel {ref}")


async def test_approval_rules_match_task_types_and_recurring_tasks(tmp_path: Path) -> None:
    rules = [
        ApprovalRule(action="sfp", task_type="unassignReviewEnvironment", approvers=[BOB]),
        ApprovalRule(action="sfp_recurring", approvers=[BOB]),
    ]
    async with running_sandbox(workdir=tmp_path, job_seconds=0.01, subscribers=20, approval=rules) as sandbox:
        sim = sfp_sim(sandbox)
        tune(sim)
        recurring = await sfp(sandbox, "submit checkReviewEnvironment env=rev1 --every 1h")
        assert "waiting for approval" in recurring
        guarded = ref_in(await sfp(sandbox, "submit unassignReviewEnvironment env=rev1"))
        op = await wait_for(sandbox, guarded, lambda o: o.card_ts is not None)
        assert op.state == OpState.AWAITING_APPROVAL and posts(sim) == []  # nothing sent before approval

        # Rules for other types leave this one alone: no approval needed.
        plain = await sfp(sandbox, "submit checkReviewEnvironment env=rev3", channel=new_channel(sandbox, "plain"))
        assert "being submitted" in plain
        await done(sandbox, ref_in(plain), OpState.SUCCEEDED)

        # Cancelled while waiting: nothing is ever sent.
        assert "never sent to the sfp server" in await sfp(sandbox, f"cancel {ref_in(recurring)}")
        assert "not an approver" in await click(sandbox, op, "Approve", user=CAROL)
        assert "You approved" in await click(sandbox, op, "Approve", user=BOB)
        await done(sandbox, guarded, OpState.SUCCEEDED)
        await done(sandbox, ref_in(recurring), OpState.CANCELED)
        assert len(posts(sim)) == 2


# -- errors -----------------------------------------------------------------------------------------


async def test_unknown_ids_and_wrong_kinds_get_clear_messages(sandbox: Sandbox) -> None:
    sim = sfp_sim(sandbox)
    sim.durations["extendReviewEnvironment"] = 60.0
    assert "has no task with operation id `424242`" in await sfp(sandbox, "status op:424242", user=ADMIN)
    assert "has no recurring task with operation id `424242`" in await sfp(sandbox, "stop op:424242", user=ADMIN)
    assert "has no recurring task" in await sfp(sandbox, "runs op:424242", user=ADMIN)
    assert "No sfp task `S999`" in await sfp(sandbox, "status S999")

    async def one_off() -> None:
        ref = ref_in(await sfp(sandbox, "submit checkReviewEnvironment env=rev1"))
        op = await done(sandbox, ref, OpState.SUCCEEDED)
        assert "not a recurring task" in await sfp(sandbox, f"stop {ref}")
        assert "not a recurring task" in await sfp(sandbox, f"runs {ref}")
        # A one-off task's operation id given to stop-recurring: the server's 404 "not recurring".
        assert "not a recurring task" in await sfp(sandbox, f"stop op:{op.external_id}")

    async def forgotten() -> None:
        # The server forgets a task it was running: the card says so instead of polling forever.
        channel = new_channel(sandbox, "forgotten")
        ref = ref_in(await sfp(sandbox, "submit extendReviewEnvironment env=rev2", channel=channel))
        op = await wait_for(sandbox, ref, lambda o: o.external_id is not None)
        sim.forget(op.external_id or "")
        op = await done(sandbox, ref, OpState.ERROR)
        assert await shows(sandbox, op, "no longer knows operation")
        assert "no longer knows" in await sfp(sandbox, f"status {ref}", channel=channel)

    await asyncio.gather(one_off(), forgotten())


async def test_wrong_token_names_the_sfp_configuration_and_recovers(sandbox: Sandbox) -> None:
    sim = sfp_sim(sandbox)
    good = sim.token
    sim.token = "a-different-token-entirely"
    answer = await sfp(sandbox, "status op:1000000001", user=ADMIN)
    assert "refused the bot's token" in answer and "SFP_TOKEN" in answer and "[sfp] url" in answer
    assert "Traceback" not in answer and good not in answer

    ref = ref_in(await sfp(sandbox, "submit checkReviewEnvironment env=rev2"))
    op = await wait_for(
        sandbox, ref, lambda o: "refused the bot's token" in str(SfpData.of(o).last_problem) and bool(o.card_ts)
    )
    assert op.state == OpState.STARTING and op.external_id is None and sim.tasks == {}
    assert await shows(sandbox, op, "refused the bot's token")
    sim.token = good
    # The next attempt (2 minutes later) would go through; make it due now instead of waiting.
    assert sandbox.runtime is not None
    await repo.update_operation(sandbox.runtime.db, operation_id=op.id or 0, values={"next_poll_at": datetime.now(UTC)})
    await done(sandbox, ref, OpState.SUCCEEDED)
    assert len(sim.tasks) == 1


async def test_bad_input_is_refused_before_any_call(sandbox: Sandbox) -> None:
    sim = sfp_sim(sandbox)
    sim.reset_calls()
    cases = {
        "submit": "Which task type?",
        "submit checkReviewEnvironment env": "is not `key=value`",
        "submit checkReviewEnvironment =x": "is not a data key",
        "submit checkReviewEnvironment a=1 a=2": "`a` is given twice",
        "submit checkReviewEnvironment n:=[1,": "needs a JSON value",
        "submit 9lives a=1": "is not a task type",
        "submit checkReviewEnvironment --every 30s": "at least 1 minute",
        "submit checkReviewEnvironment --until +1h": "only goes with `--every`",
        "submit checkReviewEnvironment --retries 99": "from 0 to 10",
        "submit checkReviewEnvironment --priority urgent": "`--priority` is one of",
        "submit checkReviewEnvironment --at yesterday": "can't read `yesterday` as a time",
        "submit checkReviewEnvironment --every 1h --at +2h --until +1h": "must be after the first run",
        "review-env fetch --repo acme --pool core --branch main": "is not a repository",
        "review-env fetch --repo a/b --pool core --branch bad..branch": "not a valid git branch name",
        "review-env fetch --repo a/b --pool core": "needs `--branch`",
        "review-env fetch --repo a/b --pool core --branch main --lease 3d": "between 5 minutes and 24 hours",
        "status P12": "is not an sfp task",
        "status op:../etc": "is not an sfp operation id",
        "frobnicate": "Unknown subcommand",
    }
    for text, expected in cases.items():
        answer = await sfp(sandbox, text)
        assert expected in answer, (text, answer)
        assert "tasks on the sfp server" in answer or "takes a time" in answer, text  # usage with every refusal
    assert sim.calls == []
    assert sandbox.runtime is not None
    assert await repo.count_operations(sandbox.runtime.db) == 0
    runtime = sandbox.runtime

    async def refusals() -> list[AuditEvent]:
        async with runtime.db.session() as session:
            return list((await session.exec(select(AuditEvent).where(AuditEvent.action == "command"))).all())

    audit = await eventually(refusals, until=lambda rows: len(rows) >= len(cases))  # audited after the ack
    assert len(audit) == len(cases) and all(row.outcome.startswith("refused") for row in audit)


async def test_a_submit_whose_answer_was_lost_is_never_sent_again(sandbox: Sandbox) -> None:
    sim = sfp_sim(sandbox)
    lost_500, dropped = new_channel(sandbox, "lost500"), new_channel(sandbox, "dropped")
    # The task is created, then the answer is a 500; or the connection drops after the work.
    sim.force("POST", r"^/sfp/api/tasks$", 500, after=True)
    first = ref_in(await sfp(sandbox, "submit checkReviewEnvironment env=rev1", channel=lost_500))
    await wait_for(sandbox, first, lambda o: o.state == OpState.ERROR)
    sim.force("POST", r"^/sfp/api/tasks$", 0, after=True)
    second = ref_in(await sfp(sandbox, "submit checkReviewEnvironment env=rev2", channel=dropped))
    await wait_for(sandbox, second, lambda o: o.state == OpState.ERROR)
    assert len(posts(sim)) == 2 and len(sim.tasks) == 2  # each sent once, though both exist
    for ref in (first, second):
        op = await done(sandbox, ref, OpState.ERROR)
        assert await shows(sandbox, op, "may or may not exist")

    # Refused before any work (503 with Retry-After): sent again, and exactly one task results.
    sim.force("POST", r"^/sfp/api/tasks$", 503, times=2)
    third = ref_in(await sfp(sandbox, "submit checkReviewEnvironment env=rev3"))
    await done(sandbox, third, OpState.SUCCEEDED)
    assert len(posts(sim)) == 5 and len(sim.tasks) == 3


async def test_every_task_type_allowed_with_a_star_and_the_servers_refusal_on_the_card(tmp_path: Path) -> None:
    """``task_types = ["*"]`` lets any type through to the server; a 400 from the server is the
    task's own refusal, shown on the card."""
    async with running_sandbox(workdir=tmp_path, job_seconds=0.01, subscribers=20, sfp_task_types=["*"]) as sandbox:
        sim = sfp_sim(sandbox)
        tune(sim)
        ref = ref_in(await sfp(sandbox, "submit notARealTaskType a=1"))
        op = await done(sandbox, ref, OpState.ERROR)
        assert await shows(sandbox, op, "refused the task: type must be one of")
        assert [body["type"] for body in sim.bodies] == ["notARealTaskType"]


async def test_a_submit_the_bot_died_in_is_not_sent_again(sandbox: Sandbox) -> None:
    """The attempt was recorded, then the bot was killed before the answer: the task may exist."""
    sim = sfp_sim(sandbox)
    assert sandbox.runtime is not None
    request = {"type": "checkReviewEnvironment", "data": {"env": "rev1"}, "priority": "low"}
    op, _ = await repo.insert_operation(
        sandbox.runtime.db,
        operation=Operation(
            kind=OpKind.SFP,
            state=OpState.STARTING,
            step="submit",
            summary="checkReviewEnvironment",
            params=request,
            data={"submit": {"state": "sending", "at": datetime.now(UTC).isoformat()}},
            requester=ALICE,
            channel=CHANNEL,
            idempotency_key="sfp:died-mid-call",
            next_poll_at=datetime.now(UTC),
        ),
    )
    op = await done(sandbox, op.ref, OpState.ERROR)
    assert "may or may not exist" in str(SfpData.of(op).error) and posts(sim) == []
    assert await shows(sandbox, op, "not sent again automatically")


# -- secrets ----------------------------------------------------------------------------------------


async def test_a_full_run_never_logs_the_token(sandbox: Sandbox, no_token_in_logs: io.StringIO) -> None:
    """Submit and result, a recurring task stopped, a cancel and a wrong token, side by side."""
    sim = sfp_sim(sandbox)
    token = sim.token
    sim.durations["extendReviewEnvironment"] = 60.0

    async def submit_and_result() -> None:
        ref = ref_in(await sfp(sandbox, REVIEW_ENV))
        await done(sandbox, ref, OpState.SUCCEEDED)
        assert "Result of" in await sfp(sandbox, f"result {ref}")

    async def recurring_stopped() -> None:
        channel = new_channel(sandbox, "recurring")
        ref = ref_in(await sfp(sandbox, "submit checkReviewEnvironment env=rev1 --every 1m", channel=channel))
        await wait_for(sandbox, ref, lambda o: bool((SfpData.of(o).run_counts or {}).get("completed")))
        assert "is stopped" in await sfp(sandbox, f"stop {ref}", channel=channel)
        assert "already stopped" in await sfp(sandbox, f"stop {ref}", channel=channel)
        await done(sandbox, ref, OpState.SUCCEEDED, OpState.FAILED)

    async def cancelled() -> None:
        channel = new_channel(sandbox, "cancel")
        ref = ref_in(await sfp(sandbox, "submit extendReviewEnvironment env=rev2", channel=channel))
        await wait_for(sandbox, ref, lambda o: SfpData.of(o).status == "active")
        await sfp(sandbox, f"cancel {ref}", channel=channel)
        await done(sandbox, ref, OpState.CANCELED)

    await asyncio.gather(submit_and_result(), recurring_stopped(), cancelled())
    sim.token = "not-the-configured-one"
    assert "refused the bot's token" in await sfp(sandbox, "status S1")
    sim.token = token

    logs = no_token_in_logs.getvalue()  # the fixture scans it again, with every other test
    assert "sfp" in logs and "DEBUG" in logs  # the run did log, at DEBUG
    assert token not in logs
    assert sandbox.runtime is not None
    async with sandbox.runtime.db.session() as session:
        rows = [*(await session.exec(select(Operation))).all(), *(await session.exec(select(AuditEvent))).all()]
    assert all(token not in repr(row) for row in rows)
    slack_text = "\n".join(f"{m.text} {m.blocks}" for messages in sandbox.slack.messages.values() for m in messages)
    files = "\n".join(f.text() or "" for f in sandbox.slack.files.values())
    assert token not in slack_text and token not in files
