"""The one place where errors become Slack messages (STYLE habit 3)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from slack_bolt.context.respond.async_respond import AsyncRespond

from bot.errors import ChatOpsError, UserError
from bot.slack.messages import error_text, unexpected_error_text
from bot.store import repo
from bot.store.db import Database

log = logging.getLogger(__name__)


async def reply_ephemeral(respond: AsyncRespond, text: str, blocks: list[dict[str, Any]] | None = None) -> None:
    await respond(text=text, blocks=blocks, response_type="ephemeral", replace_original=False)


async def guarded(
    work: Callable[[], Awaitable[None]],
    *,
    respond: AsyncRespond,
    db: Database,
    actor: str,
    channel: str,
    action: str,
    detail: str,
) -> None:
    """Run a listener's work after ack(); turn errors into an ephemeral reply and an audit row."""
    try:
        await work()
    except ChatOpsError as error:
        outcome = "refused" if isinstance(error, UserError) else "upstream-error"
        if not isinstance(error, UserError):
            log.warning("%s failed upstream: %s", action, error.message)
        await repo.audit(
            db, actor=actor, channel=channel, action=action, detail=detail, outcome=f"{outcome}: {error.message[:150]}"
        )
        await reply_ephemeral(respond, error_text(error))
    except Exception:
        log.exception("%s failed", action)
        await repo.audit(db, actor=actor, channel=channel, action=action, detail=detail, outcome="bot-error")
        await reply_ephemeral(respond, unexpected_error_text())
