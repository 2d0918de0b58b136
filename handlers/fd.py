"""``/fd``: parse, ack, call the FlexDeploy service, render.

``show`` answers only the person who asked. Every change becomes an operation the poller
performs, with a card in the channel: a package is shared release state, and the team should
see who changed it and how, as it would in FlexDeploy's own history. A change that needs no
approval is made at once and its card tells what changed; one that needs approval waits on it.
"""

from __future__ import annotations

from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncBoltContext, AsyncRespond

from bot.core.payloads import common
from bot.errors import UsageError
from bot.flexdeploy import messages as fd_messages
from bot.flexdeploy.commands import FD_USAGE, parse_fd
from bot.flexdeploy.plan import files_csv
from bot.flexdeploy.requests import FdCancel, FdDelete, FdHelp, FdShow, FdStatus, FdWrite
from bot.flexdeploy.service import FlexDeployService
from bot.flexdeploy.steps import NOT_CONFIGURED
from bot.store.models import REF_PREFIX, OpKind
from handlers.context import HandlerDeps, deps_of
from handlers.errors import guarded, parse_or_refuse, reply_ephemeral


def service(deps: HandlerDeps) -> FlexDeployService:
    if deps.fd is None:
        raise UsageError(NOT_CONFIGURED)
    return deps.fd


async def fd_command(ack: AsyncAck, command: dict[str, Any], respond: AsyncRespond, context: AsyncBoltContext) -> None:
    deps = deps_of(context)
    user, channel, text = command["user_id"], command["channel_id"], command.get("text", "").strip()
    detail = f"/fd {text}"[:500]
    parsed = await parse_or_refuse(ack, parse_fd, text, deps=deps, actor=user, channel=channel, detail=detail)
    if parsed is None:
        return
    await ack()

    async def work() -> None:
        await deps.access.check(command="fd", user=user, channel=channel)
        if isinstance(parsed, FdHelp):
            await reply_ephemeral(respond, fd_messages.help_text())
        elif isinstance(parsed, FdShow):
            package = await service(deps).show(parsed.project_id, parsed.package)
            text, blocks = fd_messages.show_message(package, project_id=parsed.project_id)
            await reply_ephemeral(respond, text, blocks)
            if fd_messages.is_long(package):
                # Files cannot be ephemeral in Slack; the full list is shared in the channel.
                await deps.poster.upload(
                    channel=channel,
                    thread_ts=None,
                    file=files_csv(package, project_id=parsed.project_id),
                    comment=fd_messages.file_comment(package, project_id=parsed.project_id, user=user),
                )
        elif isinstance(parsed, FdCancel):
            await deps.access.check_cancel(await service(deps).get(parsed.ref), user=user)
            operation = await service(deps).cancel(parsed.ref, user=user)
            deps.kick_poller()
            await deps.audit.record(
                actor=user, channel=channel, operation_ref=operation.ref, action="fd.cancel", outcome="ok"
            )
            await reply_ephemeral(respond, f"✋ {operation.ref} is withdrawn; nothing was changed in FlexDeploy.")
        else:
            await change(
                deps, parsed, user=user, channel=channel, trigger_id=command.get("trigger_id", ""), respond=respond
            )
        await deps.audit.record(actor=user, channel=channel, action="command", detail=detail, outcome="ok")

    await guarded(
        work, respond=respond, deps=deps, actor=user, channel=channel, action="command", detail=detail, usage=FD_USAGE
    )


async def change(
    deps: HandlerDeps,
    parsed: FdWrite | FdStatus | FdDelete,
    *,
    user: str,
    channel: str,
    trigger_id: str,
    respond: AsyncRespond,
) -> None:
    fd = service(deps)
    planned = await fd.plan(parsed)  # reads the package; refuses bad requests before any write
    outcome = await fd.submit(planned, requester=user, channel=channel, idempotency_key=f"fd:{trigger_id}")
    operation = outcome.operation
    if operation is not None:
        deps.kick_poller()  # the poller makes the call (at once, or after approval) and posts the card
    await deps.audit.record(
        actor=user,
        channel=channel,
        operation_ref=operation.ref if operation is not None else "",
        action=f"fd.{planned.action}",
        detail=planned.call[:500],
        outcome=operation.state if operation is not None else "absent",
    )
    if operation is not None and outcome.created:
        await deps.audit.waiver(
            actor=user,
            channel=channel,
            operation_ref=operation.ref,
            approval=common(operation).approval,
        )
    await reply_ephemeral(respond, fd_messages.submitted_ack(outcome))


async def on_cancel(ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, context: AsyncBoltContext) -> None:
    deps = deps_of(context)
    await ack()
    user, channel = body["user"]["id"], (body.get("channel") or {}).get("id", "")
    value = str((body.get("actions") or [{}])[0].get("value") or "")

    async def work() -> None:
        await deps.access.check(command="fd", user=user, channel=channel)
        ref = f"{REF_PREFIX[OpKind.FD]}{value}"
        await deps.access.check_cancel(await service(deps).get(ref), user=user)
        operation = await service(deps).cancel(ref, user=user)
        await deps.audit.record(
            actor=user, channel=channel, operation_ref=operation.ref, action="fd.cancel", outcome="ok"
        )
        deps.kick_poller()
        await reply_ephemeral(respond, f"✋ {operation.ref} is withdrawn; nothing was changed in FlexDeploy.")

    await guarded(
        work,
        respond=respond,
        deps=deps,
        actor=user,
        channel=channel,
        action="fd.cancel",
        detail=f"operation {value}",
    )


def register(app: AsyncApp) -> None:
    app.command("/fd")(fd_command)
    app.action("fd_cancel")(on_cancel)
