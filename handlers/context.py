"""What the handlers are given: services and Slack helpers, built once by bot.runtime."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bot.outbox import SlackOutbox
from bot.services.access import AccessPolicy
from bot.services.approvals import ApprovalService
from bot.services.deploy import DeployService
from bot.services.flexdeploy import FlexDeployService
from bot.services.push import PushService
from bot.services.sfp import SfpService
from bot.settings import Settings
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
