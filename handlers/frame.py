"""The one frame around every slash command and every card button.

Each kind's listener did the same things around its own logic: read who and where from the
payload, refuse a syntax error in the ack, ack, check the person may use the command in that
channel, run the work behind the acks in flight, turn errors into an ephemeral reply, and write
the audit rows. Written once here, the copies cannot drift apart; a kind supplies only
``handle(who, parsed)`` or ``handle(who, operation_id)``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from slack_bolt.async_app import AsyncAck, AsyncBoltContext, AsyncRespond

from bot.core.payloads import common
from bot.store.models import Operation
from handlers.context import HandlerDeps, deps_of
from handlers.errors import guarded, parse_or_refuse, reply_ephemeral

Parsed = TypeVar("Parsed")


@dataclass(frozen=True)
class Invocation:
    """Who asked, where, and how to answer them: what every handler needs from the payload."""

    deps: HandlerDeps
    user: str
    channel: str
    respond: AsyncRespond
    trigger_id: str = ""  # a command's: the idempotency key of what it creates

    async def reply(self, text: str, blocks: list[dict[str, Any]] | None = None) -> None:
        await reply_ephemeral(self.respond, text, blocks)


async def record_request(
    who: Invocation, operation: Operation, *, created: bool, action: str, detail: str, channel: str = ""
) -> None:
    """What every request that makes an operation does next: wake the poller, write the request's
    audit row, and (once, when it was created, not on a Slack retry) the waiver it runs under.
    ``channel``: where it was recorded, when not the request's own (a quick deploy from a DM)."""
    deps, where = who.deps, channel or who.channel
    deps.kick_poller()
    await deps.audit.record(
        actor=who.user,
        channel=where,
        operation_ref=operation.ref,
        action=action,
        detail=detail[:500],
        outcome=operation.state,
    )
    if created:
        await deps.audit.waiver(
            actor=who.user, channel=where, operation_ref=operation.ref, approval=common(operation).approval
        )


def operation_id_of(body: dict[str, Any]) -> int:
    """The operation a card button acts on (its value); 0, which names none, if it is not a number."""
    value = str((body.get("actions") or [{}])[0].get("value") or "")
    return int(value) if value.isdigit() else 0


async def run_command(
    ack: AsyncAck,
    command: dict[str, Any],
    respond: AsyncRespond,
    context: AsyncBoltContext,
    *,
    name: str,
    parse: Callable[[str], Parsed],
    usage: str,
    handle: Callable[[Invocation, Parsed], Awaitable[None]],
) -> None:
    """``/<name> …``: a syntax error is refused in the ack; otherwise ack, then (after the access
    check) ``handle`` and a ``command`` audit row, errors answered with ``usage`` where they lack it."""
    deps = deps_of(context)
    user, channel, text = command["user_id"], command["channel_id"], command.get("text", "").strip()
    detail = f"/{name} {text}"[:500]
    parsed = await parse_or_refuse(ack, parse, text, deps=deps, actor=user, channel=channel, detail=detail)
    if parsed is None:
        return
    await ack()
    who = Invocation(deps=deps, user=user, channel=channel, respond=respond, trigger_id=command.get("trigger_id", ""))

    async def work() -> None:
        await deps.access.check(command=name, user=user, channel=channel)
        await handle(who, parsed)
        await deps.audit.record(actor=user, channel=channel, action="command", detail=detail, outcome="ok")

    await guarded(
        work, respond=respond, deps=deps, actor=user, channel=channel, action="command", detail=detail, usage=usage
    )


async def run_button(
    ack: AsyncAck,
    body: dict[str, Any],
    respond: AsyncRespond,
    context: AsyncBoltContext,
    *,
    command: str | None,
    action: str,
    handle: Callable[[Invocation, int], Awaitable[None]],
    promptly: bool = False,
) -> None:
    """A button on an operation's card: ack, then ``handle(who, operation_id)``, errors audited as
    ``action``. ``command``: the slash command whose access rules the button shares (None where
    the service itself decides who may, as approvals do). ``promptly``: for work that must beat
    Slack's 3-second ``trigger_id`` (opening a modal)."""
    deps = deps_of(context)
    await ack()
    user, channel = body["user"]["id"], (body.get("channel") or {}).get("id", "")
    operation_id = operation_id_of(body)
    who = Invocation(deps=deps, user=user, channel=channel, respond=respond, trigger_id=body.get("trigger_id", ""))

    async def work() -> None:
        if command is not None:
            await deps.access.check(command=command, user=user, channel=channel)
        await handle(who, operation_id)

    await guarded(
        work,
        respond=respond,
        deps=deps,
        actor=user,
        channel=channel,
        action=action,
        detail=f"operation {operation_id}",
        promptly=promptly,
    )
