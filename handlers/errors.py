"""The one place where errors become Slack messages (STYLE habit 3)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.context.respond.async_respond import AsyncRespond

from bot.errors import ChatOpsError, UsageError, UserError
from bot.redaction import redact_text
from bot.slack.messages import error_text, unexpected_error_text
from bot.slack.web import redacted_blocks
from handlers.context import HandlerDeps

log = logging.getLogger(__name__)
Parsed = TypeVar("Parsed")


async def reply_ephemeral(respond: AsyncRespond, text: str, blocks: list[dict[str, Any]] | None = None) -> None:
    await respond(
        text=redact_text(text), blocks=redacted_blocks(blocks), response_type="ephemeral", replace_original=False
    )


async def guarded(
    work: Callable[[], Awaitable[None]],
    *,
    respond: AsyncRespond,
    deps: HandlerDeps,
    actor: str,
    channel: str,
    action: str,
    detail: str,
    promptly: bool = False,
    usage: str | None = None,
) -> None:
    """Start a listener's work after ack(), behind the acks in flight (``AckFirst``; ``promptly``:
    at once), and return; errors become an ephemeral reply and an audit row.

    ``usage`` is the command's help, added to a ``UsageError`` raised without one: services
    check input too (production rules, schedules) but know nothing of how commands are written.
    """

    async def run() -> None:
        try:
            await work()
        except ChatOpsError as error:
            if isinstance(error, UsageError) and error.usage is None and usage is not None:
                error.usage = usage
            outcome = "refused" if isinstance(error, UserError) else "upstream-error"
            if not isinstance(error, UserError):
                log.warning("%s failed upstream: %s", action, error.message)
            await deps.audit.record(
                actor=actor,
                channel=channel,
                action=action,
                detail=detail,
                outcome=f"{outcome}: {error.message[:150]}",
            )
            await reply_ephemeral(respond, error_text(error))
        except Exception:
            log.exception("%s failed", action)
            await deps.audit.record(actor=actor, channel=channel, action=action, detail=detail, outcome="bot-error")
            await reply_ephemeral(respond, unexpected_error_text())

    deps.ack_first.spawn(run(), promptly=promptly)


async def parse_or_refuse(
    ack: AsyncAck,
    parse: Callable[[str], Parsed],
    text: str,
    *,
    deps: HandlerDeps,
    actor: str,
    channel: str,
    detail: str,
) -> Parsed | None:
    """Parse a command; a syntax error is answered in the ack itself (fastest, and nothing else
    happens) and audited after it, and None is returned. On success the caller acks."""
    try:
        return parse(text)
    except UsageError as error:
        await ack(text=redact_text(error_text(error)))
        outcome = f"refused: {error.message[:150]}"
        deps.ack_first.spawn(
            deps.audit.record(actor=actor, channel=channel, action="command", detail=detail, outcome=outcome)
        )
        return None
