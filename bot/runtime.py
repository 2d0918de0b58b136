"""The composition root: builds every piece from Settings, in one place, and tears it down."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import aiohttp
from slack_bolt.async_app import AsyncApp

import handlers
from bot.clients.retry import RetryPolicy
from bot.core.access import AccessPolicy
from bot.core.advance import KindAdvancer
from bot.core.approvals import ApprovalService
from bot.core.audit import AuditLog
from bot.core.deliveries import Deliveries
from bot.core.lifecycle import LeasedWrites
from bot.core.lookup import OperationLookup
from bot.core.orgs import OrgRegistry
from bot.deploy import messages as deploy_messages
from bot.deploy.service import DeployService
from bot.deploy.steps import DeploySteps
from bot.flexdeploy import messages as fd_messages
from bot.flexdeploy.service import FlexDeployService
from bot.poller import KindView, Poller, card_renderer, replica_name
from bot.push import messages as push_messages
from bot.push.service import PushService
from bot.push.steps import PushSteps
from bot.settings import Settings
from bot.sfp import messages as sfp_messages
from bot.sfp.service import SfpService
from bot.slack.outbox import SlackOutbox
from bot.slack.web import (
    SLACK_TIMEOUT_SECONDS,
    SlackDirectory,
    SlackPoster,
    make_outbox_client,
    make_web_client,
    own_workspace,
)
from bot.store.db import Database, migrate
from bot.store.models import OpKind
from handlers.ack_first import AckFirst, AckFirstApp
from handlers.context import HandlerDeps


@dataclass
class Runtime:
    settings: Settings
    db: Database
    http: aiohttp.ClientSession
    app: AsyncApp
    poller: Poller
    push: PushService
    ack_first: AckFirst

    async def close(self) -> None:
        await self.ack_first.drain(timeout=10.0)  # commands already acked get their answers
        await self.poller.stop()
        with contextlib.suppress(Exception):
            if self.app.client.session is not None:
                await self.app.client.session.close()
        await self.http.close()
        await self.db.close()


async def build_runtime(
    settings: Settings, *, retry: RetryPolicy | None = None, owner: str | None = None, run_migrations: bool = True
) -> Runtime:
    settings.require_slack()
    assert settings.slack_bot_token is not None
    # Slack gets a session of its own (its timeout is Slack's), kept open so connections are reused.
    slack_http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SLACK_TIMEOUT_SECONDS))
    web = make_web_client(
        token=settings.slack_bot_token.get_secret_value(), base_url=settings.slack_api_url, session=slack_http
    )
    try:
        # Pinned once: requests from any other workspace are refused (handlers/workspace.py).
        team_id = await own_workspace(web)
    except ValueError:
        await slack_http.close()
        raise
    if run_migrations:
        await migrate(settings.database_url)
    db = Database(settings.database_url)
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=settings.http_timeout_seconds))
    poster = SlackPoster(web)
    directory = SlackDirectory(web)
    orgs = OrgRegistry(settings=settings, session=http, retry=retry)
    push = PushService(db=db, orgs=orgs, settings=settings)
    access = AccessPolicy(rules=settings.access, directory=directory)
    approvals = ApprovalService(db=db, directory=directory, access=access)
    fd = FlexDeployService.from_settings(settings=settings, db=db, session=http, retry=retry)
    sfp = SfpService.from_settings(settings=settings, db=db, session=http, retry=retry)
    deploy = DeployService(db=db, orgs=orgs, settings=settings, session=http, retry=retry)
    # One KindView per kind of operation: how the poller advances it and how its card looks.
    views: dict[str, KindView] = {
        OpKind.PUSH: KindView(
            advancer=KindAdvancer(steps=PushSteps(db=db, orgs=orgs, writes=LeasedWrites(db)), writes=LeasedWrites(db)),
            card=push_messages.push_card,
            event_reply=push_messages.event_reply,
            completion_text=push_messages.completion_text,
        ),
        OpKind.FD: KindView(
            advancer=KindAdvancer(steps=fd.steps, writes=LeasedWrites(db)),
            card=fd_messages.fd_card,
            event_reply=fd_messages.event_reply,
            completion_text=fd_messages.completion_text,
        ),
        OpKind.SFP: KindView(
            advancer=KindAdvancer(steps=sfp.steps, writes=LeasedWrites(db)),
            card=sfp_messages.sfp_card,
            event_reply=sfp_messages.event_reply,
            completion_text=sfp_messages.completion_text,
        ),
        OpKind.DEPLOY: KindView(
            advancer=KindAdvancer(steps=DeploySteps(deploy), writes=LeasedWrites(db)),
            card=deploy_messages.deploy_card,
            event_reply=deploy_messages.event_reply,
            completion_text=deploy_messages.completion_text,
        ),
    }
    # The outbox is the one retry owner of what it sends (and of the poller's card edits): its
    # client leaves 429s and 5xx to it. Same connections as the listeners' client.
    replica = owner or replica_name()
    queue_poster = SlackPoster(
        make_outbox_client(
            token=settings.slack_bot_token.get_secret_value(), base_url=settings.slack_api_url, session=slack_http
        )
    )
    outbox = SlackOutbox(db=db, poster=queue_poster, render_card=card_renderer(db=db, views=views), owner=replica)
    poller = Poller(
        db=db,
        poster=queue_poster,
        outbox=outbox,
        config=settings.poller,
        notifications_channel=settings.notifications.channel,
        owner=replica,
        views=views,
    )
    socket_mode = settings.slack_signing_secret is None
    ack_first = AckFirst()
    app = AckFirstApp(
        ack_first=ack_first,
        client=web,
        signing_secret=None if socket_mode else settings.slack_signing_secret.get_secret_value(),  # type: ignore[union-attr]
        request_verification_enabled=not socket_mode,
        process_before_response=True,  # listeners return right after ack(); work runs in AckFirst
    )
    deps = HandlerDeps(
        settings=settings,
        team_id=team_id,
        push=push,
        approvals=approvals,
        access=access,
        audit=AuditLog(db=db),
        deliveries=Deliveries(db=db),
        operations=OperationLookup(db=db),
        poster=poster,
        directory=directory,
        kick_poller=poller.kick,
        outbox=poller.outbox,
        fd=fd,
        sfp=sfp,
        deploy=deploy,
        ack_first=ack_first,
    )
    handlers.register(app, deps)
    return Runtime(settings=settings, db=db, http=http, app=app, poller=poller, push=push, ack_first=ack_first)
