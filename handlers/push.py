"""``/push`` and the Cancel button on push cards: parse, ack, call the push service, render."""

from __future__ import annotations

from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncBoltContext, AsyncRespond

from bot.core.grammar import Help
from bot.core.when import parse_when
from bot.push import messages as push_messages
from bot.push.commands import PUSH_USAGE, parse_push
from bot.push.requests import PushCommand, PushCreate, PushList, PushRef, PushRetry
from bot.slack.blocks import escape
from bot.store.models import REF_PREFIX, OpKind
from handlers.frame import Invocation, record_request, run_button, run_command


async def push_command(
    ack: AsyncAck, command: dict[str, Any], respond: AsyncRespond, context: AsyncBoltContext
) -> None:
    await run_command(
        ack, command, respond, context, name="push", parse=parse_push, usage=PUSH_USAGE, handle=handle_push
    )


async def handle_push(who: Invocation, parsed: PushCommand) -> None:
    deps, user, channel = who.deps, who.user, who.channel
    if isinstance(parsed, Help):
        await who.reply(escape(PUSH_USAGE))
    elif isinstance(parsed, PushList):
        await who.reply(push_messages.list_message(await deps.push.recent(channel=channel, user=user)))
    elif isinstance(parsed, PushRef) and parsed.action == "status":
        operation = await deps.push.get(parsed.ref)
        await deps.access.check_read(operation, user=user, channel=channel)
        await who.reply(f"Status of {operation.ref}", push_messages.status_blocks(operation))
    elif isinstance(parsed, PushRef):
        await deps.access.check_cancel(await deps.push.get(parsed.ref), user=user)
        operation = await deps.push.cancel(parsed.ref, user=user)
        deps.kick_poller()
        await who.reply(f"✋ {operation.ref} is canceled; nothing more will be upgraded.")
    elif isinstance(parsed, PushCreate):
        await create(who, parsed)
    elif isinstance(parsed, PushRetry):
        await retry(who, parsed)


async def scheduled_time(who: Invocation, at: str | None) -> Any:
    if at is None:
        return None
    return parse_when(at, tz_name=await who.deps.directory.time_zone(who.user))


async def create(who: Invocation, parsed: PushCreate) -> None:
    deps, user, channel = who.deps, who.user, who.channel
    scheduled_for = await scheduled_time(who, parsed.at)  # checked before any Salesforce call
    plan = await deps.push.plan(parsed.version, parsed.orgs)
    if parsed.dry_run:
        await who.reply(push_messages.plan_message(plan, dry_run=True))
        return
    operation, created = await deps.push.create(
        plan, requester=user, channel=channel, idempotency_key=f"push:{who.trigger_id}", scheduled_for=scheduled_for
    )
    await record_request(who, operation, created=created, action="push.create", detail=operation.summary)
    text = push_messages.created_message(operation, created=created)
    if plan.not_eligible:
        text += "\n" + push_messages.plan_message(plan, dry_run=False).split("\n", 1)[0]
        text += "\n" + "\n".join(f"• `{org}` — {why}" for org, why in plan.not_eligible[:20])
    await who.reply(text)


async def retry(who: Invocation, parsed: PushRetry) -> None:
    deps, user, channel = who.deps, who.user, who.channel
    scheduled_for = await scheduled_time(who, parsed.at)
    # A retry shows the earlier push's failures, so it is a read of that push.
    await deps.access.check_read(await deps.push.get(parsed.ref), user=user, channel=channel)
    retry_plan = await deps.push.retry_plan(parsed.ref)
    if parsed.dry_run or not retry_plan.plan.targets:
        await who.reply(push_messages.retry_message(retry_plan, dry_run=parsed.dry_run))
        return
    operation, created = await deps.push.create(
        retry_plan.plan,
        requester=user,
        channel=channel,
        idempotency_key=f"push:{who.trigger_id}",
        scheduled_for=scheduled_for,
        retry_of=retry_plan.previous.ref,
    )
    detail = f"retry of {retry_plan.previous.ref}: {operation.summary}"
    await record_request(who, operation, created=created, action="push.retry", detail=detail)
    text = push_messages.created_message(operation, created=created)
    text += "\n" + push_messages.retry_message(retry_plan, dry_run=False).split("\n", 1)[-1]
    await who.reply(text)


async def on_cancel(ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, context: AsyncBoltContext) -> None:
    await run_button(ack, body, respond, context, command="push", action="push.cancel", handle=handle_cancel_button)


async def handle_cancel_button(who: Invocation, operation_id: int) -> None:
    deps = who.deps
    ref = f"{REF_PREFIX[OpKind.PUSH]}{operation_id}"
    await deps.access.check_cancel(await deps.push.get(ref), user=who.user)
    operation = await deps.push.cancel(ref, user=who.user)
    await deps.audit.record(
        actor=who.user, channel=who.channel, operation_ref=operation.ref, action="push.cancel", outcome=operation.state
    )
    deps.kick_poller()
    await who.reply(f"✋ {operation.ref} is canceled.")


def register(app: AsyncApp) -> None:
    app.command("/push")(push_command)
    app.action("push_cancel")(on_cancel)
