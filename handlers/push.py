"""``/push``: parse, ack, call the push service, render."""

from __future__ import annotations

from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncBoltContext, AsyncRespond

from bot.core.grammar import Help
from bot.core.payloads import common
from bot.core.when import parse_when
from bot.push import messages as push_messages
from bot.push.commands import PUSH_USAGE, PushCreate, PushList, PushRef, PushRetry, parse_push
from bot.slack.blocks import escape
from handlers.context import HandlerDeps, deps_of
from handlers.errors import guarded, parse_or_refuse, reply_ephemeral


async def push_command(
    ack: AsyncAck, command: dict[str, Any], respond: AsyncRespond, context: AsyncBoltContext
) -> None:
    deps = deps_of(context)
    user, channel, text = command["user_id"], command["channel_id"], command.get("text", "").strip()
    detail = f"/push {text}"[:500]
    parsed = await parse_or_refuse(ack, parse_push, text, deps=deps, actor=user, channel=channel, detail=detail)
    if parsed is None:
        return
    await ack()

    async def work() -> None:
        await deps.access.check(command="push", user=user, channel=channel)
        if isinstance(parsed, Help):
            await reply_ephemeral(respond, escape(PUSH_USAGE))
        elif isinstance(parsed, PushList):
            recent = await deps.push.recent(channel=channel, user=user)
            await reply_ephemeral(respond, push_messages.list_message(recent))
        elif isinstance(parsed, PushRef) and parsed.action == "status":
            operation = await deps.push.get(parsed.ref)
            await deps.access.check_read(operation, user=user, channel=channel)
            await reply_ephemeral(respond, f"Status of {operation.ref}", push_messages.status_blocks(operation))
        elif isinstance(parsed, PushRef):
            await deps.access.check_cancel(await deps.push.get(parsed.ref), user=user)
            operation = await deps.push.cancel(parsed.ref, user=user)
            deps.kick_poller()
            await reply_ephemeral(respond, f"✋ {operation.ref} is canceled; nothing more will be upgraded.")
        elif isinstance(parsed, PushCreate):
            await create(
                deps, parsed, user=user, channel=channel, trigger_id=command.get("trigger_id", ""), respond=respond
            )
        elif isinstance(parsed, PushRetry):
            await retry(
                deps, parsed, user=user, channel=channel, trigger_id=command.get("trigger_id", ""), respond=respond
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
        usage=PUSH_USAGE,
    )


async def scheduled_time(deps: HandlerDeps, at: str | None, user: str) -> Any:
    if at is None:
        return None
    return parse_when(at, tz_name=await deps.directory.time_zone(user))


async def create(
    deps: HandlerDeps, parsed: PushCreate, *, user: str, channel: str, trigger_id: str, respond: AsyncRespond
) -> None:
    scheduled_for = await scheduled_time(deps, parsed.at, user)  # checked before any Salesforce call
    plan = await deps.push.plan(parsed.version, parsed.orgs)
    if parsed.dry_run:
        await reply_ephemeral(respond, push_messages.plan_message(plan, dry_run=True))
        return
    operation, created = await deps.push.create(
        plan, requester=user, channel=channel, idempotency_key=f"push:{trigger_id}", scheduled_for=scheduled_for
    )
    deps.kick_poller()
    await deps.audit.record(
        actor=user,
        channel=channel,
        operation_ref=operation.ref,
        action="push.create",
        detail=operation.summary,
        outcome=operation.state,
    )
    await deps.audit.waiver(
        actor=user, channel=channel, operation_ref=operation.ref, approval=common(operation).approval
    )
    text = push_messages.created_message(operation, created=created)
    if plan.not_eligible:
        text += "\n" + push_messages.plan_message(plan, dry_run=False).split("\n", 1)[0]
        text += "\n" + "\n".join(f"• `{org}` — {why}" for org, why in plan.not_eligible[:20])
    await reply_ephemeral(respond, text)


async def retry(
    deps: HandlerDeps, parsed: PushRetry, *, user: str, channel: str, trigger_id: str, respond: AsyncRespond
) -> None:
    scheduled_for = await scheduled_time(deps, parsed.at, user)
    # A retry shows the earlier push's failures, so it is a read of that push.
    await deps.access.check_read(await deps.push.get(parsed.ref), user=user, channel=channel)
    retry_plan = await deps.push.retry_plan(parsed.ref)
    if parsed.dry_run or not retry_plan.plan.targets:
        await reply_ephemeral(respond, push_messages.retry_message(retry_plan, dry_run=parsed.dry_run))
        return
    operation, created = await deps.push.create(
        retry_plan.plan,
        requester=user,
        channel=channel,
        idempotency_key=f"push:{trigger_id}",
        scheduled_for=scheduled_for,
        retry_of=retry_plan.previous.ref,
    )
    deps.kick_poller()
    await deps.audit.record(
        actor=user,
        channel=channel,
        operation_ref=operation.ref,
        action="push.retry",
        detail=f"retry of {retry_plan.previous.ref}: {operation.summary}",
        outcome=operation.state,
    )
    await deps.audit.waiver(
        actor=user, channel=channel, operation_ref=operation.ref, approval=common(operation).approval
    )
    text = push_messages.created_message(operation, created=created)
    text += "\n" + push_messages.retry_message(retry_plan, dry_run=False).split("\n", 1)[-1]
    await reply_ephemeral(respond, text)


def register(app: AsyncApp) -> None:
    app.command("/push")(push_command)
