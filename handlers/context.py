"""What the listeners are given: services and Slack helpers, built once by bot.runtime and put
into every request's Bolt ``context`` by one global middleware (``provide``).

Listeners are module-level functions that take Bolt's arguments and read their dependencies with
``deps_of(context)``, so they can be dispatched in process (``app.async_dispatch``) by tests with
whatever runtime the test built; closures over ``deps`` inside ``register`` could not be.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.response import BoltResponse

from bot.core.access import AccessPolicy
from bot.core.approvals import ApprovalService
from bot.core.audit import AuditLog
from bot.core.deliveries import Deliveries
from bot.core.lookup import OperationLookup
from bot.deploy.service import DeployService
from bot.flexdeploy.service import FlexDeployService
from bot.push.service import PushService
from bot.settings import Settings
from bot.sfp.service import SfpService
from bot.slack.outbox import SlackOutbox
from bot.slack.web import SlackDirectory, SlackPoster
from handlers.ack_first import AckFirst

DEPS_KEY = "deps"
Middleware = Callable[[AsyncBoltRequest, BoltResponse, Callable[[], Awaitable[BoltResponse]]], Awaitable[BoltResponse]]


@dataclass(frozen=True)
class HandlerDeps:
    settings: Settings
    team_id: str  # the bot's own workspace, from auth.test at start-up
    push: PushService
    approvals: ApprovalService
    access: AccessPolicy
    audit: AuditLog
    deliveries: Deliveries
    operations: OperationLookup
    poster: SlackPoster
    directory: SlackDirectory
    kick_poller: Callable[[], None]
    outbox: SlackOutbox
    fd: FlexDeployService | None = None
    sfp: SfpService | None = None
    deploy: DeployService | None = None
    ack_first: AckFirst = field(default_factory=AckFirst)


def deps_of(context: Mapping[str, Any]) -> HandlerDeps:
    """The dependencies ``provide`` put into a request's Bolt context."""
    deps = context[DEPS_KEY]
    assert isinstance(deps, HandlerDeps), "handlers.register(app, deps) installs them"
    return deps


def provide(deps: HandlerDeps) -> Middleware:
    """The one global middleware that carries ``deps`` into every request (registered first)."""

    async def with_deps(
        req: AsyncBoltRequest, resp: BoltResponse, next: Callable[[], Awaitable[BoltResponse]]
    ) -> BoltResponse:
        req.context[DEPS_KEY] = deps
        return await next()

    return with_deps
