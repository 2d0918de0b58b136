"""Approve / Reject / Cancel buttons on status cards, and the reject-reason modal."""

from __future__ import annotations

from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncBoltContext, AsyncRespond
from slack_sdk.web.async_client import AsyncWebClient

from bot.slack.messages import approval_ack, approval_thread_text, reject_modal
from bot.slack.outbox import reply_row
from bot.store.models import REF_PREFIX, OpKind
from handlers.context import HandlerDeps, deps_of
from handlers.errors import guarded, reply_ephemeral


def _operation_id(body: dict[str, Any]) -> int:
    value = str((body.get("actions") or [{}])[0].get("value") or "")
    return int(value) if value.isdigit() else 0


async def decide(
    deps: HandlerDeps,
    *,
    operation_id: int,
    user: str,
    channel: str,
    approve: bool,
    reason: str,
    respond: AsyncRespond | None,
) -> None:
    decision = await deps.approvals.decide(operation_id=operation_id, user=user, approve=approve, reason=reason)
    op = decision.operation
    await deps.audit.record(
        actor=user,
        channel=channel,
        operation_ref=op.ref,
        action="approve" if approve else "reject",
        detail=reason[:500],
        outcome=decision.outcome,
    )
    deps.kick_poller()
    if decision.outcome != "rejected":  # a rejection is announced with the completion
        await deps.outbox.enqueue(reply_row(operation=op, text=approval_thread_text(user, decision.outcome, reason)))
    text = approval_ack(op.ref, decision.outcome, decision.approvals, decision.needed)
    if respond is not None:
        await reply_ephemeral(respond, text)
    else:
        await deps.poster.ephemeral(channel=op.channel, user=user, text=text)


async def on_approve(ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, context: AsyncBoltContext) -> None:
    deps = deps_of(context)
    await ack()
    user, channel = body["user"]["id"], (body.get("channel") or {}).get("id", "")
    operation_id = _operation_id(body)
    await guarded(
        lambda: decide(
            deps, operation_id=operation_id, user=user, channel=channel, approve=True, reason="", respond=respond
        ),
        respond=respond,
        deps=deps,
        actor=user,
        channel=channel,
        action="approve",
        detail=f"operation {operation_id}",
    )


async def on_reject(
    ack: AsyncAck, body: dict[str, Any], client: AsyncWebClient, respond: AsyncRespond, context: AsyncBoltContext
) -> None:
    deps = deps_of(context)
    await ack()
    user, channel = body["user"]["id"], (body.get("channel") or {}).get("id", "")
    operation_id = _operation_id(body)

    async def work() -> None:
        op = await deps.operations.by_id(operation_id)
        ref = op.ref if op else f"#{operation_id}"
        await client.views_open(trigger_id=body["trigger_id"], view=reject_modal(operation_id, ref))

    await guarded(
        work,
        respond=respond,
        deps=deps,
        actor=user,
        channel=channel,
        action="reject",
        detail=f"operation {operation_id}",
        promptly=True,  # the trigger_id is good for 3 s only
    )


async def on_reject_submit(
    ack: AsyncAck, body: dict[str, Any], view: dict[str, Any], context: AsyncBoltContext
) -> None:
    deps = deps_of(context)
    await ack()
    user = body["user"]["id"]
    metadata = str(view.get("private_metadata") or "")
    operation_id = int(metadata) if metadata.isdigit() else 0
    reason = str(
        ((view.get("state") or {}).get("values") or {}).get("reason", {}).get("reason", {}).get("value") or ""
    ).strip()
    card_channel = ""  # a modal has no channel: answers go where the operation's card is

    async def work() -> None:
        nonlocal card_channel
        op = await deps.operations.by_id(operation_id)
        card_channel = op.channel if op else ""
        await decide(
            deps, operation_id=operation_id, user=user, channel=card_channel, approve=False, reason=reason, respond=None
        )

    async def respond_via_ephemeral(text: str, **_: Any) -> None:
        if card_channel:
            await deps.poster.ephemeral(channel=card_channel, user=user, text=text)

    await guarded(
        work,
        respond=respond_via_ephemeral,  # type: ignore[arg-type]
        deps=deps,
        actor=user,
        channel="",
        action="reject",
        detail=f"operation {operation_id}",
    )


async def on_push_cancel(ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, context: AsyncBoltContext) -> None:
    deps = deps_of(context)
    await ack()
    user, channel = body["user"]["id"], (body.get("channel") or {}).get("id", "")
    operation_id = _operation_id(body)

    async def work() -> None:
        await deps.access.check(command="push", user=user, channel=channel)
        ref = f"{REF_PREFIX[OpKind.PUSH]}{operation_id}"
        await deps.access.check_cancel(await deps.push.get(ref), user=user)
        operation = await deps.push.cancel(ref, user=user)
        await deps.audit.record(
            actor=user,
            channel=channel,
            operation_ref=operation.ref,
            action="push.cancel",
            outcome=operation.state,
        )
        deps.kick_poller()
        await reply_ephemeral(respond, f"✋ {operation.ref} is canceled.")

    await guarded(
        work,
        respond=respond,
        deps=deps,
        actor=user,
        channel=channel,
        action="push.cancel",
        detail=f"operation {operation_id}",
    )


def register(app: AsyncApp) -> None:
    app.action("op_approve")(on_approve)
    app.action("op_reject")(on_reject)
    app.view("reject_reason")(on_reject_submit)
    app.action("push_cancel")(on_push_cancel)
