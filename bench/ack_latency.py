"""Slash-command acknowledgement latency: 50 concurrent signed commands over HTTP, one bot process.

The bot runs as `python -m bot serve` (its own process and event loop); the fake Slack and the
simulated org run here; the requests are sent and timed by a third process (bench/ack_client.py),
so that the simulators' work is not counted as the bot's. Latency is measured from sending the
signed request to receiving the HTTP answer (the ack), which is what Slack's 3-second limit
applies to. The commands mix a dry-run plan over the org's subscribers (real work after the ack),
a list, a status and a refusal.

A second set of rounds runs while bench/junk_client.py (a fourth process) keeps 15 unsigned 2 MB
bodies in flight to the same endpoint (SPEC §17: ack p99 ≤ 200 ms meanwhile).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp

from bench.common import percentile
from bot.sandbox.botprocess import start_bot_process
from bot.sandbox.fake_slack import FakeSlack
from bot.sandbox.salesforce_org import SalesforceOrgSim, build_auth_url
from bot.sandbox.slack_user import SlackUserAgent

SECRET = "bench-signing-secret"
REPO = Path(__file__).resolve().parent.parent  # where `python -m bench.ack_client` runs
CONCURRENCY = 50
ROUNDS = 6
# SPEC §17: acks must stay fast while this much anonymous junk keeps arriving.
JUNK_SENDERS = 15
JUNK_BYTES = 2_000_000  # 2 MB: just under the 2 MiB aiohttp reads by default, so the old code parsed it
COMMANDS = ["create Acme Billing@1.4.0 --orgs all --dry-run", "list", "status P1", "create Acme Billing@9.9"]


async def measure(workdir: Path, *, junk: bool = True) -> dict[str, Any]:
    """The plain rounds, then (``junk``) the same rounds again while 15 unsigned 2 MB bodies keep
    arriving (SPEC §17), against the same bot process, so that the two figures compare."""
    sim = SalesforceOrgSim()
    slack = FakeSlack()
    await sim.start()
    await slack.start()
    config = workdir / "ack.toml"
    config.write_text('[orgs.packaging]\nkind = "production"\npackaging = true\n')
    env = {
        "SLACK_BOT_TOKEN": slack.bot_token,
        "SLACK_SIGNING_SECRET": SECRET,
        "SLACK_API_URL": slack.api_url,
        "DATABASE_URL": f"sqlite:///{workdir / 'ack.db'}",
        "SF_AUTH_URL_PACKAGING": build_auth_url(sim),
    }
    bot = await start_bot_process(workdir=workdir, env=env, config=config, name="ack")
    results: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession() as session:
            agent = SlackUserAgent(bot_url=bot.events_url, signing_secret=SECRET, slack=slack, session=session)
            # Warm-up: one of each command, so that first-use costs (the org's OAuth token, SQL
            # compilation) are not measured; a running bot has paid them long ago.
            for text in COMMANDS:
                await agent.command(user="U0ALICE", channel="C0RELEASES", command="/push", text=text)
            await asyncio.sleep(1.0)
        # The bot's CPU seconds per round: unlike latency on a shared machine, they show what the
        # junk costs the bot itself.
        cpu = _cpu_seconds(bot.pid)
        results = _summary(await _timed_rounds(workdir, slack=slack, url=bot.events_url, name="plain"))
        results["bot_cpu_s"] = round(_cpu_seconds(bot.pid) - cpu, 2)
        if junk:
            await asyncio.sleep(1.0)  # the plain rounds' work after the acks is done
            cpu = _cpu_seconds(bot.pid)
            junk_client = await _start_junk(bot.events_url)
            try:
                samples = await _timed_rounds(workdir, slack=slack, url=bot.events_url, name="junk")
            finally:
                answers = await _stop_junk(junk_client)
            results["under_junk"] = {
                **_summary(samples),
                "bot_cpu_s": round(_cpu_seconds(bot.pid) - cpu, 2),
                "junk_senders": JUNK_SENDERS,
                "junk_bytes": JUNK_BYTES,
                "junk_answers": answers,
            }
        results["bot_peak_rss_mb"] = round(bot.peak_rss_mb(), 1)
    finally:
        await bot.stop()
        await slack.stop()
        await sim.stop()
    return results


async def _timed_rounds(workdir: Path, *, slack: FakeSlack, url: str, name: str) -> list[float]:
    """ROUNDS × CONCURRENCY signed commands sent and timed by bench/ack_client.py."""
    bodies = [
        urlencode(
            {
                "token": "x",
                "team_id": slack.team_id,
                "channel_id": "C0RELEASES",
                "user_id": "U0ALICE",
                "user_name": "alice",
                "command": "/push",
                "text": COMMANDS[index % len(COMMANDS)],
                "trigger_id": f"bench.{name}.{index}.{time.time_ns()}",
                "response_url": slack.response_url_for(channel="C0RELEASES", user="U0ALICE"),
            }
        )
        for index in range(ROUNDS * CONCURRENCY)
    ]
    plan = workdir / f"ack-plan-{name}.json"
    plan.write_text(
        json.dumps({"url": url, "secret": SECRET, "concurrency": CONCURRENCY, "pause": 0.5, "bodies": bodies})
    )
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.ack_client", str(plan), stdout=asyncio.subprocess.PIPE, cwd=REPO
    )
    out, _ = await client.communicate()  # the simulators keep serving meanwhile: this loop is free
    if client.returncode != 0:
        raise RuntimeError(f"the load generator failed (exit {client.returncode})")
    return [float(sample) for sample in json.loads(out)]


async def _start_junk(url: str) -> asyncio.subprocess.Process:
    """bench/junk_client.py, in a process of its own, once its first bodies are on their way."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.junk_client",
        url,
        str(JUNK_SENDERS),
        str(JUNK_BYTES),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    assert process.stdout is not None
    if (await process.stdout.readline()).strip() != b"ready":
        raise RuntimeError("the junk generator did not start")
    return process


async def _stop_junk(process: asyncio.subprocess.Process) -> dict[str, int]:
    out, _ = await process.communicate(b"")  # closing its stdin tells it to stop
    if process.returncode != 0:
        raise RuntimeError(f"the junk generator failed (exit {process.returncode})")
    return {str(key): int(value) for key, value in json.loads(out.strip().splitlines()[-1]).items()}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _summary(samples: list[float]) -> dict[str, Any]:
    return {
        "requests": len(samples),
        "concurrency": CONCURRENCY,
        "p50_ms": round(percentile(samples, 0.50) * 1000, 1),
        "p99_ms": round(percentile(samples, 0.99) * 1000, 1),
        "max_ms": round(max(samples) * 1000, 1),
        "round_max_ms": [
            round(max(samples[start : start + CONCURRENCY]) * 1000, 1) for start in range(0, len(samples), CONCURRENCY)
        ],
    }
