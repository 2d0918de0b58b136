"""The Slack outbox: messages the bot owes Slack, delivered in order per channel at Slack's rate.

Slack accepts about one message per second per channel. A poll cycle that had to wait for that
would take minutes with a thousand live operations, and hold its leases all the while; so cycles
(and handlers) only insert rows here, and ``SlackOutbox.deliver`` sends them:

- per channel, oldest first, one message per channel per second across every replica
  (``slack_channel_pace`` is claimed with a conditional UPDATE);
- each row is leased while it is sent; a row whose sender died is picked up again, and before it
  is sent again Slack is asked whether a message carrying that row's metadata already exists;
- status cards are rendered when they are sent, so a card that waited shows its newest state.
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

from slack_sdk.errors import SlackApiError
from sqlalchemy import and_, func, not_, or_, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from bot.core.operations import OpFile
from bot.slack.web import SlackPoster
from bot.store.db import Database
from bot.store.models import ChannelPace, Operation, OutboxMessage

log = logging.getLogger(__name__)

Blocks = list[dict[str, Any]]
CardRenderer = Callable[[Operation], Awaitable[tuple[str, Blocks]]]
POST_INTERVAL = timedelta(seconds=1)
SEND_LEASE = timedelta(seconds=60)
MAX_ATTEMPTS = 6


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
    def __init__(self, *, db: Database, poster: SlackPoster, render_card: CardRenderer, owner: str) -> None:
        self._db = db
        self._poster = poster
        self._render_card = render_card
        self._owner = owner
        self._lock = asyncio.Lock()
        self.wake: Callable[[], None] = lambda: None  # set by the scheduler owner

    # -- enqueueing ---------------------------------------------------------------------------
    async def enqueue(self, *rows: OutboxMessage) -> None:
        """Insert rows in order in one statement, skipping any whose dedupe key is already there.

        One statement with many parameter sets (executemany), not a multi-row VALUES clause:
        SQLAlchemy builds the latter value by value in Python, which made queueing the replies of
        500 operations take most of a poll cycle.
        """
        if not rows:
            return
        table = OutboxMessage.__table__  # type: ignore[attr-defined]
        dialect = self._db.engine.dialect.name
        insert = postgresql_insert(table) if dialect == "postgresql" else sqlite_insert(table)
        statement = insert.on_conflict_do_nothing(index_elements=["dedupe_key"])
        now = datetime.now(UTC)
        names = [column.name for column in table.columns if column.name != "id"]
        values = [{name: getattr(row, name) for name in names} | {"created_at": row.created_at or now} for row in rows]
        async with self._db.session() as session:
            connection = await session.connection()
            await connection.execute(statement, values)
            await session.commit()
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
        queued: set[str] = set()
        names = list(keys)
        key = col(OutboxMessage.dedupe_key)
        async with self._db.session() as session:
            for start in range(0, len(names), 500):  # stay well under SQLite's bound-parameter limit
                query = select(OutboxMessage.dedupe_key).where(key.in_(names[start : start + 500]))
                queued.update((await session.exec(query)).all())
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
            pace = col(ChannelPace.next_post_at)
            ready = (
                select(OutboxMessage.channel)
                .outerjoin(ChannelPace, col(ChannelPace.channel) == col(OutboxMessage.channel))
                .where(self._deliverable(now), or_(pace.is_(None), pace <= now))
                .distinct()
                .limit(200)
            )
            async with self._db.session() as session:
                channels = (await session.exec(ready)).all()
            results = await asyncio.gather(*(self._deliver_one(channel, now) for channel in channels))
            return sum(results)

    async def drain(self) -> None:
        """Deliver until nothing is left that may be sent (the caller bounds the time)."""
        while True:
            sent = await self.deliver()
            now = datetime.now(UTC)
            async with self._db.session() as session:
                left = (await session.exec(select(OutboxMessage.id).where(self._deliverable(now)).limit(1))).first()
            if left is None:
                return
            if not sent:
                await asyncio.sleep(0.2)  # another delivery is running, or a channel's next slot is ahead

    @staticmethod
    def _deliverable(now: datetime) -> Any:
        """Rows that may be claimed now. A reply waits until its operation's card is in Slack, and
        while it waits it is not claimable at all: claiming it only to put it back would spend the
        channel's posting slot on it every second, holding up everything behind it."""
        card_posted = (
            select(Operation.id)
            .where(col(Operation.id) == col(OutboxMessage.operation_id), col(Operation.card_ts).is_not(None))
            .correlate_except(Operation)
            .exists()
        )
        return and_(
            or_(
                col(OutboxMessage.state) == "pending",
                and_(col(OutboxMessage.state) == "sending", col(OutboxMessage.lease_expires_at) < now),
            ),
            or_(not_(col(OutboxMessage.in_card_thread)), card_posted),
        )

    async def _take_slot(self, channel: str, now: datetime) -> bool:
        async with self._db.session() as session:
            if await session.get(ChannelPace, channel) is None:
                session.add(ChannelPace(channel=channel, next_post_at=now - POST_INTERVAL))
                try:
                    await session.commit()
                except IntegrityError:
                    await session.rollback()
            result = await session.exec(
                update(ChannelPace)
                .where(col(ChannelPace.channel) == channel, col(ChannelPace.next_post_at) <= now)
                .values(next_post_at=now + POST_INTERVAL)
            )
            await session.commit()
            return bool(result.rowcount)  # type: ignore[attr-defined]

    async def _delay_channel(self, channel: str, seconds: float) -> None:
        async with self._db.session() as session:
            await session.exec(
                update(ChannelPace)
                .where(col(ChannelPace.channel) == channel)
                .values(next_post_at=datetime.now(UTC) + timedelta(seconds=seconds))
            )
            await session.commit()

    async def _claim(self, channel: str, now: datetime) -> OutboxMessage | None:
        token = f"{self._owner}:{uuid.uuid4().hex[:10]}"
        oldest = (
            select(OutboxMessage.id)
            .where(col(OutboxMessage.channel) == channel, self._deliverable(now))
            .order_by(col(OutboxMessage.id))
            .limit(1)
        )
        async with self._db.session() as session:
            await session.exec(
                update(OutboxMessage)
                .where(col(OutboxMessage.id).in_(oldest.scalar_subquery()), self._deliverable(now))
                .values(
                    state="sending",
                    lease_owner=token,
                    lease_expires_at=now + SEND_LEASE,
                    attempts=OutboxMessage.attempts + 1,
                )
                .execution_options(synchronize_session=False)
            )
            await session.commit()
            return (await session.exec(select(OutboxMessage).where(OutboxMessage.lease_owner == token))).first()

    async def _finish(self, row: OutboxMessage, **values: Any) -> None:
        async with self._db.session() as session:
            await session.exec(
                update(OutboxMessage)
                .where(col(OutboxMessage.id) == row.id, col(OutboxMessage.lease_owner) == row.lease_owner)
                .values(lease_owner=None, lease_expires_at=None, **values)
            )
            await session.commit()

    async def _deliver_one(self, channel: str, now: datetime) -> int:
        if not await self._take_slot(channel, now):
            return 0
        row = await self._claim(channel, now)
        if row is None:
            return 0
        try:
            operation = await self._operation(row.operation_id)
            thread_ts = row.thread_ts
            if row.in_card_thread:
                thread_ts = operation.card_ts if operation else None
                if thread_ts is None:  # the operation is gone; nothing to reply to
                    await self._finish(row, state="failed", last_error="card not posted")
                    return 0
            if row.attempts > 1 and row.kind != "file":
                found = await self._already_sent(row, thread_ts)
                if found:
                    if row.kind == "card" and operation is not None:
                        await self._adopt_card(operation, ts=found)
                    await self._finish(row, state="sent", sent_ts=found)
                    return 0
            ts = await self._send(row, operation, thread_ts)
            await self._finish(row, state="sent", sent_ts=ts, file_content=None)
            return 1
        except SlackApiError as exc:
            error = str(exc.response.get("error") or "error")
            retry_after = float(exc.response.headers.get("Retry-After", 0) or 0) if exc.response.headers else 0.0
            if error == "ratelimited":
                await self._delay_channel(channel, max(retry_after, 1.0))
                await self._finish(row, state="pending", attempts=row.attempts - 1)
            else:
                log.warning("slack refused outbox row %s (%s): %s", row.id, row.kind, error)
                await self._retry_or_give_up(row, error=error)
            return 0
        except Exception:
            log.exception("sending outbox row %s failed", row.id)
            await self._retry_or_give_up(row, error="bot error")
            return 0

    async def _retry_or_give_up(self, row: OutboxMessage, *, error: str) -> None:
        """Back to pending, or failed after MAX_ATTEMPTS; the replies that would have gone in the
        thread of a card that failed for good have nowhere to go, so they fail with it rather
        than wait for ever."""
        if row.attempts < MAX_ATTEMPTS:
            await self._finish(row, state="pending", last_error=error[:200])
            return
        log.warning("giving up on outbox row %s after %d attempts", row.id, row.attempts)
        await self._finish(row, state="failed", last_error=error[:200])
        if row.kind != "card":
            return
        async with self._db.session() as session:
            await session.exec(
                update(OutboxMessage)
                .where(
                    col(OutboxMessage.operation_id) == row.operation_id,
                    col(OutboxMessage.in_card_thread),
                    col(OutboxMessage.state) == "pending",
                )
                .values(state="failed", last_error=f"the card could not be posted: {error}"[:200])
            )
            await session.commit()

    async def _operation(self, operation_id: int | None) -> Operation | None:
        if operation_id is None:
            return None
        async with self._db.session() as session:
            return await session.get(Operation, operation_id)

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
            return None

    async def _record_card(self, operation: Operation, *, ts: str | None, digest: str | None) -> None:
        values: dict[str, Any] = {"card_ts": ts, "card_digest": digest}
        if digest is None:
            # Not brought up to date now: have the poller look at it once more (a finished
            # operation is no longer polled; one that still is keeps its time).
            values["next_poll_at"] = func.coalesce(col(Operation.next_poll_at), datetime.now(UTC))
        async with self._db.session() as session:
            await session.exec(update(Operation).where(col(Operation.id) == operation.id).values(**values))
            await session.commit()

    async def _adopt_card(self, operation: Operation, *, ts: str) -> None:
        """Its sender died after posting the card and before recording where. Record it, or the
        replies would wait for it forever, and bring it up to date: it shows the state of then."""
        await self._record_card(operation, ts=ts, digest=None)  # first: whatever happens next
        try:
            text, blocks = await self._render_card(await self._operation(operation.id) or operation)
            if await self._poster.try_update(channel=operation.channel, ts=ts, text=text, blocks=blocks):
                await self._record_card(operation, ts=ts, digest=card_digest(text, blocks))
        except SlackApiError as exc:  # the poller edits it later (no digest recorded)
            log.warning("could not refresh adopted card of operation %s: %s", operation.id, exc.response.get("error"))

    async def _send(self, row: OutboxMessage, operation: Operation | None, thread_ts: str | None) -> str | None:
        if row.kind == "card":
            if operation is None:
                return None
            text, blocks = await self._render_card(operation)
            ts = await self._poster.post(
                channel=row.channel, text=text, blocks=blocks, metadata=self._metadata(row), paced=False
            )
            await self._record_card(operation, ts=ts, digest=card_digest(text, blocks))
            return ts
        if row.kind == "file":
            await self._poster.upload(
                channel=row.channel,
                thread_ts=thread_ts,
                paced=False,
                file=OpFile(name=row.file_name or "file", title=row.file_title or "", content=row.file_content or b""),
            )
            return None
        return await self._poster.post(
            channel=row.channel,
            thread_ts=thread_ts,
            text=row.text,
            blocks=row.blocks,
            metadata=self._metadata(row),
            paced=False,
        )
