"""One poll cycle over 1,000 active operations of mixed kinds, 50 ms of latency per external call.

The bot runs as its own process (`python -m bot serve`); the simulators (packaging org, sandbox
org with the Metadata API, sfp server) and the fake Slack run here. The operations are created the
way users create them — signed slash commands, spread over 20 channels — and started by the bot.
Then, right after a cycle ends, every active operation is made due at once, and the first cycle
that starts after that is timed by the bot itself (its /healthz reports the last cycle, with when
it started); it must have covered at least 90% of the active operations, or the attempt is
repeated. Salesforce, sfp and Slack calls are counted by the simulators from the moment the
operations were made due to the end of that cycle.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import text, update
from sqlmodel import col

from bot.sandbox.botprocess import BotProcess, start_bot_process
from bot.sandbox.fake_slack import FakeSlack
from bot.sandbox.metadata_api import write_sample_artifacts
from bot.sandbox.salesforce_org import SalesforceOrgSim, build_auth_url
from bot.sandbox.sfp_server import SfpServerSim
from bot.sandbox.slack_user import SlackUserAgent
from bot.store.db import Database
from bot.store.models import Operation

SECRET = "bench-signing-secret"
LATENCY = 0.05
CHANNELS = [f"C0BENCH{n:02d}" for n in range(20)]
MIX = {"push": 500, "sfp": 300, "deploy": 200}
ACTIVE_STATES = ("starting", "scheduled", "running", "canceling", "awaiting_approval")
ACTIVE = "(" + ", ".join(f"'{state}'" for state in ACTIVE_STATES) + ")"


def _sandbox_orgs(sim: SalesforceOrgSim) -> list[str]:
    versions = {v["Id"]: (v["MajorVersion"], v["MinorVersion"], v["PatchVersion"]) for v in sim.versions}
    billing = next(p["Id"] for p in sim.packages if p["Name"] == "Acme Billing")
    return [
        s["OrgKey"][:15]
        for s in sim.subscribers
        if s["MetadataPackageId"] == billing
        and s["InstalledStatus"] == "i"
        and s["OrgStatus"] != "Inactive"
        and versions[s["MetadataPackageVersionId"]] < (1, 4, 0)
        and s["OrgKey"][:15] not in sim.refuse_org_keys
        and s["OrgType"] == "Sandbox"  # no production org, so no approval is needed
    ]


async def _scalar(url: str, query: str) -> Any:
    db = Database(url)
    try:
        async with db.engine.begin() as conn:
            return (await conn.execute(text(query))).scalar()
    finally:
        await db.close()


async def _make_all_due(url: str) -> None:
    db = Database(url)
    try:
        async with db.engine.begin() as conn:
            await conn.execute(
                update(Operation).where(col(Operation.state).in_(ACTIVE_STATES)).values(next_poll_at=datetime.now(UTC))
            )
    finally:
        await db.close()


async def _create_operations(agent: SlackUserAgent, packaging: SalesforceOrgSim) -> None:
    orgs = _sandbox_orgs(packaging)
    commands: list[tuple[str, str]] = []
    for index in range(MIX["push"]):
        pair = orgs[(2 * index) % len(orgs) : (2 * index) % len(orgs) + 2]
        commands.append(("/push", f"create Acme Billing@1.4.0 --orgs {','.join(pair)}"))
    commands += [
        ("/sfp", f"review-env fetch --repo acme/sf-core --pool core --branch feature/{n}") for n in range(MIX["sfp"])
    ]
    commands += [("/deploy", "validate uat slow-release.zip --test-level RunLocalTests")] * MIX["deploy"]
    limit = asyncio.Semaphore(20)

    async def send(index: int, command: str, words: str) -> None:
        async with limit:
            await agent.command(user="U0ALICE", channel=CHANNELS[index % len(CHANNELS)], command=command, text=words)

    await asyncio.gather(*(send(i, command, words) for i, (command, words) in enumerate(commands)))


async def _cycle_after(bot: BotProcess, test: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
    """The bot's last cycle (from /healthz) once it passes ``test``."""
    deadline = time.monotonic() + timeout
    cycle: dict[str, Any] = {}
    while time.monotonic() < deadline:
        cycle = (await bot.health()).get("last_cycle") or {}
        if cycle.get("finished_at") and test(cycle):
            return dict(cycle)
        await asyncio.sleep(0.01)
    raise RuntimeError(f"no such poll cycle within {timeout} s; last: {cycle}")


async def _full_cycle(
    bot: BotProcess, database_url: str, *, active: int, counters: Callable[[], tuple[int, ...]], attempts: int = 5
) -> tuple[dict[str, Any], tuple[int, ...]]:
    """Make everything due between two cycles and return the next cycle, which must cover it all.

    A cycle in flight when the operations are made due would hand its own operations back with a
    later poll time, so we first wait for a cycle to end, then make everything due, then take the
    first cycle that started after that. Should another cycle have slipped in between (the bot
    started one right after the previous ended), the measured one is partial and we try again.
    """
    cycle: dict[str, Any] = {}
    for _ in range(attempts):
        previous = ((await bot.health()).get("last_cycle") or {}).get("finished_at")
        await _cycle_after(bot, lambda c, previous=previous: c["finished_at"] != previous)
        marks = counters()
        await _make_all_due(database_url)
        due_at = datetime.now(UTC)
        cycle = await _cycle_after(
            bot, lambda c, due_at=due_at: datetime.fromisoformat(c.get("started_at") or "1970-01-01T00:00Z") >= due_at
        )
        if cycle["operations"] >= 0.9 * active:
            return cycle, tuple(now - then for now, then in zip(counters(), marks, strict=True))
        await asyncio.sleep(1)  # a partial cycle: let the bot settle and try again
    raise RuntimeError(f"no poll cycle covered 90% of {active} active operations; last: {cycle}")


async def measure(workdir: Path) -> dict[str, Any]:
    packaging = SalesforceOrgSim(
        org_id="00D00000000PKG1", kind="packaging", failure_rate=0.0, job_seconds=120.0, lanes=1
    )
    uat = SalesforceOrgSim(org_id="00D00000000UAT1", kind="sandbox", subscribers=0)
    sfp = SfpServerSim(task_seconds=900.0)
    sfp.durations = {}  # every task type takes task_seconds: all stay active while we measure
    slack = FakeSlack()
    for channel in CHANNELS:
        slack.add_channel(channel, channel.lower())
    for server in (packaging, uat, sfp, slack):
        await server.start()
    artifacts = workdir / "artifacts"
    write_sample_artifacts(artifacts)
    database_url = f"sqlite:///{workdir / 'poll.db'}"
    config = workdir / "poll.toml"
    config.write_text(
        '[orgs.packaging]\nkind = "production"\npackaging = true\n\n[orgs.uat]\nkind = "sandbox"\n\n'
        f'[sfp]\nurl = "{sfp.url}"\ntask_types = ["fetchReviewEnvironment"]\n\n[artifacts]\ndir = "{artifacts}"\n\n'
        "[poller]\ninterval_seconds = 2\nlease_seconds = 60\nbatch_size = 1000\n"
    )
    env = {
        "SLACK_BOT_TOKEN": slack.bot_token,
        "SLACK_SIGNING_SECRET": SECRET,
        "SLACK_API_URL": slack.api_url,
        "DATABASE_URL": database_url,
        "SF_AUTH_URL_PACKAGING": build_auth_url(packaging),
        "SF_AUTH_URL_UAT": build_auth_url(uat),
        "SFP_TOKEN": sfp.token,
    }
    bot = await start_bot_process(workdir=workdir, env=env, config=config, name="poll")
    cycles: list[dict[str, Any]] = []
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            agent = SlackUserAgent(bot_url=bot.events_url, signing_secret=SECRET, slack=slack, session=session)
            await _create_operations(agent, packaging)
        total = sum(MIX.values())
        deadline = time.monotonic() + 300
        # Wait until every operation exists (a command's work runs after its ack) and has been sent
        # to its system.
        while time.monotonic() < deadline:
            created = await _scalar(database_url, "SELECT COUNT(*) FROM operations")
            starting = await _scalar(database_url, "SELECT COUNT(*) FROM operations WHERE state = 'starting'")
            if created >= total and starting == 0:
                break
            await asyncio.sleep(1)
        active = int(await _scalar(database_url, f"SELECT COUNT(*) FROM operations WHERE state IN {ACTIVE}"))
        for server in (packaging, uat, sfp):
            server.latency = LATENCY

        def counters() -> tuple[int, ...]:
            return len(packaging.calls) + len(uat.calls), len(sfp.calls), len(slack.calls)

        for _ in range(3):
            # Everything due at once: the worst case for one cycle.
            cycle, counted = await _full_cycle(bot, database_url, active=active, counters=counters)
            slack_calls = slack.calls[len(slack.calls) - counted[2] :]
            updates = Counter((p.get("channel"), p.get("ts")) for method, p in slack_calls if method == "chat.update")
            cycles.append(
                {
                    "seconds": cycle["seconds"],
                    "operations": cycle["operations"],
                    "salesforce_calls": counted[0],
                    "sfp_calls": counted[1],
                    "slack_calls": counted[2],
                    "chat_updates": sum(updates.values()),
                    "max_updates_per_card": max(updates.values(), default=0),
                }
            )
        rss = bot.peak_rss_mb()
        kinds = {
            kind: int(
                await _scalar(
                    database_url, f"SELECT COUNT(*) FROM operations WHERE kind = '{kind}' AND state IN {ACTIVE}"
                )
            )
            for kind in MIX
        }
    finally:
        await bot.stop()
        for server in (slack, sfp, uat, packaging):
            await server.stop()
    return {
        "created": total,
        "active": active,
        "active_by_kind": kinds,
        "latency_ms": LATENCY * 1000,
        "cycles": cycles,
        "bot_peak_rss_mb": round(rss, 1),
    }
