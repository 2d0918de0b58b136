"""The Slack Web API as the bot uses it: AsyncWebClients with their retry handlers, paced posting.

Each send has one retry owner. The outbox's client (``make_outbox_client``) retries a dropped
connection once and nothing else: the outbox itself answers a 429 (``Retry-After``) and a 5xx,
with the row's next-attempt time, and keeps every send inside its lease. The client of the
listeners and interactive replies (``make_web_client``), which have no queue to wait in, lets
slack_sdk retry 429s (honouring ``Retry-After``) and 5xx inside the call.

Everything the bot sends — text, blocks and files — passes the bot's one redaction routine on
its way out, whichever path its content took (an upstream error, a result, something typed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.web.async_slack_response import AsyncSlackResponse

from bot.core.operations import OpFile
from bot.redaction import redact, redact_text

log = logging.getLogger(__name__)

COMPLETION_EVENT = "chatops_operation_finished"
SLACK_TIMEOUT_SECONDS = 30
POST_SPACING_SECONDS = 1.0  # chat.postMessage: about one message per second per channel
UPDATES_PER_MINUTE = 50  # chat.update is Tier 3: "50+ per minute" per workspace
UPDATE_BURST = 20


async def own_workspace(client: AsyncWebClient) -> str:
    """The team id of the workspace the bot token belongs to (``auth.test``): the one workspace
    whose requests the bot serves. A bot that cannot learn it does not start (ValueError)."""
    try:
        answer = await client.auth_test()
    except SlackApiError as error:
        raise ValueError(f"SLACK_BOT_TOKEN: Slack's auth.test refused it ({error.response.get('error')})") from None
    except (aiohttp.ClientError, TimeoutError) as error:
        raise ValueError(f"Slack's auth.test could not be reached ({type(error).__name__})") from None
    team_id = answer.get("team_id")
    if not isinstance(team_id, str) or not team_id:
        raise ValueError("Slack's auth.test named no team_id for SLACK_BOT_TOKEN")
    return team_id


class TokenBucket:
    """``capacity`` at once, refilled at ``per_minute``; ``take`` never waits."""

    def __init__(self, *, per_minute: float, capacity: float) -> None:
        self._rate = per_minute / 60.0
        self._capacity = capacity
        self._tokens = capacity
        self._stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def make_web_client(*, token: str, base_url: str, session: aiohttp.ClientSession | None = None) -> AsyncWebClient:
    """The listeners' Web API client. Pass the ``session`` to reuse connections: without one,
    slack_sdk opens a new session (and TCP connection) for every call."""
    return AsyncWebClient(
        token=token,
        base_url=base_url,
        session=session,
        timeout=SLACK_TIMEOUT_SECONDS,
        retry_handlers=[
            AsyncConnectionErrorRetryHandler(max_retry_count=3),
            AsyncRateLimitErrorRetryHandler(max_retry_count=5),
            AsyncServerErrorRetryHandler(max_retry_count=3),
        ],
    )


def make_outbox_client(*, token: str, base_url: str, session: aiohttp.ClientSession | None = None) -> AsyncWebClient:
    """The client of the outbox and the poller's card edits: a 429, a 5xx or a dropped connection
    comes straight back to them. Five 429s absorbed inside one call would let a send outlive its
    lease, and a post resent after a dropped connection may already be in Slack: the outbox looks
    for it (by its metadata) before sending it again."""
    return AsyncWebClient(
        token=token,
        base_url=base_url,
        session=session,
        timeout=SLACK_TIMEOUT_SECONDS,
        retry_handlers=[],
    )


def redacted_blocks(blocks: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    return None if blocks is None else redact(blocks)


def redacted_content(content: bytes) -> bytes:
    try:
        text = content.decode()
    except UnicodeDecodeError:  # not text: nothing a pattern could match
        return content
    return redact_text(text).encode()


class SlackPoster:
    """Posts and edits the bot's messages, never faster than Slack's per-channel rate."""

    def __init__(self, client: AsyncWebClient, *, updates_per_minute: float = UPDATES_PER_MINUTE) -> None:
        self.client = client
        self._last_post: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._updates = TokenBucket(per_minute=updates_per_minute, capacity=UPDATE_BURST)

    async def _pace(self, channel: str) -> None:
        lock = self._locks.setdefault(channel, asyncio.Lock())
        async with lock:
            wait = self._last_post.get(channel, 0.0) + POST_SPACING_SECONDS - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._last_post[channel] = time.monotonic()

    async def post(
        self,
        *,
        channel: str,
        text: str,
        blocks: list[dict[str, Any]] | None = None,
        thread_ts: str | None = None,
        metadata: dict[str, Any] | None = None,
        paced: bool = True,
    ) -> str:
        """``paced=False`` when the caller (the outbox) already enforces the per-channel rate."""
        if paced:
            await self._pace(channel)
        kwargs: dict[str, Any] = {
            "channel": channel,
            "text": redact_text(text),
            "unfurl_links": False,
            "unfurl_media": False,
        }
        if blocks is not None:
            kwargs["blocks"] = redacted_blocks(blocks)
        if thread_ts:
            kwargs["thread_ts"] = thread_ts
        if metadata:
            kwargs["metadata"] = metadata
        response = await self.client.chat_postMessage(**kwargs)
        return str(response["ts"])

    async def try_update(self, *, channel: str, ts: str, text: str, blocks: list[dict[str, Any]]) -> bool:
        """Edit a message unless this minute's chat.update budget is spent (then the caller retries later).

        With hundreds of live cards, editing every changed card every cycle would only earn 429s;
        cards skipped now are edited on a later cycle, oldest first, with their newest content.
        """
        if not self._updates.take():
            return False
        # Always send blocks with text: chat.update with text alone removes the blocks.
        await self.client.chat_update(channel=channel, ts=ts, text=redact_text(text), blocks=redacted_blocks(blocks))
        return True

    async def ephemeral(
        self, *, channel: str, user: str, text: str, blocks: list[dict[str, Any]] | None = None
    ) -> None:
        try:
            await self.client.chat_postEphemeral(
                channel=channel, user=user, text=redact_text(text), blocks=redacted_blocks(blocks)
            )
        except SlackApiError as exc:
            log.warning("ephemeral message not delivered: %s", exc.response.get("error"))

    async def upload(
        self, *, channel: str, thread_ts: str | None, file: OpFile, comment: str | None = None, paced: bool = True
    ) -> None:
        if paced:
            await self._pace(channel)
        await self.client.files_upload_v2(
            channel=channel,
            thread_ts=thread_ts,
            filename=file.name,
            title=redact_text(file.title),
            content=redacted_content(file.content),
            initial_comment=redact_text(comment) if comment else comment,
        )

    async def find_in_thread(self, *, channel: str, thread_ts: str, event_type: str, key: str) -> str | None:
        """The ts of a message with this metadata in the thread, if one was already posted (a crash
        between posting and recording it)."""
        pages = await self.client.conversations_replies(
            channel=channel, ts=thread_ts, include_all_metadata=True, limit=200
        )
        return await _find_by_metadata(pages, event_type=event_type, key=key)

    async def find_in_channel(self, *, channel: str, oldest: datetime, event_type: str, key: str) -> str | None:
        """The ts of a top-level message with this metadata posted since ``oldest``, if any."""
        pages = await self.client.conversations_history(
            channel=channel, oldest=f"{oldest.timestamp() - 5:.6f}", include_all_metadata=True, limit=200
        )
        return await _find_by_metadata(pages, event_type=event_type, key=key)


async def _find_by_metadata(pages: AsyncSlackResponse, *, event_type: str, key: str) -> str | None:
    """The ts of the first message carrying this metadata, reading page after page (slack_sdk
    follows ``next_cursor``) and stopping at the first match."""
    async for page in pages:
        messages: list[dict[str, Any]] = page.get("messages") or []
        for message in messages:
            metadata = message.get("metadata") or {}
            if metadata.get("event_type") == event_type and (metadata.get("event_payload") or {}).get("key") == key:
                return str(message["ts"])
    return None


class SlackDirectory:
    """User groups and time zones, cached briefly; user groups need a paid plan."""

    def __init__(self, client: AsyncWebClient, *, ttl_seconds: float = 300.0) -> None:
        self._client = client
        self._ttl = ttl_seconds
        self._groups: dict[str, tuple[float, set[str] | None]] = {}
        self._zones: dict[str, tuple[float, str]] = {}

    async def usergroup_members(self, group_id: str) -> set[str] | None:
        cached = self._groups.get(group_id)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        try:
            response = await self._client.usergroups_users_list(usergroup=group_id)
            members: set[str] | None = set(response.get("users") or [])
        except SlackApiError as exc:
            # plan_upgrade_required on free workspaces: approver lists by user id still work.
            log.warning("cannot read user group %s: %s", group_id, exc.response.get("error"))
            members = None
        self._groups[group_id] = (time.monotonic() + self._ttl, members)
        return members

    async def time_zone(self, user_id: str) -> str:
        cached = self._zones.get(user_id)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        try:
            response = await self._client.users_info(user=user_id)
            zone = str((response.get("user") or {}).get("tz") or "UTC")
        except SlackApiError as exc:
            log.warning("users.info failed for %s: %s", user_id, exc.response.get("error"))
            zone = "UTC"
        self._zones[user_id] = (time.monotonic() + self._ttl, zone)
        return zone
