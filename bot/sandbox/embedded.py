"""The embedded default: simulated orgs, a fake Slack, the real bot over HTTP, and a console.

Everything here talks over real HTTP on 127.0.0.1: the bot reaches the simulated orgs through
its Salesforce client and the fake Slack through slack_sdk, and the console or tour reaches the
bot through signed requests to ``/slack/events`` — the same path Slack uses.
"""

from __future__ import annotations

import secrets
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import SecretStr

from bot.runtime import Runtime, build_runtime
from bot.sandbox.fake_slack import FakeSlack
from bot.sandbox.flexdeploy_server import FlexDeploySim
from bot.sandbox.metadata_api import ArtifactServer, write_sample_artifacts
from bot.sandbox.salesforce_org import SalesforceOrgSim, build_auth_url
from bot.sandbox.sfp_server import TASK_TYPES, SfpServerSim
from bot.sandbox.slack_user import SlackUserAgent
from bot.server import EVENTS_PATH, http_app
from bot.settings import (
    AccessConfig,
    ApprovalRule,
    ArtifactsConfig,
    FlexDeployConfig,
    NotificationsConfig,
    OrgConfig,
    PollerConfig,
    Settings,
    SfpConfig,
)

TOURS_DIR = Path(__file__).with_name("tours")
RELEASES_CHANNEL = "C0RELEASES"
NOTIFY_CHANNEL = "C0NOTIFY"
SANDBOX_APPROVERS = ["U0BOB", "U0DAVE"]
# Every type the simulated sfp server knows: the tours use the review-environment ones.
SANDBOX_SFP_TASK_TYPES = list(TASK_TYPES)
SANDBOX_ADMINS = ["U0DAVE"]  # may cancel anything and read sfp tasks the bot did not submit
# The poller's interval: a second, at the pace a person following a tour reads; tests/conftest.py
# shortens it, since end-to-end tests otherwise spend most of their time waiting for a tick.
POLL_SECONDS = 1.0


@dataclass
class Sandbox:
    packaging: SalesforceOrgSim
    production: SalesforceOrgSim
    sandbox_org: SalesforceOrgSim
    slack: FakeSlack
    settings: Settings
    runtime: Runtime | None
    bot_url: str
    agent: SlackUserAgent
    signing_secret: str
    # Simulators of the other systems, by name ("sfp", "flexdeploy"), for tests and tours.
    servers: dict[str, Any] = field(default_factory=dict)


def sandbox_settings(
    *,
    slack: FakeSlack,
    packaging: SalesforceOrgSim,
    production: SalesforceOrgSim,
    sandbox_org: SalesforceOrgSim,
    database_url: str,
    signing_secret: str,
    **overrides: Any,
) -> Settings:
    """What `python -m bot` configures for itself; tests reuse it with overrides."""
    values: dict[str, Any] = {
        "slack_bot_token": SecretStr(slack.bot_token),
        "slack_signing_secret": SecretStr(signing_secret),
        "slack_api_url": slack.api_url,
        "database_url": database_url,
        "orgs": {
            "packaging": OrgConfig(kind="production", packaging=True, auth_url=SecretStr(build_auth_url(packaging))),
            "prod": OrgConfig(kind="production", auth_url=SecretStr(build_auth_url(production))),
            "uat": OrgConfig(kind="sandbox", auth_url=SecretStr(build_auth_url(sandbox_org))),
        },
        "notifications": NotificationsConfig(channel=NOTIFY_CHANNEL),
        "access": AccessConfig(admins=SANDBOX_ADMINS),
        # Production actions must name their approvers (quick deploys use the deploy approvers);
        # FlexDeploy deletes and completions keep the built-in "anyone but the requester".
        "approval": [
            ApprovalRule(action="push", org_kind="production", approvers=SANDBOX_APPROVERS, count=1),
            ApprovalRule(action="deploy", org_kind="production", approvers=SANDBOX_APPROVERS, count=1),
        ],
        "poller": PollerConfig(interval_seconds=POLL_SECONDS, lease_seconds=30.0),
    }
    values.update(overrides)
    return Settings.model_validate(values)


@asynccontextmanager
async def running_sandbox(
    *,
    workdir: Path,
    job_seconds: float = 0.25,
    subscribers: int = 2400,
    start_bot: bool = True,
    sfp_task_types: list[str] | None = SANDBOX_SFP_TASK_TYPES,
    **overrides: Any,
) -> AsyncIterator[Sandbox]:
    """Start the simulators, the fake Slack and (unless ``start_bot`` is False) the bot.

    ``sfp_task_types``: the bot's ``[sfp] task_types`` (None: not set)."""
    packaging = SalesforceOrgSim(
        org_id="00D00000000PKG1", kind="packaging", subscribers=subscribers, job_seconds=job_seconds
    )
    production = SalesforceOrgSim(org_id="00D00000000PRD1", kind="production", subscribers=0)
    sandbox_org = SalesforceOrgSim(org_id="00D00000000UAT1", kind="sandbox", subscribers=0)
    slack = FakeSlack()
    for server in (packaging, production, sandbox_org):
        await server.start()
    await slack.start()
    servers: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    # Other systems' simulators (sfp server, FlexDeploy): start each, add it to `servers` under
    # its name and its settings to `extra`; they are stopped in `finally` below.
    flexdeploy = FlexDeploySim()
    await flexdeploy.start()
    servers["flexdeploy"] = flexdeploy
    extra["flexdeploy"] = FlexDeployConfig(url=flexdeploy.url)
    extra["flexdeploy_user"] = SecretStr(flexdeploy.user)
    extra["flexdeploy_password"] = SecretStr(flexdeploy.password)
    # The sfp server: tasks take a couple of seconds and "every 1m" runs every 2 s, so that
    # recurring tasks can be watched (and stopped) in a tour.
    sfp = SfpServerSim(task_seconds=2.0, time_speedup=30.0)
    await sfp.start()
    servers["sfp"] = sfp
    extra["sfp"] = SfpConfig(url=sfp.url, task_types=sfp_task_types)
    extra["sfp_token"] = SecretStr(sfp.token)
    # Metadata deployments: sample artifacts (good, failing, slow, coverage, destructive) in the workdir,
    # also served over HTTP so that an artifact can be given as an URL under an allowed prefix.
    artifacts_dir = workdir / "artifacts"
    write_sample_artifacts(artifacts_dir)
    artifact_server = ArtifactServer(artifacts_dir)
    await artifact_server.start()
    servers["artifacts"] = artifact_server
    extra["artifacts"] = ArtifactsConfig(dir=artifacts_dir, allowed_url_prefixes=[artifact_server.prefix])
    signing_secret = secrets.token_hex(16)
    settings = sandbox_settings(
        slack=slack,
        packaging=packaging,
        production=production,
        sandbox_org=sandbox_org,
        database_url=f"sqlite:///{workdir / 'chatops.db'}",
        signing_secret=signing_secret,
        **{**extra, **overrides},
    )
    runtime: Runtime | None = None
    runner: web.AppRunner | None = None
    bot_url = ""
    session = aiohttp.ClientSession()
    try:
        if start_bot:
            runtime = await build_runtime(settings)
            runner = web.AppRunner(http_app(runtime.app, signing_secret=signing_secret), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            bot_url = f"http://127.0.0.1:{port}{EVENTS_PATH}"
            runtime.poller.start()
        agent = SlackUserAgent(bot_url=bot_url, signing_secret=signing_secret, slack=slack, session=session)
        yield Sandbox(
            packaging=packaging,
            production=production,
            sandbox_org=sandbox_org,
            slack=slack,
            settings=settings,
            runtime=runtime,
            bot_url=bot_url,
            agent=agent,
            signing_secret=signing_secret,
            servers=servers,
        )
    finally:
        if runner is not None:
            await runner.cleanup()
        if runtime is not None:
            await runtime.close()
        await session.close()
        await slack.stop()
        for server in (packaging, production, sandbox_org, *servers.values()):
            await server.stop()


async def run_console_sandbox(*, fast: bool = False) -> int:
    from bot.sandbox.console import run_console

    with tempfile.TemporaryDirectory(prefix="chatops-sandbox-") as tmp:
        async with running_sandbox(workdir=Path(tmp), job_seconds=0.02 if fast else 0.25) as sandbox:
            print(_banner(sandbox))
            users = {user["name"]: user_id for user_id, user in sandbox.slack.users.items() if not user.get("is_bot")}
            await run_console(agent=sandbox.agent, slack=sandbox.slack, channel=RELEASES_CHANNEL, users=users)
    return 0


async def run_demo(script: Path | None) -> int:
    """Run one tour file, or every shipped tour (each in a fresh sandbox); 0 only if all pass."""
    from bot.sandbox.tour import run_tour

    paths = [script] if script else sorted(TOURS_DIR.glob("*.tour"))
    for path in paths:
        if not path.is_file():
            print(f"tour file not found: {path}", file=sys.stderr)
            return 2
    failed: list[str] = []
    for path in paths:
        print(f"── {path.name}")
        with tempfile.TemporaryDirectory(prefix="chatops-demo-") as tmp:
            async with running_sandbox(workdir=Path(tmp), job_seconds=0.02) as sandbox:
                if not await run_tour(path, agent=sandbox.agent, slack=sandbox.slack, channel=RELEASES_CHANNEL):
                    failed.append(path.name)
    print("tour passed" if not failed else f"tour FAILED: {', '.join(failed)}")
    return 0 if not failed else 1


def _banner(sandbox: Sandbox) -> str:
    return "\n".join(
        [
            "Release ChatOps — local sandbox (nothing here touches real Slack or Salesforce)",
            f"  packaging org ({len(sandbox.packaging.subscribers):,} subscribers): {sandbox.packaging.url}",
            f"  production org: {sandbox.production.url}   sandbox org: {sandbox.sandbox_org.url}",
            f"  fake Slack: {sandbox.slack.url}   bot: {sandbox.bot_url}",
            "  channel #releases; users alice (requester), bob and dave (approvers; dave is also a bot admin),",
            "  carol (not an approver).",
            "Try:  /push create Acme Billing@1.4.0 --orgs all --dry-run     then without --dry-run,",
            "      as bob, click Approve.   Type `help` for console commands.",
            'FlexDeploy (projects 101 Acme Salesforce, 102 HR Database):  /fd show 101 "Release 42"   /fd help',
            "sfp server:  /sfp review-env fetch --repo acme/sf-core --pool core --branch feature/ABC-1   /sfp help",
            "Deploy (orgs prod, uat; good-release.zip, good-release/, failing-release.zip, slow-release.zip,",
            "      coverage-release.zip — fails on code coverage in prod):",
            "      /deploy validate prod good-release.zip --test-level RunLocalTests   then click Quick deploy",
        ]
    )
