"""Approve / Reject buttons on status cards, and the reject-reason modal."""

from __future__ import annotations

from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncBoltContext, AsyncRespond
from slack_sdk.web.async_client import AsyncWebClient

from bot.slack.messages import approval_ack, approval_thread_text, reject_modal
from bot.slack.outbox import reply_row
from handlers.context import HandlerDeps, deps_of
from handlers.errors import guarded, reply_ephemeral
from handlers.frame import Invocation, run_button


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
    # No access check by command: the approval service decides who may approve.
    await run_button(ack, body, respond, context, command=None, action="approve", handle=handle_approve)


async def handle_approve(who: Invocation, operation_id: int) -> None:
    await decide(
        who.deps,
        operation_id=operation_id,
        user=who.user,
        channel=who.channel,
        approve=True,
        reason="",
        respond=who.respond,
    )


async def on_reject(
    ack: AsyncAck, body: dict[str, Any], client: AsyncWebClient, respond: AsyncRespond, context: AsyncBoltContext
) -> None:
    async def open_modal(who: Invocation, operation_id: int) -> None:
        op = await who.deps.operations.by_id(operation_id)
        ref = op.ref if op else f"#{operation_id}"
        await client.views_open(trigger_id=body["trigger_id"], view=reject_modal(operation_id, ref))

    # promptly: the trigger_id is good for 3 s only
    await run_button(ack, body, respond, context, command=None, action="reject", handle=open_modal, promptly=True)


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


def register(app: AsyncApp) -> None:
    app.action("op_approve")(on_approve)
    app.action("op_reject")(on_reject)
    app.view("reject_reason")(on_reject_submit)
