"""``/deploy`` and the Cancel / Quick deploy buttons on deployment cards: parse, ack, call the
deploy service, render."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncBoltContext, AsyncRespond

from bot.core.payloads import common
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
from bot.deploy.service import DeployPlan, DeployService, QuickPlan
from bot.errors import StateError
from bot.slack.blocks import escape
from bot.slack.outbox import reply_row
from bot.store.models import REF_PREFIX, OpKind
from handlers.context import HandlerDeps, deps_of
from handlers.errors import guarded, parse_or_refuse, reply_ephemeral


def _operation_id(body: dict[str, Any]) -> int:
    value = str((body.get("actions") or [{}])[0].get("value") or "")
    return int(value) if value.isdigit() else 0


def service(deps: HandlerDeps) -> DeployService:
    if deps.deploy is None:
        raise StateError("Metadata deployments are not set up in this bot.")
    return deps.deploy


async def deploy_command(
    ack: AsyncAck, command: dict[str, Any], respond: AsyncRespond, context: AsyncBoltContext
) -> None:
    deps = deps_of(context)
    user, channel, text = command["user_id"], command["channel_id"], command.get("text", "").strip()
    detail = f"/deploy {text}"[:500]
    parsed = await parse_or_refuse(ack, parse_deploy, text, deps=deps, actor=user, channel=channel, detail=detail)
    if parsed is None:
        return
    await ack()
    trigger = command.get("trigger_id", "")

    async def work() -> None:
        await deps.access.check(command="deploy", user=user, channel=channel)
        if isinstance(parsed, DeployHelp):
            await reply_ephemeral(respond, escape(DEPLOY_USAGE))
        elif isinstance(parsed, DeployList):
            recent = await service(deps).recent(channel=channel, user=user)
            await reply_ephemeral(respond, deploy_messages.list_message(recent))
        elif isinstance(parsed, DeployOrgs):
            await reply_ephemeral(respond, deploy_messages.orgs_message(await service(deps).orgs_overview()))
        elif isinstance(parsed, DeployRef) and parsed.action == "status":
            operation = await service(deps).get(parsed.ref)
            await deps.access.check_read(operation, user=user, channel=channel)
            await reply_ephemeral(respond, f"Status of {operation.ref}", deploy_messages.status_blocks(operation))
        elif isinstance(parsed, DeployRef):
            await cancel(deps, parsed.ref, user=user, channel=channel, respond=respond)
        elif isinstance(parsed, DeployStart):
            scheduled_for = await scheduled_time(deps, parsed.at, user)  # checked before the artifact is read
            plan = await service(deps).plan(parsed)
            await create(
                deps, plan, user=user, channel=channel, key=f"deploy:{trigger}", at=scheduled_for, respond=respond
            )
        elif isinstance(parsed, DeployQuick):
            scheduled_for = await scheduled_time(deps, parsed.at, user)
            quick = await service(deps).plan_quick(parsed.ref, scheduled_for=scheduled_for)
            await create(
                deps, quick, user=user, channel=channel, key=quick.idempotency_key, at=scheduled_for, respond=respond
            )
        await deps.audit.record(actor=user, channel=channel, action="command", detail=detail, outcome="ok")

    await guarded(
        work,
        respond=respond,
        deps=deps,
        actor=user,
        channel=channel,
        action="command",
        detail=detail,
        usage=DEPLOY_USAGE,
    )


async def scheduled_time(deps: HandlerDeps, at: str | None, user: str) -> datetime | None:
    if at is None:
        return None
    return parse_when(at, tz_name=await deps.directory.time_zone(user))


async def create(
    deps: HandlerDeps,
    plan: DeployPlan | QuickPlan,
    *,
    user: str,
    channel: str,
    key: str,
    at: datetime | None,
    respond: AsyncRespond,
) -> None:
    operation, created = await service(deps).create(
        plan, requester=user, channel=channel, idempotency_key=key, scheduled_for=at
    )
    deps.kick_poller()
    await deps.audit.record(
        actor=user,
        channel=channel,
        operation_ref=operation.ref,
        action=f"deploy.{params_of(operation).action}",
        detail=f"{operation.summary} ({deploy_messages.plan_summary(plan)})"[:500],
        outcome=operation.state,
    )
    await deps.audit.waiver(
        actor=user, channel=channel, operation_ref=operation.ref, approval=common(operation).approval
    )
    notes = plan.notes if created else []
    await reply_ephemeral(respond, deploy_messages.created_message(operation, created=created, notes=notes))


async def cancel(deps: HandlerDeps, ref: str, *, user: str, channel: str, respond: AsyncRespond) -> None:
    await deps.access.check_cancel(await service(deps).get(ref), user=user)
    operation = await service(deps).cancel(ref, user=user)
    deps.kick_poller()
    await deps.audit.record(
        actor=user,
        channel=channel,
        operation_ref=operation.ref,
        action="deploy.cancel",
        outcome=operation.state,
    )
    await deps.outbox.enqueue(reply_row(operation=operation, text=deploy_messages.cancel_thread_text(operation, user)))
    await reply_ephemeral(respond, deploy_messages.cancel_ack(operation))


async def on_cancel(ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, context: AsyncBoltContext) -> None:
    deps = deps_of(context)
    await ack()
    user, channel = body["user"]["id"], (body.get("channel") or {}).get("id", "")
    operation_id = _operation_id(body)

    async def work() -> None:
        await deps.access.check(command="deploy", user=user, channel=channel)
        await cancel(deps, f"{REF_PREFIX[OpKind.DEPLOY]}{operation_id}", user=user, channel=channel, respond=respond)

    await guarded(
        work,
        respond=respond,
        deps=deps,
        actor=user,
        channel=channel,
        action="deploy.cancel",
        detail=f"operation {operation_id}",
    )


async def on_quick(ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, context: AsyncBoltContext) -> None:
    deps = deps_of(context)
    await ack()
    user, channel = body["user"]["id"], (body.get("channel") or {}).get("id", "")
    operation_id = _operation_id(body)

    async def work() -> None:
        await deps.access.check(command="deploy", user=user, channel=channel)
        quick = await service(deps).plan_quick(f"{REF_PREFIX[OpKind.DEPLOY]}{operation_id}")
        await create(
            deps,
            quick,
            user=user,
            channel=channel or quick.validation.channel,
            key=quick.idempotency_key,
            at=None,
            respond=respond,
        )

    await guarded(
        work,
        respond=respond,
        deps=deps,
        actor=user,
        channel=channel,
        action="deploy.quick",
        detail=f"operation {operation_id}",
    )


def register(app: AsyncApp) -> None:
    app.command("/deploy")(deploy_command)
    app.action("deploy_cancel")(on_cancel)
    app.action("deploy_quick")(on_quick)
