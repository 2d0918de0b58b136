"""``/deploy`` and the Cancel / Quick deploy buttons on deployment cards: parse, ack, call the
deploy service, render."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncBoltContext, AsyncRespond

from bot.core.when import parse_when
from bot.deploy import messages as deploy_messages
from bot.deploy.commands import (
    DEPLOY_USAGE,
    DeployHelp,
    DeployList,
    DeployOrgs,
    DeployQuick,
    DeployRef,
    DeployStart,
    parse_deploy,
)
from bot.deploy.payloads import params_of
from bot.deploy.requests import DeployCommand
from bot.deploy.service import DeployPlan, DeployService, QuickPlan
from bot.errors import StateError
from bot.slack.blocks import escape
from bot.slack.outbox import reply_row
from bot.store.models import REF_PREFIX, OpKind
from handlers.context import HandlerDeps
from handlers.frame import Invocation, record_request, run_button, run_command


def service(deps: HandlerDeps) -> DeployService:
    if deps.deploy is None:
        raise StateError("Metadata deployments are not set up in this bot.")
    return deps.deploy


async def deploy_command(
    ack: AsyncAck, command: dict[str, Any], respond: AsyncRespond, context: AsyncBoltContext
) -> None:
    await run_command(
        ack, command, respond, context, name="deploy", parse=parse_deploy, usage=DEPLOY_USAGE, handle=handle_deploy
    )


async def handle_deploy(who: Invocation, parsed: DeployCommand) -> None:
    deps, user, channel = who.deps, who.user, who.channel
    if isinstance(parsed, DeployHelp):
        await who.reply(escape(DEPLOY_USAGE))
    elif isinstance(parsed, DeployList):
        await who.reply(deploy_messages.list_message(await service(deps).recent(channel=channel, user=user)))
    elif isinstance(parsed, DeployOrgs):
        await who.reply(deploy_messages.orgs_message(await service(deps).orgs_overview()))
    elif isinstance(parsed, DeployRef) and parsed.action == "status":
        operation = await service(deps).get(parsed.ref)
        await deps.access.check_read(operation, user=user, channel=channel)
        await who.reply(f"Status of {operation.ref}", deploy_messages.status_blocks(operation))
    elif isinstance(parsed, DeployRef):
        await cancel(who, parsed.ref)
    elif isinstance(parsed, DeployStart):
        scheduled_for = await scheduled_time(who, parsed.at)  # checked before the artifact is read
        plan = await service(deps).plan(parsed)
        await create(who, plan, key=f"deploy:{who.trigger_id}", at=scheduled_for)
    elif isinstance(parsed, DeployQuick):
        scheduled_for = await scheduled_time(who, parsed.at)
        quick = await service(deps).plan_quick(parsed.ref, scheduled_for=scheduled_for)
        await create(who, quick, key=quick.idempotency_key, at=scheduled_for)


async def scheduled_time(who: Invocation, at: str | None) -> datetime | None:
    if at is None:
        return None
    return parse_when(at, tz_name=await who.deps.directory.time_zone(who.user))


async def create(
    who: Invocation, plan: DeployPlan | QuickPlan, *, key: str, at: datetime | None, fallback_channel: str = ""
) -> None:
    """``fallback_channel``: where the deployment's card goes when the request came from no channel."""
    deps, user, channel = who.deps, who.user, who.channel or fallback_channel
    operation, created = await service(deps).create(
        plan, requester=user, channel=channel, idempotency_key=key, scheduled_for=at
    )
    await record_request(
        who,
        operation,
        created=created,
        action=f"deploy.{params_of(operation).action}",
        detail=f"{operation.summary} ({deploy_messages.plan_summary(plan)})",
        channel=channel,
    )
    notes = plan.notes if created else []
    await who.reply(deploy_messages.created_message(operation, created=created, notes=notes))


async def cancel(who: Invocation, ref: str) -> None:
    deps = who.deps
    await deps.access.check_cancel(await service(deps).get(ref), user=who.user)
    operation = await service(deps).cancel(ref, user=who.user)
    deps.kick_poller()
    await deps.audit.record(
        actor=who.user,
        channel=who.channel,
        operation_ref=operation.ref,
        action="deploy.cancel",
        outcome=operation.state,
    )
    await deps.outbox.enqueue(
        reply_row(operation=operation, text=deploy_messages.cancel_thread_text(operation, who.user))
    )
    await who.reply(deploy_messages.cancel_ack(operation))


async def on_cancel(ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, context: AsyncBoltContext) -> None:
    await run_button(ack, body, respond, context, command="deploy", action="deploy.cancel", handle=handle_cancel_button)


async def handle_cancel_button(who: Invocation, operation_id: int) -> None:
    await cancel(who, f"{REF_PREFIX[OpKind.DEPLOY]}{operation_id}")


async def on_quick(ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, context: AsyncBoltContext) -> None:
    await run_button(ack, body, respond, context, command="deploy", action="deploy.quick", handle=handle_quick_button)


async def handle_quick_button(who: Invocation, operation_id: int) -> None:
    """Quick deploy from a validation's card; a click that carries no channel deploys to the
    validation's channel."""
    quick = await service(who.deps).plan_quick(f"{REF_PREFIX[OpKind.DEPLOY]}{operation_id}")
    await create(who, quick, key=quick.idempotency_key, at=None, fallback_channel=quick.validation.channel)


def register(app: AsyncApp) -> None:
    app.command("/deploy")(deploy_command)
    app.action("deploy_cancel")(on_cancel)
    app.action("deploy_quick")(on_quick)
