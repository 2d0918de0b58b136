"""SIGKILL the bot mid-push and start it again: the push completes, announced exactly once.

The bot runs as a real process (`python -m bot serve`, configured through the documented
environment variables and TOML file); the simulated org and the fake Slack live in the test.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from bot.sandbox.botprocess import BotProcess, free_port, start_bot_process
from bot.sandbox.embedded import NOTIFY_CHANNEL, RELEASES_CHANNEL
from bot.sandbox.fake_slack import FakeSlack
from bot.sandbox.salesforce_org import SalesforceOrgSim, build_auth_url
from bot.sandbox.slack_user import SlackUserAgent

pytestmark = pytest.mark.slow
SIGNING_SECRET = "crash-test-signing-secret"


@dataclass
class Harness:
    sim: SalesforceOrgSim
    slack: FakeSlack
    agent: SlackUserAgent
    workdir: Path
    port: int
    env: dict[str, str]
    config: Path

    async def start_bot(self, name: str) -> BotProcess:
        return await start_bot_process(
            workdir=self.workdir, env=self.env, config=self.config, port=self.port, name=name
        )


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    sim = SalesforceOrgSim(org_id="00D00000000PKG1", kind="packaging", job_seconds=0.25)
    slack = FakeSlack()
    await sim.start()
    await slack.start()
    port = free_port()
    config = tmp_path / "chatops.toml"
    config.write_text(
        '[orgs.packaging]\nkind = "production"\npackaging = true\n\n'
        f'[notifications]\nchannel = "{NOTIFY_CHANNEL}"\n\n'
        "[poller]\ninterval_seconds = 0.5\nlease_seconds = 3\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLACK_", "SF_AUTH_URL_"))}
    env.update(
        {
            "SLACK_BOT_TOKEN": slack.bot_token,
            "SLACK_SIGNING_SECRET": SIGNING_SECRET,
            "SLACK_API_URL": slack.api_url,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'bot.db'}",
            "PORT": str(port),
            "SF_AUTH_URL_PACKAGING": build_auth_url(sim),
        }
    )
    async with aiohttp.ClientSession() as session:
        agent = SlackUserAgent(
            bot_url=f"http://127.0.0.1:{port}/slack/events", signing_secret=SIGNING_SECRET, slack=slack, session=session
        )
        yield Harness(sim=sim, slack=slack, agent=agent, workdir=tmp_path, port=port, env=env, config=config)
    await slack.stop()
    await sim.stop()


def completions(slack: FakeSlack) -> tuple[list[object], list[object]]:
    in_thread = [
        m
        for m in slack.messages.get(RELEASES_CHANNEL, [])
        if (m.metadata or {}).get("event_type") == "chatops_operation_finished"
    ]
    notices = [m for m in slack.messages.get(NOTIFY_CHANNEL, []) if "push P1 " in (m.text or "")]
    return in_thread, notices


def push_requests(sim: SalesforceOrgSim) -> list[dict[str, object]]:
    ids = [row["Id"] for row in sim.state.table("PackagePushRequest").rows]
    return [request for request in (sim.push_request(i) for i in ids) if request]


def request_status(sim: SalesforceOrgSim) -> str:
    requests = push_requests(sim)
    return str(requests[0]["Status"]) if requests else ""


@pytest.mark.parametrize("kill_when", ["creating", "running"])
async def test_sigkill_mid_push_then_restart_completes_once(harness: Harness, kill_when: str) -> None:
    first = await harness.start_bot("first")
    try:
        result = await harness.agent.command(
            user="U0ALICE", channel=RELEASES_CHANNEL, command="/push", text="create Acme Billing@1.4.0 --orgs sandbox"
        )
        assert result.status == 200
        if kill_when == "running":
            await harness.slack.wait_for(lambda: request_status(harness.sim) == "In Progress" or None, 30)
            assert request_status(harness.sim) == "In Progress"
        else:
            await harness.slack.wait_for(lambda: request_status(harness.sim) or None, 30)
    finally:
        await first.kill()
    assert completions(harness.slack) == ([], [])

    second = await harness.start_bot("second")
    try:
        # Both the thread reply and the channel notice: under load the thread reply, which shares
        # its channel's posting rate with the card's edits, can come a few seconds after the notice.
        done = await harness.slack.wait_for(lambda: all(completions(harness.slack)) or None, 90)
        assert done, (harness.workdir / "second.log").read_text()[-3000:]
        await asyncio.sleep(3)  # time for a duplicate to show up, if there were going to be one
    finally:
        await second.stop()

    in_thread, notices = completions(harness.slack)
    assert len(in_thread) == 1 and len(notices) == 1
    requests = push_requests(harness.sim)
    assert len(requests) == 1 and requests[0]["Status"] in {"Succeeded", "Failed"}  # pushed once, not twice
    jobs = harness.sim.push_jobs(str(requests[0]["Id"]))
    assert len({job["SubscriberOrganizationKey"] for job in jobs}) == len(jobs)
    cards = [
        m
        for m in harness.slack.messages[RELEASES_CHANNEL]
        if not m.is_reply and not m.ephemeral_for and "Push P1 " in (m.text or "")
    ]
    assert len(cards) == 1


async def test_logs_of_a_full_run_hold_no_secrets(harness: Harness) -> None:
    bot = await harness.start_bot("secrets")
    try:
        await harness.agent.command(
            user="U0ALICE", channel=RELEASES_CHANNEL, command="/push", text="create Acme Billing@1.4.0 --orgs sandbox"
        )
        assert await harness.slack.wait_for(lambda: completions(harness.slack)[1] or None, 90)
        harness.sim.expire_sessions()  # force a token refresh to be logged around
        await harness.agent.command(user="U0ALICE", channel=RELEASES_CHANNEL, command="/push", text="list")
        await asyncio.sleep(1)
    finally:
        await bot.stop()
    log = (harness.workdir / "secrets.log").read_text()
    assert "serving Slack over HTTP" in log
    for secret in (
        harness.slack.bot_token,
        SIGNING_SECRET,
        harness.sim.refresh_token,
        harness.sim.client_secret,
        build_auth_url(harness.sim),
    ):
        assert secret not in log


def test_the_shipped_demo_tour_passes_from_the_command_line(tmp_path: Path) -> None:
    """`python -m bot demo` as the README gives it: exit 0 and every step ticked."""
    import subprocess

    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLACK_", "SF_AUTH_URL_"))}
    env.pop("DATABASE_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "bot", "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "tour passed" in done.stdout and "✗" not in done.stdout


def test_demo_exits_non_zero_when_a_step_fails(tmp_path: Path) -> None:
    import subprocess

    tour = tmp_path / "bad.tour"
    tour.write_text("as alice\n/push list\nexpect-ephemeral this text never appears within 1s\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLACK_", "SF_AUTH_URL_"))}
    done = subprocess.run(
        [sys.executable, "-m", "bot", "demo", "--script", str(tour)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1 and "✗ expect-ephemeral" in done.stdout and "tour FAILED" in done.stdout


def test_console_plays_slack_from_a_pipe(tmp_path: Path) -> None:
    """`python -m bot` with no configuration: the sandbox console, driven from standard input."""
    import subprocess

    script = "\n".join(["/push create Acme Billing@1.4.0 --orgs production", "as bob", "click Approve", ""])
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLACK_", "SF_AUTH_URL_"))}
    done = subprocess.run(
        [sys.executable, "-m", "bot", "sandbox", "--fast"],
        cwd=tmp_path,
        env=env,
        input=script,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Push P1 · Acme Billing 1.4.0" in done.stdout and "You approved P1" in done.stdout
