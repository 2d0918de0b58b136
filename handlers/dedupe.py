"""Slack redelivers requests it thinks timed out (``X-Slack-Retry-Num``); Bolt does not de-duplicate.

Every command and click carries a ``trigger_id`` unique to that delivery; the first replica to
record it handles the request, any redelivery is acknowledged and dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from slack_bolt.async_app import AsyncApp
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.response import BoltResponse

from bot.store import repo
from handlers.context import HandlerDeps

log = logging.getLogger(__name__)


def delivery_key(body: dict[str, Any]) -> str | None:
    if body.get("event_id"):
        return f"event:{body['event_id']}"
    if body.get("trigger_id"):
        return f"trigger:{body['trigger_id']}"
    return None


def register(app: AsyncApp, deps: HandlerDeps) -> None:
    async def skip_redeliveries(
        req: AsyncBoltRequest, resp: BoltResponse, next: Callable[[], Awaitable[BoltResponse]]
    ) -> BoltResponse:
        key = delivery_key(req.body)
        if key is None:
            return await next()
        if not await repo.claim_delivery(deps.db, key=key):
            retry = (req.headers.get("x-slack-retry-num") or [""])[0]
            log.info("dropping redelivered request", extra={"key": key, "retry": retry})
            return BoltResponse(status=200, body="")
        return await next()

    app.middleware(skip_redeliveries)
