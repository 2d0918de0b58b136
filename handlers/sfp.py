"""``/sfp`` and the Stop / Cancel buttons on sfp task cards: parse, ack, call the sfp service, render."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncBoltContext, AsyncRespond

from bot.core.payloads import common
from bot.core.when import parse_when
from bot.errors import StateError, UsageError
from bot.sfp import messages as sfp_messages
from bot.sfp.commands import SFP_USAGE, SfpHelp, SfpList, SfpRef, SfpSubmit, parse_sfp
from bot.sfp.requests import Target, TaskRequest
from bot.sfp.service import NOT_CONFIGURED, SfpService
from bot.slack.blocks import escape
from bot.store.models import REF_PREFIX, OpKind
from handlers.context import HandlerDeps, deps_of
from handlers.errors import guarded, parse_or_refuse, reply_ephemeral


def _operation_id(body: dict[str, Any]) -> int:
    value = str((body.get("actions") or [{}])[0].get("value") or "")
    return int(value) if value.isdigit() else 0


def _until(text: str, *, tz_name: str | None, now: datetime) -> datetime:
    try:
        return parse_when(text, tz_name=tz_name, now=now)
    except UsageError as error:
        raise UsageError(f"`--until`: {error.message}", usage=error.usage) from None


def service(deps: HandlerDeps) -> SfpService:
    if deps.sfp is None or not deps.sfp.configured:
        raise StateError(NOT_CONFIGURED)
    return deps.sfp


async def sfp_command(ack: AsyncAck, command: dict[str, Any], respond: AsyncRespond, context: AsyncBoltContext) -> None:
    deps = deps_of(context)
    user, channel, text = command["user_id"], command["channel_id"], command.get("text", "").strip()
    detail = f"/sfp {text}"[:500]
    parsed = await parse_or_refuse(ack, parse_sfp, text, deps=deps, actor=user, channel=channel, detail=detail)
    if parsed is None:
        return
    await ack()

    async def work() -> None:
        await deps.access.check(command="sfp", user=user, channel=channel)
        if isinstance(parsed, SfpHelp):
            await reply_ephemeral(respond, escape(SFP_USAGE))
        elif isinstance(parsed, SfpList):
            recent = await service(deps).recent(channel=channel, user=user)
            await reply_ephemeral(respond, sfp_messages.list_message(recent))
        elif isinstance(parsed, SfpSubmit):
            await submit(
                deps, parsed, user=user, channel=channel, trigger_id=command.get("trigger_id", ""), respond=respond
            )
        else:
            await on_ref(deps, parsed, user=user, channel=channel, respond=respond)
        await deps.audit.record(actor=user, channel=channel, action="command", detail=detail, outcome="ok")

    await guarded(
        work, respond=respond, deps=deps, actor=user, channel=channel, action="command", detail=detail, usage=SFP_USAGE
    )


async def submit(
    deps: HandlerDeps, parsed: SfpSubmit, *, user: str, channel: str, trigger_id: str, respond: AsyncRespond
) -> None:
    sfp = service(deps)
    now = datetime.now(UTC)
    zone = await deps.directory.time_zone(user) if parsed.at or parsed.until else None
    request = TaskRequest(
        task_type=parsed.task_type,
        data=parsed.data,
        priority=parsed.priority,
        scheduled_for=parse_when(parsed.at, tz_name=zone, now=now) if parsed.at else None,
        every=parsed.every,
        until=_until(parsed.until, tz_name=zone, now=now) if parsed.until else None,
        retries=parsed.retries,
        shortcut=parsed.shortcut,
    )
    operation, created = await sfp.create(
        request, requester=user, channel=channel, idempotency_key=f"sfp:{trigger_id}", now=now
    )
    deps.kick_poller()
    await deps.audit.record(
        actor=user,
        channel=channel,
        operation_ref=operation.ref,
        action="sfp.submit",
        detail=operation.summary,
        outcome=operation.state,
    )
    await deps.audit.waiver(
        actor=user, channel=channel, operation_ref=operation.ref, approval=common(operation).approval
    )
    await reply_ephemeral(respond, sfp_messages.created_message(operation, created=created))


async def on_ref(deps: HandlerDeps, parsed: SfpRef, *, user: str, channel: str, respond: AsyncRespond) -> None:
    sfp = service(deps)
    target = await sfp.target(parsed)
    await allowed(deps, target, action=parsed.action, user=user, channel=channel)
    if parsed.action == "status":
        live = await sfp.live_status(target)
        if target.operation is None:
            assert live is not None
            await reply_ephemeral(respond, sfp_messages.foreign_status_text(target, live))
        else:
            blocks = sfp_messages.status_blocks(target.operation, live)
            await reply_ephemeral(respond, f"Status of {target.label}", blocks)
    elif parsed.action == "result":
        await reply_ephemeral(respond, sfp_messages.result_text(target, await sfp.result(target)))
    elif parsed.action == "runs":
        await reply_ephemeral(respond, sfp_messages.runs_text(target, await sfp.runs(target)))
    elif parsed.action == "cancel":
        await cancel(deps, target, user=user, channel=channel, respond=respond)
    elif parsed.action == "stop":
        await stop(deps, target, user=user, channel=channel, respond=respond)


async def allowed(deps: HandlerDeps, target: Target, *, action: str, user: str, channel: str) -> None:
    """Refuse before any call to the sfp server: a task not of ours is for admins only."""
    if target.operation is None:
        await deps.access.check_foreign(user=user, what=f"Operation `{target.operation_id}`")
    elif action in {"cancel", "stop"}:
        await deps.access.check_cancel(target.operation, user=user, verb=action)
    else:
        await deps.access.check_read(target.operation, user=user, channel=channel)


async def cancel(deps: HandlerDeps, target: Target, *, user: str, channel: str, respond: AsyncRespond) -> None:
    outcome = await service(deps).cancel(target, user=user)
    deps.kick_poller()
    await deps.audit.record(
        actor=user,
        channel=channel,
        operation_ref=target.operation.ref if target.operation else f"sfp:{target.operation_id}",
        action="sfp.cancel",
        outcome="requested",
    )
    await reply_ephemeral(respond, sfp_messages.cancel_text(outcome))


async def stop(deps: HandlerDeps, target: Target, *, user: str, channel: str, respond: AsyncRespond) -> None:
    outcome = await service(deps).stop(target, user=user)
    deps.kick_poller()
    await deps.audit.record(
        actor=user,
        channel=channel,
        operation_ref=target.operation.ref if target.operation else f"sfp:{target.operation_id}",
        action="sfp.stop",
        outcome="stopped",
    )
    await reply_ephemeral(respond, sfp_messages.stop_text(outcome))


async def on_stop(ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, context: AsyncBoltContext) -> None:
    await ack()
    await _button(deps_of(context), "stop", body=body, respond=respond)


async def on_cancel(ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, context: AsyncBoltContext) -> None:
    await ack()
    await _button(deps_of(context), "cancel", body=body, respond=respond)


async def _button(deps: HandlerDeps, action: str, *, body: dict[str, Any], respond: AsyncRespond) -> None:
    """The Stop and Cancel buttons of a task card: the same checks as ``/sfp stop|cancel``."""
    user, channel = body["user"]["id"], (body.get("channel") or {}).get("id", "")
    operation_id = _operation_id(body)

    async def work() -> None:
        await deps.access.check(command="sfp", user=user, channel=channel)
        target = await service(deps).target(SfpRef(action=action, ref=f"{REF_PREFIX[OpKind.SFP]}{operation_id}"))
        await allowed(deps, target, action=action, user=user, channel=channel)
        if action == "stop":
            await stop(deps, target, user=user, channel=channel, respond=respond)
        else:
            await cancel(deps, target, user=user, channel=channel, respond=respond)

    await guarded(
        work,
        respond=respond,
        deps=deps,
        actor=user,
        channel=channel,
        action=f"sfp.{action}",
        detail=f"operation {operation_id}",
    )


def register(app: AsyncApp) -> None:
    app.command("/sfp")(sfp_command)
    app.action(sfp_messages.STOP_ACTION)(on_stop)
    app.action(sfp_messages.CANCEL_ACTION)(on_cancel)
