"""What the handlers are given: services and Slack helpers, built once by bot.runtime."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bot.core.access import AccessPolicy
from bot.core.approvals import ApprovalService
from bot.deploy.service import DeployService
from bot.flexdeploy.service import FlexDeployService
from bot.push.service import PushService
from bot.settings import Settings
from bot.sfp.service import SfpService
from bot.slack.outbox import SlackOutbox
from bot.slack.web import SlackDirectory, SlackPoster
from bot.store.db import Database
from handlers.ack_first import AckFirst


@dataclass(frozen=True)
class HandlerDeps:
    settings: Settings
    team_id: str  # the bot's own workspace, from auth.test at start-up
    db: Database
    push: PushService
    approvals: ApprovalService
    access: AccessPolicy
    poster: SlackPoster
    directory: SlackDirectory
    kick_poller: Callable[[], None]
    outbox: SlackOutbox
    fd: FlexDeployService | None = None
    sfp: SfpService | None = None
    deploy: DeployService | None = None
    ack_first: AckFirst = field(default_factory=AckFirst)
