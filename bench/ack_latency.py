"""Slash-command acknowledgement latency: 50 concurrent signed commands over HTTP, one bot process.

The bot runs as `python -m bot serve` (its own process and event loop); the fake Slack and the
simulated org run here; the requests are sent and timed by a third process (bench/ack_client.py),
so that the simulators' work is not counted as the bot's. Latency is measured from sending the
signed request to receiving the HTTP answer (the ack), which is what Slack's 3-second limit
applies to. The commands mix a dry-run plan over the org's subscribers (real work after the ack),
a list, a status and a refusal.
"""

from __future__ import annotations

import asyncio
import json
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
COMMANDS = ["create Acme Billing@1.4.0 --orgs all --dry-run", "list", "status P1", "create Acme Billing@9.9"]


async def measure(workdir: Path) -> dict[str, Any]:
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
    samples: list[float] = []
    try:
        async with aiohttp.ClientSession() as session:
            agent = SlackUserAgent(bot_url=bot.events_url, signing_secret=SECRET, slack=slack, session=session)
            # Warm-up: one of each command, so that first-use costs (the org's OAuth token, SQL
            # compilation) are not measured; a running bot has paid them long ago.
            for text in COMMANDS:
                await agent.command(user="U0ALICE", channel="C0RELEASES", command="/push", text=text)
            await asyncio.sleep(1.0)
        bodies = [
            urlencode(
                {
                    "token": "x",
                    "team_id": "T0SANDBOX",
                    "channel_id": "C0RELEASES",
                    "user_id": "U0ALICE",
                    "user_name": "alice",
                    "command": "/push",
                    "text": COMMANDS[index % len(COMMANDS)],
                    "trigger_id": f"bench.{index}.{time.time_ns()}",
                    "response_url": slack.response_url_for(channel="C0RELEASES", user="U0ALICE"),
                }
            )
            for index in range(ROUNDS * CONCURRENCY)
        ]
        plan = workdir / "ack-plan.json"
        plan.write_text(
            json.dumps(
                {"url": bot.events_url, "secret": SECRET, "concurrency": CONCURRENCY, "pause": 0.5, "bodies": bodies}
            )
        )
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.ack_client",
            str(plan),
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        out, _ = await client.communicate()  # the simulators keep serving meanwhile: this loop is free
        if client.returncode != 0:
            raise RuntimeError(f"the load generator failed (exit {client.returncode})")
        samples = [float(sample) for sample in json.loads(out)]
        rss = bot.peak_rss_mb()
    finally:
        await bot.stop()
        await slack.stop()
        await sim.stop()
    return {
        "requests": len(samples),
        "concurrency": CONCURRENCY,
        "p50_ms": round(percentile(samples, 0.50) * 1000, 1),
        "p99_ms": round(percentile(samples, 0.99) * 1000, 1),
        "max_ms": round(max(samples) * 1000, 1),
        "round_max_ms": [
            round(max(samples[start : start + CONCURRENCY]) * 1000, 1) for start in range(0, len(samples), CONCURRENCY)
        ],
        "bot_peak_rss_mb": round(rss, 1),
    }
