"""Slack redelivers requests it thinks timed out (``X-Slack-Retry-Num``); Bolt does not de-duplicate.

Events API deliveries carry an ``event_id``: the first replica to record it handles the event,
any redelivery is acknowledged and dropped. Commands and clicks are not recorded on their first
delivery — that would put a database write in front of every ack — because what they do is
idempotent on its own (an operation is keyed by the command's ``trigger_id``, a decision by
person and operation); only a delivery marked as a retry is recorded, so that several retries of
one request are handled once among themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from slack_bolt.async_app import AsyncApp
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.response import BoltResponse

from handlers.context import deps_of

log = logging.getLogger(__name__)


def delivery_key(body: dict[str, Any]) -> str | None:
    if body.get("event_id"):
        return f"event:{body['event_id']}"
    if body.get("trigger_id"):
        return f"trigger:{body['trigger_id']}"
    return None


async def skip_redeliveries(
    req: AsyncBoltRequest, resp: BoltResponse, next: Callable[[], Awaitable[BoltResponse]]
) -> BoltResponse:
    retry = (req.headers.get("x-slack-retry-num") or [""])[0]
    key = delivery_key(req.body)
    if key is None or not (retry or key.startswith("event:")):
        return await next()
    if not await deps_of(req.context).deliveries.claim(f"{key}:retry" if retry else key):
        log.info("dropping redelivered request", extra={"key": key, "retry": retry})
        return BoltResponse(status=200, body="")
    return await next()


def register(app: AsyncApp) -> None:
    app.middleware(skip_redeliveries)
