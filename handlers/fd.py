"""``/fd``: parse, ack, call the FlexDeploy service, render.

``show`` answers only the person who asked. Every change becomes an operation the poller
performs, with a card in the channel: a package is shared release state, and the team should
see who changed it and how, as it would in FlexDeploy's own history. A change that needs no
approval is made at once and its card tells what changed; one that needs approval waits on it.
"""

from __future__ import annotations

from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncBoltContext, AsyncRespond

from bot.errors import UsageError
from bot.flexdeploy import messages as fd_messages
from bot.flexdeploy.commands import FD_USAGE, parse_fd
from bot.flexdeploy.plan import files_csv
from bot.flexdeploy.requests import FdCancel, FdCommand, FdDelete, FdHelp, FdShow, FdStatus, FdWrite
from bot.flexdeploy.service import FlexDeployService
from bot.flexdeploy.steps import NOT_CONFIGURED
from bot.store.models import REF_PREFIX, OpKind
from handlers.context import HandlerDeps
from handlers.frame import Invocation, record_request, run_button, run_command


def service(deps: HandlerDeps) -> FlexDeployService:
    if deps.fd is None:
        raise UsageError(NOT_CONFIGURED)
    return deps.fd


async def fd_command(ack: AsyncAck, command: dict[str, Any], respond: AsyncRespond, context: AsyncBoltContext) -> None:
    await run_command(ack, command, respond, context, name="fd", parse=parse_fd, usage=FD_USAGE, handle=handle_fd)


async def handle_fd(who: Invocation, parsed: FdCommand) -> None:
    if isinstance(parsed, FdHelp):
        await who.reply(fd_messages.help_text())
    elif isinstance(parsed, FdShow):
        await show(who, parsed)
    elif isinstance(parsed, FdCancel):
        await cancel(who, parsed.ref)
    else:
        await change(who, parsed)


async def show(who: Invocation, parsed: FdShow) -> None:
    package = await service(who.deps).show(parsed.project_id, parsed.package)
    text, blocks = fd_messages.show_message(package, project_id=parsed.project_id)
    await who.reply(text, blocks)
    if fd_messages.is_long(package):
        # Files cannot be ephemeral in Slack; the full list is shared in the channel.
        await who.deps.poster.upload(
            channel=who.channel,
            thread_ts=None,
            file=files_csv(package, project_id=parsed.project_id),
            comment=fd_messages.file_comment(package, project_id=parsed.project_id, user=who.user),
        )


async def change(who: Invocation, parsed: FdWrite | FdStatus | FdDelete) -> None:
    deps, user, channel = who.deps, who.user, who.channel
    fd = service(deps)
    planned = await fd.plan(parsed)  # reads the package; refuses bad requests before any write
    outcome = await fd.submit(planned, requester=user, channel=channel, idempotency_key=f"fd:{who.trigger_id}")
    operation = outcome.operation
    if operation is None:  # a delete of a package that is not there: nothing to do
        await deps.audit.record(
            actor=user, channel=channel, action=f"fd.{planned.action}", detail=planned.call[:500], outcome="absent"
        )
    else:  # the poller makes the call (at once, or after approval) and posts the card
        action = f"fd.{planned.action}"
        await record_request(who, operation, created=outcome.created, action=action, detail=planned.call)
    await who.reply(fd_messages.submitted_ack(outcome))


async def cancel(who: Invocation, ref: str) -> None:
    """``/fd cancel`` and the card's Cancel button: withdraw a change before it is made."""
    deps = who.deps
    await deps.access.check_cancel(await service(deps).get(ref), user=who.user)
    operation = await service(deps).cancel(ref, user=who.user)
    deps.kick_poller()
    await deps.audit.record(
        actor=who.user, channel=who.channel, operation_ref=operation.ref, action="fd.cancel", outcome="ok"
    )
    await who.reply(f"✋ {operation.ref} is withdrawn; nothing was changed in FlexDeploy.")


async def on_cancel(ack: AsyncAck, body: dict[str, Any], respond: AsyncRespond, context: AsyncBoltContext) -> None:
    await run_button(ack, body, respond, context, command="fd", action="fd.cancel", handle=handle_cancel_button)


async def handle_cancel_button(who: Invocation, operation_id: int) -> None:
    await cancel(who, f"{REF_PREFIX[OpKind.FD]}{operation_id}")


def register(app: AsyncApp) -> None:
    app.command("/fd")(fd_command)
    app.action("fd_cancel")(on_cancel)
