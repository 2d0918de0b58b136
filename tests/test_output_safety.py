"""What the bot writes out is safe to open (issue 12, findings 5, 6, 9c and 12).

End to end through signed Slack requests to the real bot and its simulators: CSV files a
spreadsheet would run, credentials an upstream system or a user put in text, and Slack control
sequences in the plain-text ``text`` of messages. The assertions are on what lands in the fake
Slack (messages, every edit, files, raw API calls), in the audit table, in the database and in
the logs as the bot writes them.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlmodel import select

from bot.cli import main
from bot.logs import RedactingFilter
from bot.sandbox.embedded import NOTIFY_CHANNEL, Sandbox, running_sandbox
from bot.sandbox.flexdeploy_server import FlexDeploySim
from bot.sandbox.sfp_server import SfpServerSim
from bot.store import repo
from bot.store.models import AuditEvent, Operation, OpState
from tests.helpers import CHANNEL, click, ephemerals, full_text, next_ephemeral, outbox_drained, push, ref_in

ALICE, BOB = "U0ALICE", "U0BOB"
FORMULA = '=HYPERLINK("http://evil.example/x","click")'

# Each credential shape, and the part of it that must never be seen again.
SESSION_ID = "00D5g000004XyZa!AQ4AQH0dMHZfz972Szr3YL8T_mv.SessionTokenValue"
SECRETS = {
    "session id": "AQ4AQH0dMHZfz972Szr3YL8T_mv.SessionTokenValue",
    "sid parameter": "FrontDoorSidValue9x9x9",
    "refresh token by key": "5Aep861RefreshTokenByKey",
    "refresh token in text": "5Aep861RefreshTokenInText",
    "access token by key": "AccessTokenByKeyValue77",
    "pwd": "Hunter2PwdValue",
    "nested password": "NestedPasswordValue",
    "private key body": "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7",
    "url password": "ghp_UrlPasswordValue123",
    "force url": "5Aep861ForceUrlRefresh",
    "slack bot token": "xoxb-1111-2222-SlackBotTokenValue",
    "slack app token": "xapp-1-A111-2222-SlackAppTokenValue",
    "bearer": "BearerTokenValue12345",
    "client secret": "ClientSecretValue000",
}
ORG_ID = "00D5g000004XyZaEAK"  # an ordinary org id: it stays readable
LEAKY_RESULT = {
    "message": f"Logged in as deploy@acme.com with session {SESSION_ID} on org {ORG_ID}",
    "frontdoor": f"https://acme.my.salesforce.com/secur/frontdoor.jsp?sid={SECRETS['sid parameter']}&retURL=/",
    "auth": {"refresh_token": SECRETS["refresh token by key"], "accessToken": SECRETS["access token by key"]},
    "notes": f"sf org login --refresh_token={SECRETS['refresh token in text']} done",
    "pwd": SECRETS["pwd"],
    "users": [{"name": "ci", "settings": {"password": SECRETS["nested password"]}}],
    "jwt": f"-----BEGIN PRIVATE KEY-----\n{SECRETS['private key body']}\nAnotherLine\n-----END PRIVATE KEY-----",
    "repo": f"https://deploy:{SECRETS['url password']}@github.com/acme/sf-core.git",
    "authUrlEcho": f"see force://PlatformCLI::{SECRETS['force url']}@acme.my.salesforce.com",
    "slack": f"posted with {SECRETS['slack bot token']} and {SECRETS['slack app token']}",
    "header": f"Authorization: Bearer {SECRETS['bearer']}",
    "config": {"client_secret": SECRETS["client secret"]},
    # Long enough to be attached as a file as well as shown.
    "log": [f"step {n}: ok" for n in range(40)],
}


@pytest.fixture
def bot_logs() -> Iterator[io.StringIO]:
    """Every log line at DEBUG, through the filter the bot installs in production."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with running_sandbox(workdir=tmp_path, job_seconds=0.01, subscribers=20) as running:
        sim = running.servers["sfp"]
        assert isinstance(sim, SfpServerSim)
        sim.task_seconds, sim.queue_seconds = 0.2, 0.05
        yield running


def sfp_ref(text: str) -> str:
    match = re.search(r"\b(S\d+)\b", text)
    assert match, text
    return match.group(1)


def everything_slack_got(sandbox: Sandbox) -> str:
    """Every message (and each of its edits), every file and every raw Web API call."""
    parts = [json.dumps(sandbox.slack.calls, default=str)]
    for messages in sandbox.slack.messages.values():
        for message in messages:
            parts.append(full_text(message))
            parts.extend(version.text + json.dumps(version.blocks) for version in message.history)
    parts.extend(f.text() or "" for f in sandbox.slack.files.values())
    return "\n".join(parts)


async def audit_rows(sandbox: Sandbox) -> list[AuditEvent]:
    assert sandbox.runtime is not None
    async with sandbox.runtime.db.session() as session:
        return list((await session.exec(select(AuditEvent))).all())


async def settled(sandbox: Sandbox, op_id: int, *states: OpState, timeout: float = 30.0) -> Operation:
    """Ended in one of ``states``, announced, and every Slack message about it delivered."""
    assert sandbox.runtime is not None
    deadline = time.monotonic() + timeout
    while True:
        op = await repo.get_operation(sandbox.runtime.db, operation_id=op_id)
        assert op is not None
        if op.state in states and op.announced_state == op.state and await outbox_drained(sandbox, op_id):
            await sandbox.slack.wait_quiet()
            return op
        assert time.monotonic() < deadline, f"{op.ref} stayed {op.state}"
        await asyncio.sleep(0.05)


async def command(sandbox: Sandbox, name: str, text: str, *, user: str = ALICE) -> str:
    before = len(ephemerals(sandbox, user))
    result = await sandbox.agent.command(user=user, channel=CHANNEL, command=name, text=text)
    assert result.status == 200, result
    return await next_ephemeral(sandbox, user, before)


# -- finding 5: CSV formula injection ---------------------------------------------------------------


async def test_finding_5_csv_formula_injection_in_the_push_failures_csv(sandbox: Sandbox) -> None:
    """Org names are chosen by the ISV's customers: a failed org named like a formula."""
    sim = sandbox.packaging
    sim.state.failure_rate = 1.0
    for row in sim.subscribers:
        row["OrgName"] = FORMULA
    ref = ref_in(await push(sandbox, ALICE, "create Acme Billing@1.4.0 --orgs sandbox"))
    op = await settled(sandbox, int(ref.lstrip("P")), OpState.FAILED, OpState.SUCCEEDED)
    files = [f for f in sandbox.slack.files.values() if f.name == f"push-{op.ref}-failures.csv"]
    assert len(files) == 1
    # Read as a spreadsheet would: error messages may span lines inside a quoted cell.
    header, *rows = list(csv.reader(io.StringIO(files[0].text() or "")))
    names = [row[header.index("org_name")] for row in rows]
    assert names and all(name == "'" + FORMULA for name in names), names[:2]
    assert not any(cell.startswith(("=", "+", "@")) for row in rows for cell in row)


async def test_finding_5_csv_formula_injection_in_the_flexdeploy_files_csv(sandbox: Sandbox) -> None:
    sim = sandbox.servers["flexdeploy"]
    assert isinstance(sim, FlexDeploySim)
    package = sim.projects[101].packages["Big Bang"]  # the simulator's own row, not a copy
    package["files"][0]["filePath"] = FORMULA
    package["files"][1]["filePath"] = "@SUM(1+1)"
    await command(sandbox, "/fd", 'show 101 "Big Bang"')
    found = await sandbox.slack.wait_for(
        lambda: next((f for f in sandbox.slack.files.values() if f.name == "fd-101-Big_Bang-files.csv"), None), 10
    )
    assert found is not None
    await sandbox.slack.wait_for(lambda: found.text() or None, 10)
    rows = (found.text() or "").strip().splitlines()
    assert any(row.endswith(f'"\'{FORMULA.replace(chr(34), chr(34) * 2)}"') for row in rows)
    assert any(row.endswith(",'@SUM(1+1)") for row in rows)
    assert not any(",=" in row or ",@" in row for row in rows)


def test_finding_5_csv_formula_injection_in_the_audit_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reject reason is typed by a person; exported to CSV it must not run as a formula."""

    async def reject_with_formula() -> None:
        from bot.store.db import Database, migrate

        url = f"sqlite:///{tmp_path / 'chatops.db'}"
        await migrate(url)
        db = Database(url)
        try:
            await repo.audit(db, actor=BOB, channel=CHANNEL, operation_ref="P1", action="reject", detail="@SUM(1)")
        finally:
            await db.close()

    asyncio.run(reject_with_formula())
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'chatops.db'}")
    out = tmp_path / "audit.csv"
    assert main(["audit", "--format", "csv", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    rejects = [line for line in lines if ",reject," in line]
    assert rejects and all(",'@SUM(1)," in line for line in rejects), rejects
    assert not any(",@SUM" in line for line in lines)


# -- findings 6 and 9c: credentials in sfp results and in typed task data -----------------------------


async def test_finding_6_credentials_in_sfp_results_reach_no_message_file_audit_row_or_log(
    sandbox: Sandbox, bot_logs: io.StringIO
) -> None:
    sim = sandbox.servers["sfp"]
    assert isinstance(sim, SfpServerSim)
    sim.results["checkReviewEnvironment"] = LEAKY_RESULT
    ref = sfp_ref(await command(sandbox, "/sfp", "submit checkReviewEnvironment"))
    op = await settled(sandbox, int(ref.lstrip("S")), OpState.SUCCEEDED)
    result_answer = await command(sandbox, "/sfp", f"result {ref}")
    logging.getLogger("bot.test").info("the task answered %s", LEAKY_RESULT)  # as any log line quoting it would

    slack = everything_slack_got(sandbox)
    assert f"sfp-{op.ref}-result.json" in {f.name for f in sandbox.slack.files.values()}
    assert any(f"sfp task {ref}" in (m.text or "") for m in sandbox.slack.messages.get(NOTIFY_CHANNEL, []))
    stored = json.dumps(op.data) + json.dumps(op.params)
    audit = json.dumps([row.model_dump(mode="json") for row in await audit_rows(sandbox)])
    for what, secret in SECRETS.items():
        assert secret not in slack, f"{what} reached Slack"
        assert secret not in stored, f"{what} is stored"
        assert secret not in audit, f"{what} is in the audit"
        assert secret not in bot_logs.getvalue(), f"{what} is in the logs"
    assert ORG_ID in slack and "[redacted]" in result_answer
    assert "deploy:[redacted]@github.com" in slack  # the user and host stay readable


async def test_finding_9c_audit_rows_keep_no_secrets_typed_into_sfp_data(sandbox: Sandbox) -> None:
    answer = await command(
        sandbox, "/sfp", "submit checkReviewEnvironment password=hunter22 token=abc99xyz client_secret=s3cr3t"
    )
    ref = sfp_ref(answer)
    await settled(sandbox, int(ref.lstrip("S")), OpState.SUCCEEDED)
    rows = await audit_rows(sandbox)
    assert any(row.action == "command" and "password=" in row.detail for row in rows)
    text = json.dumps([row.model_dump(mode="json") for row in rows])
    for secret in ("hunter22", "abc99xyz", "s3cr3t"):
        assert secret not in text
        assert secret not in everything_slack_got(sandbox)
    sim = sandbox.servers["sfp"]
    assert isinstance(sim, SfpServerSim)
    assert sim.bodies[-1]["data"]["password"] == "hunter22"  # the task itself still gets what was typed


# -- finding 12: the message text is escaped like the blocks -------------------------------------------


async def test_finding_12_flexdeploy_notification_text_escapes_the_package_name(sandbox: Sandbox) -> None:
    name = "<!channel> <https://evil.example|login>"
    created = await command(sandbox, "/fd", f'create 101 "{name}" --files "/src/classes/A.cls"')
    # Made by the poller, like every change: wait for it before looking at the package.
    await settled(sandbox, int(created[1 : created.index(" ")]), OpState.SUCCEEDED)
    await command(sandbox, "/fd", f'show 101 "{name}"')
    answer = await command(sandbox, "/fd", f'status 101 "{name}" COMPLETED')
    ref = answer[answer.index("F") :].split()[0].strip("()")
    assert sandbox.runtime is not None
    op_id = int("".join(ch for ch in ref if ch.isdigit()))
    deadline = time.monotonic() + 20
    while not ((op := await repo.get_operation(sandbox.runtime.db, operation_id=op_id)) and op.card_ts):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await click(sandbox, BOB, op, "Approve")
    await settled(sandbox, op_id, OpState.SUCCEEDED)
    texts = [
        version.text
        for messages in sandbox.slack.messages.values()
        for message in messages
        for version in [*message.history, message]
    ]
    notices = [t for t in texts if "FlexDeploy" in t and "channel" in t]
    assert notices and any(t for t in sandbox.slack.messages.get(NOTIFY_CHANNEL, []) if "&lt;!channel&gt;" in t.text)
    assert not [t for t in texts if "<!channel>" in t or "<https://evil" in t]
