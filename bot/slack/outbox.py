"""The Slack outbox: messages the bot owes Slack, delivered in order per channel at Slack's rate.

Slack accepts about one message per second per channel. A poll cycle that had to wait for that
would take minutes with a thousand live operations, and hold its leases all the while; so cycles
(and handlers) only insert rows here, and ``SlackOutbox.deliver`` sends them:

- per channel, oldest first, one message per channel per second across every replica
  (``slack_channel_pace`` is claimed with a conditional UPDATE);
- each row is leased while it is sent; a row whose sender died is picked up again, and before it
  is sent again Slack is asked whether a message carrying that row's metadata already exists;
- status cards are rendered when they are sent, so a card that waited shows its newest state;
- the outbox is the one retry owner of what it sends: its Slack client does not retry 429s or
  5xx inside a call (bot/slack/web.py), so the first ``ratelimited`` holds the channel for
  ``Retry-After`` and a failing row waits longer after each attempt, and a send is cut off
  (``SEND_DEADLINE``) before its lease runs out and another replica could take the row.

The SQL lives in bot/store/outbox.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError

from bot.core.operations import OpFile
from bot.core.when import aware
from bot.slack.web import SlackPoster
from bot.store import outbox as store
from bot.store import repo
from bot.store.db import Database
from bot.store.models import Operation, OutboxMessage

log = logging.getLogger(__name__)

Blocks = list[dict[str, Any]]
CardRenderer = Callable[[Operation], Awaitable[tuple[str, Blocks]]]
POST_INTERVAL = timedelta(seconds=1)
SEND_LEASE = timedelta(seconds=60)
SEND_DEADLINE = timedelta(seconds=45)  # every Slack call of one send, well inside SEND_LEASE
MAX_ATTEMPTS = 6  # refusals that trying again cannot fix (channel_not_found, invalid_blocks …)
BACKOFF_MAX = timedelta(seconds=60)
# Slack being down (5xx, timeouts, dropped connections) is not the message's fault: such a row is
# tried again, at most once a minute, until it is this old; a release manager would rather get a
# late card than none.
OUTAGE_PATIENCE = timedelta(hours=24)
SLACK_OUTAGE_ERRORS = frozenset({"internal_error", "fatal_error", "service_unavailable", "request_timeout"})


def backoff(attempts: int) -> timedelta:
    """How long a row Slack refused waits after its ``attempts``-th try: 1 s, 2 s, 4 s … 60 s."""
    return min(timedelta(seconds=2 ** max(attempts - 1, 0)), BACKOFF_MAX)


def card_digest(text: str, blocks: Blocks) -> str:
    return hashlib.sha256(json.dumps([text, blocks], sort_keys=True).encode()).hexdigest()[:32]


def reply_row(
    *,
    operation: Operation,
    text: str,
    key: str | None = None,
    event_type: str = "chatops_message",
    blocks: Blocks | None = None,
) -> OutboxMessage:
    """A reply in the thread of the operation's card."""
    return OutboxMessage(
        dedupe_key=key or f"reply:{operation.id}:{uuid.uuid4().hex}",
        operation_id=operation.id,
        kind="reply",
        channel=operation.channel,
        in_card_thread=True,
        text=text,
        blocks=blocks,
        event_type=event_type,
    )


def message_row(
    *, channel: str, text: str, key: str, operation_id: int | None = None, event_type: str = "chatops_message"
) -> OutboxMessage:
    return OutboxMessage(
        dedupe_key=key, operation_id=operation_id, kind="message", channel=channel, text=text, event_type=event_type
    )


def file_row(*, operation: Operation, file: OpFile, key: str) -> OutboxMessage:
    return OutboxMessage(
        dedupe_key=key,
        operation_id=operation.id,
        kind="file",
        channel=operation.channel,
        in_card_thread=True,
        text=file.title,
        file_name=file.name,
        file_title=file.title,
        file_content=file.content,
    )


def card_row(operation: Operation) -> OutboxMessage:
    return OutboxMessage(
        dedupe_key=f"card:{operation.id}",
        operation_id=operation.id,
        kind="card",
        channel=operation.channel,
        event_type="chatops_card",
    )


class SlackOutbox:
    """Sends the rows the poller and the handlers queued; built once per process (bot/runtime.py)."""

    def __init__(self, *, db: Database, poster: SlackPoster, render_card: CardRenderer, owner: str) -> None:
        self._db = db
        self._poster = poster
        self._render_card = render_card
        self._owner = owner
        self._lock = asyncio.Lock()
        self.wake: Callable[[], None] = lambda: None  # set by the scheduler owner

    # -- enqueueing ---------------------------------------------------------------------------
    async def enqueue(self, *rows: OutboxMessage) -> None:
        """Insert rows in order in one statement, skipping any whose dedupe key is already there."""
        if not rows:
            return
        await store.enqueue(self._db, rows=rows)
        self.wake()

    async def enqueue_cards(self, operations: Sequence[Operation]) -> None:
        """Queue the status card of each operation that has none queued yet.

        The poller calls this every cycle for every operation whose card is not in Slack yet (a
        thousand, after a burst of new operations): one lookup of the keys already queued is far
        cheaper than building a row object for each and letting the insert skip it.
        """
        keys = {f"card:{op.id}": op for op in operations}
        if not keys:
            return
        queued = await store.queued_keys(self._db, keys=list(keys))
        await self.enqueue(*(card_row(op) for name, op in keys.items() if name not in queued))

    # -- delivering -----------------------------------------------------------------------------
    async def deliver(self) -> int:
        """Send what may be sent now: at most one message per channel. Returns how many were sent."""
        if self._lock.locked():
            return 0
        async with self._lock:
            now = datetime.now(UTC)
            # Only channels whose next slot has come: this runs four times a second, and asking
            # for the slot of every channel with a backlog would mostly be refused.
            channels = await store.ready_channels(self._db, now=now)
            results = await asyncio.gather(*(self._deliver_one(channel, now) for channel in channels))
            return sum(results)

    async def drain(self) -> None:
        """Deliver until nothing is left that may be sent (the caller bounds the time)."""
        while True:
            sent = await self.deliver()
            if not await store.anything_deliverable(self._db, now=datetime.now(UTC)):
                return
            if not sent:
                await asyncio.sleep(0.2)  # another delivery is running, or a channel's next slot is ahead

    async def _deliver_one(self, channel: str, now: datetime) -> int:
        token = f"{self._owner}:{uuid.uuid4().hex[:10]}"
        row = await store.claim_next(
            self._db, channel=channel, now=now, token=token, lease=SEND_LEASE, interval=POST_INTERVAL
        )
        if row is None:
            return 0
        try:
            async with asyncio.timeout(SEND_DEADLINE.total_seconds()):
                return await self._send_row(row)
        except SlackApiError as exc:
            error = str(exc.response.get("error") or f"HTTP {exc.response.status_code}")
            if error == "ratelimited":
                headers = exc.response.headers or {}
                wait = timedelta(seconds=max(float(headers.get("Retry-After", 0) or 0), 1.0))
                await self._later(row, wait=wait, error=None)
            else:
                log.warning("slack refused outbox row %s (%s): %s", row.id, row.kind, error)
                outage = exc.response.status_code >= 500 or error in SLACK_OUTAGE_ERRORS
                await self._retry_or_give_up(row, error=error, outage=outage)
            return 0
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.warning("sending outbox row %s failed (%s); it is tried again", row.id, type(exc).__name__)
            error = "timed out" if isinstance(exc, TimeoutError) else f"Slack unreachable: {type(exc).__name__}"
            await self._retry_or_give_up(row, error=error, outage=True)
            return 0
        except Exception:
            log.exception("sending outbox row %s failed", row.id)
            await self._retry_or_give_up(row, error="bot error")
            return 0

    async def _send_row(self, row: OutboxMessage) -> int:
        operation = await self._operation(row.operation_id)
        thread_ts = row.thread_ts
        if row.in_card_thread:
            thread_ts = operation.card_ts if operation else None
            if thread_ts is None:  # the operation is gone; nothing to reply to
                await store.finish(self._db, row=row, values={"state": "failed", "last_error": "card not posted"})
                return 0
        if row.attempts > 1 and row.kind != "file":
            try:
                found = await self._already_sent(row, thread_ts)
            except SlackApiError as exc:
                # Sending without knowing whether an earlier try got through could post it twice.
                error = f"could not check whether it was sent: {exc.response.get('error')}"
                await self._retry_or_give_up(row, error=error, outage=True)
                return 0
            if found:
                if row.kind == "card" and operation is not None:
                    await self._adopt_card(operation, row=row, ts=found)
                else:
                    await store.finish(self._db, row=row, values={"state": "sent", "sent_ts": found})
                return 0
        await self._send(row, operation, thread_ts)
        return 1

    async def _later(self, row: OutboxMessage, *, wait: timedelta, error: str | None) -> None:
        """Back to pending, not before ``wait``; its channel waits as long, so its order holds.
        A 429 (``error`` None) is Slack's pacing, not a failed attempt: it is not counted."""
        until = datetime.now(UTC) + wait
        values: dict[str, Any] = {"state": "pending", "next_attempt_at": until}
        if error is None:
            values["attempts"] = row.attempts - 1
        else:
            values["last_error"] = error[:200]
        async with self._db.transaction() as session:
            await store.hold_channel(session, channel=row.channel, until=until)
            await store.finish(session, row=row, values=values)

    async def _retry_or_give_up(self, row: OutboxMessage, *, error: str, outage: bool = False) -> None:
        """Back to pending after a back-off, or failed: after MAX_ATTEMPTS refusals, or (``outage``:
        Slack down or unreachable) once the row is OUTAGE_PATIENCE old. The replies that would
        have gone in the thread of a card that failed for good have nowhere to go, so they fail
        with it rather than wait for ever."""
        patient = outage and datetime.now(UTC) - aware(row.created_at) < OUTAGE_PATIENCE
        if patient or row.attempts < MAX_ATTEMPTS:
            await self._later(row, wait=backoff(row.attempts), error=error)
            return
        log.warning("giving up on outbox row %s after %d attempts", row.id, row.attempts)
        async with self._db.transaction() as session:
            await store.finish(session, row=row, values={"state": "failed", "last_error": error[:200]})
            if row.kind == "card":
                await store.fail_waiting_replies(
                    session, operation_id=row.operation_id, error=f"the card could not be posted: {error}"
                )

    async def _operation(self, operation_id: int | None) -> Operation | None:
        if operation_id is None:
            return None
        return await repo.get_operation(self._db, operation_id=operation_id)

    def _metadata(self, row: OutboxMessage) -> dict[str, Any]:
        return {"event_type": row.event_type, "event_payload": {"key": row.dedupe_key}}

    async def _already_sent(self, row: OutboxMessage, thread_ts: str | None) -> str | None:
        """After a crash mid-send: the ts of a message with this row's metadata already in Slack."""
        try:
            if thread_ts:
                return await self._poster.find_in_thread(
                    channel=row.channel, thread_ts=thread_ts, event_type=row.event_type, key=row.dedupe_key
                )
            return await self._poster.find_in_channel(
                channel=row.channel, oldest=row.created_at, event_type=row.event_type, key=row.dedupe_key
            )
        except SlackApiError as exc:
            log.warning("could not check whether outbox row %s was sent: %s", row.id, exc.response.get("error"))
            raise

    async def _sent(self, row: OutboxMessage, *, ts: str | None, card: tuple[str | None, str | None] | None) -> None:
        """Mark the row sent and, for a card, record where it is (``card``: ts, digest): together."""
        async with self._db.transaction() as session:
            if card is not None:
                await store.record_card(session, operation_id=row.operation_id, ts=card[0], digest=card[1])
            await store.finish(session, row=row, values={"state": "sent", "sent_ts": ts, "file_content": None})

    async def _adopt_card(self, operation: Operation, *, row: OutboxMessage, ts: str) -> None:
        """Its sender died after posting the card and before recording where. Record it, or the
        replies would wait for it forever, and bring it up to date: it shows the state of then."""
        await self._sent(row, ts=ts, card=(ts, None))  # first: whatever happens next
        try:
            text, blocks = await self._render_card(await self._operation(operation.id) or operation)
            if await self._poster.try_update(channel=operation.channel, ts=ts, text=text, blocks=blocks):
                await store.record_card(self._db, operation_id=operation.id, ts=ts, digest=card_digest(text, blocks))
        except SlackApiError as exc:  # the poller edits it later (no digest recorded)
            log.warning("could not refresh adopted card of operation %s: %s", operation.id, exc.response.get("error"))

    async def _send(self, row: OutboxMessage, operation: Operation | None, thread_ts: str | None) -> None:
        if row.kind == "card":
            if operation is None:
                await self._sent(row, ts=None, card=None)
                return
            text, blocks = await self._render_card(operation)
            ts = await self._poster.post(
                channel=row.channel, text=text, blocks=blocks, metadata=self._metadata(row), paced=False
            )
            await self._sent(row, ts=ts, card=(ts, card_digest(text, blocks)))
            return
        if row.kind == "file":
            await self._poster.upload(
                channel=row.channel,
                thread_ts=thread_ts,
                paced=False,
                file=OpFile(name=row.file_name or "file", title=row.file_title or "", content=row.file_content or b""),
            )
            await self._sent(row, ts=None, card=None)
            return
        ts = await self._poster.post(
            channel=row.channel,
            thread_ts=thread_ts,
            text=row.text,
            blocks=row.blocks,
            metadata=self._metadata(row),
            paced=False,
        )
        await self._sent(row, ts=ts, card=None)
