"""``/sfp`` and the Stop / Cancel buttons on sfp task cards: parse, ack, call the sfp service, render."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncBoltContext, AsyncRespond

from bot.core.when import parse_when
from bot.errors import StateError, UsageError
from bot.sfp import messages as sfp_messages
from bot.sfp.commands import SFP_USAGE, SfpHelp, SfpList, SfpRef, SfpSubmit, parse_sfp
from bot.sfp.requests import SfpCommand, Target, TaskRequest
from bot.sfp.service import NOT_CONFIGURED, SfpService
from bot.slack.blocks import escape
from bot.store.models import REF_PREFIX, OpKind
from handlers.context import HandlerDeps
from handlers.frame import Invocation, record_request, run_button, run_command


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
    await run_command(ack, command, respond, context, name="sfp", parse=parse_sfp, usage=SFP_USAGE, handle=handle_sfp)


async def handle_sfp(who: Invocation, parsed: SfpCommand) -> None:
    if isinstance(parsed, SfpHelp):
        await who.reply(escape(SFP_USAGE))
    elif isinstance(parsed, SfpList):
        await who.reply(sfp_messages.list_message(await service(who.deps).recent(channel=who.channel, user=who.user)))
    elif isinstance(parsed, SfpSubmit):
        await submit(who, parsed)
    else:
        await on_ref(who, parsed)


async def submit(who: Invocation, parsed: SfpSubmit) -> None:
    deps, user, channel = who.deps, who.user, who.channel
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
        request, requester=user, channel=channel, idempotency_key=f"sfp:{who.trigger_id}", now=now
    )
    await record_request(who, operation, created=created, action="sfp.submit", detail=operation.summary)
    await who.reply(sfp_messages.created_message(operation, created=created))


async def on_ref(who: Invocation, parsed: SfpRef) -> None:
    sfp = service(who.deps)
    target = await sfp.target(parsed)
    await allowed(who, target, action=parsed.action)
    if parsed.action == "status":
        live = await sfp.live_status(target)
        if target.operation is None:
            assert live is not None
            await who.reply(sfp_messages.foreign_status_text(target, live))
        else:
            await who.reply(f"Status of {target.label}", sfp_messages.status_blocks(target.operation, live))
    elif parsed.action == "result":
        await who.reply(sfp_messages.result_text(target, await sfp.result(target)))
    elif parsed.action == "runs":
        await who.reply(sfp_messages.runs_text(target, await sfp.runs(target)))
    elif parsed.action in {"cancel", "stop"}:
        await end_task(who, target, action=parsed.action)


async def allowed(who: Invocation, target: Target, *, action: str) -> None:
    """Refuse before any call to the sfp server: a task not of ours is for admins only."""
    access = who.deps.access
    if target.operation is None:
        await access.check_foreign(user=who.user, what=f"Operation `{target.operation_id}`")
    elif action in {"cancel", "stop"}:
        await access.check_cancel(target.operation, user=who.user, verb=action)
    else:
        await access.check_read(target.operation, user=who.user, channel=who.channel)


async def end_task(who: Invocation, target: Target, *, action: str) -> None:
    """``cancel`` (a queued task, or a schedule) and ``stop`` (a running one) differ only in the
    service call, its audit outcome and the reply."""
    deps = who.deps
    if action == "stop":
        text, outcome = sfp_messages.stop_text(await service(deps).stop(target, user=who.user)), "stopped"
    else:
        text, outcome = sfp_messages.cancel_text(await service(deps).cancel(target, user=who.user)), "requested"
    deps.kick_poller()
    await deps.audit.record(
        actor=who.user,
        channel=who.channel,
        operation_ref=target.operation.ref if target.operation else f"sfp:{target.operation_id}",
        action=f"sfp.{action}",
        outcome=outcome,
    )
    await who.reply(text)


async def on_stop(ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, context: AsyncBoltContext) -> None:
    await run_button(ack, body, respond, context, command="sfp", action="sfp.stop", handle=handle_stop_button)


async def on_cancel(ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, context: AsyncBoltContext) -> None:
    await run_button(ack, body, respond, context, command="sfp", action="sfp.cancel", handle=handle_cancel_button)


async def handle_stop_button(who: Invocation, operation_id: int) -> None:
    await _button(who, operation_id, action="stop")


async def handle_cancel_button(who: Invocation, operation_id: int) -> None:
    await _button(who, operation_id, action="cancel")


async def _button(who: Invocation, operation_id: int, *, action: str) -> None:
    """The Stop and Cancel buttons of a task card: the same checks as ``/sfp stop|cancel``."""
    target = await service(who.deps).target(SfpRef(action=action, ref=f"{REF_PREFIX[OpKind.SFP]}{operation_id}"))
    await allowed(who, target, action=action)
    await end_task(who, target, action=action)


def register(app: AsyncApp) -> None:
    app.command("/sfp")(sfp_command)
    app.action(sfp_messages.STOP_ACTION)(on_stop)
    app.action(sfp_messages.CANCEL_ACTION)(on_cancel)
