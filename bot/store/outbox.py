"""The Slack outbox's rows and each channel's posting slot (bot/slack/outbox.py sends them).

A row is ``pending`` until a sender leases it (``sending``), then ``sent`` or ``failed``. A row
Slack refused for now carries ``next_attempt_at``; its channel waits as long, so the channel's
messages keep their order.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, not_, or_, true, update
from sqlmodel import col, select

from bot.store.db import Store, insert_ignoring_duplicates, unit_of_work
from bot.store.models import ChannelPace, Operation, OutboxMessage
from bot.store.operations import row_values

SQLITE_PARAMETERS = 500  # keys per IN (…): well under SQLite's bound-parameter limit


async def enqueue(db: Store, *, rows: Sequence[OutboxMessage]) -> None:
    """Insert rows in order, skipping any whose dedupe key is already there."""
    now = datetime.now(UTC)
    values = [row_values(row) | {"created_at": row.created_at or now} for row in rows]
    async with unit_of_work(db) as session:
        table = OutboxMessage.__table__  # type: ignore[attr-defined]
        await insert_ignoring_duplicates(session, table=table, rows=values, unique=["dedupe_key"])


async def queued_keys(db: Store, *, keys: Sequence[str]) -> set[str]:
    """Which of these dedupe keys have a row already."""
    queued: set[str] = set()
    key = col(OutboxMessage.dedupe_key)
    async with unit_of_work(db) as session:
        for start in range(0, len(keys), SQLITE_PARAMETERS):
            query = select(OutboxMessage.dedupe_key).where(key.in_(list(keys[start : start + SQLITE_PARAMETERS])))
            queued.update((await session.exec(query)).all())
    return queued


def deliverable(now: datetime, *, or_later: bool = False) -> Any:
    """Rows that may be claimed now (``or_later``: or once their back-off is over). A reply waits
    until its operation's card is in Slack, and while it waits it is not claimable at all:
    claiming it only to put it back would spend the channel's posting slot on it every second,
    holding up everything behind it."""
    card_posted = (
        select(Operation.id)
        .where(col(Operation.id) == col(OutboxMessage.operation_id), col(Operation.card_ts).is_not(None))
        .correlate_except(Operation)
        .exists()
    )
    due = or_(col(OutboxMessage.next_attempt_at).is_(None), col(OutboxMessage.next_attempt_at) <= now)
    return and_(
        or_(
            and_(col(OutboxMessage.state) == "pending", true() if or_later else due),
            and_(col(OutboxMessage.state) == "sending", col(OutboxMessage.lease_expires_at) < now),
        ),
        or_(not_(col(OutboxMessage.in_card_thread)), card_posted),
    )


async def ready_channels(db: Store, *, now: datetime, limit: int = 200) -> Sequence[str]:
    """Channels with a deliverable row whose next posting slot has come."""
    pace = col(ChannelPace.next_post_at)
    query = (
        select(OutboxMessage.channel)
        .outerjoin(ChannelPace, col(ChannelPace.channel) == col(OutboxMessage.channel))
        .where(deliverable(now), or_(pace.is_(None), pace <= now))
        .distinct()
        .limit(limit)
    )
    async with unit_of_work(db) as session:
        return (await session.exec(query)).all()


async def anything_deliverable(db: Store, *, now: datetime) -> bool:
    """Whether a row may be sent now or once Slack's back-off is over (a drain waits for it)."""
    query = select(OutboxMessage.id).where(deliverable(now, or_later=True)).limit(1)
    async with unit_of_work(db) as session:
        return (await session.exec(query)).first() is not None


async def claim_next(
    db: Store, *, channel: str, now: datetime, token: str, lease: timedelta, interval: timedelta
) -> OutboxMessage | None:
    """Take the channel's posting slot and lease its oldest deliverable row, in one transaction.

    The slot is a conditional UPDATE of the channel's pace row, so across replicas one message
    per channel goes out per ``interval``; None when another replica has the slot, or nothing is
    left to send.
    """
    async with unit_of_work(db) as session:
        pace = ChannelPace(channel=channel, next_post_at=now - interval)
        table = ChannelPace.__table__  # type: ignore[attr-defined]
        await insert_ignoring_duplicates(session, table=table, rows=[row_values(pace)], unique=["channel"])
        slot = await session.exec(
            update(ChannelPace)
            .where(col(ChannelPace.channel) == channel, col(ChannelPace.next_post_at) <= now)
            .values(next_post_at=now + interval)
        )
        if not slot.rowcount:
            return None
        oldest = (
            select(OutboxMessage.id)
            .where(col(OutboxMessage.channel) == channel, deliverable(now))
            .order_by(col(OutboxMessage.id))
            .limit(1)
        )
        await session.exec(
            update(OutboxMessage)
            .where(col(OutboxMessage.id).in_(oldest.scalar_subquery()), deliverable(now))
            .values(
                state="sending",
                lease_owner=token,
                lease_expires_at=now + lease,
                next_attempt_at=None,
                attempts=OutboxMessage.attempts + 1,
            )
            .execution_options(synchronize_session=False)
        )
        return (await session.exec(select(OutboxMessage).where(OutboxMessage.lease_owner == token))).first()


async def finish(db: Store, *, row: OutboxMessage, values: dict[str, Any]) -> None:
    """Hand a leased row back with its outcome; a no-op when the lease was lost meanwhile."""
    async with unit_of_work(db) as session:
        await session.exec(
            update(OutboxMessage)
            .where(col(OutboxMessage.id) == row.id, col(OutboxMessage.lease_owner) == row.lease_owner)
            .values(lease_owner=None, lease_expires_at=None, **values)
        )


async def hold_channel(db: Store, *, channel: str, until: datetime) -> None:
    """No message goes to the channel before ``until`` (Slack said to wait, or is failing)."""
    async with unit_of_work(db) as session:
        await session.exec(
            update(ChannelPace)
            .where(col(ChannelPace.channel) == channel, col(ChannelPace.next_post_at) < until)
            .values(next_post_at=until)
        )


async def fail_waiting_replies(db: Store, *, operation_id: int | None, error: str) -> None:
    """The replies waiting for a card that failed for good have nowhere to go: they fail with it."""
    async with unit_of_work(db) as session:
        await session.exec(
            update(OutboxMessage)
            .where(
                col(OutboxMessage.operation_id) == operation_id,
                col(OutboxMessage.in_card_thread),
                col(OutboxMessage.state) == "pending",
            )
            .values(state="failed", last_error=error[:200])
        )


async def record_card(db: Store, *, operation_id: int | None, ts: str | None, digest: str | None) -> None:
    """Where the operation's card is in Slack, and the digest of what it shows there."""
    values: dict[str, Any] = {"card_ts": ts, "card_digest": digest}
    if digest is None:
        # Not brought up to date now: have the poller look at it once more (a finished
        # operation is no longer polled; one that still is keeps its time).
        values["next_poll_at"] = func.coalesce(col(Operation.next_poll_at), datetime.now(UTC))
    async with unit_of_work(db) as session:
        await session.exec(update(Operation).where(col(Operation.id) == operation_id).values(**values))
