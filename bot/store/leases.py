"""Operation leases: which replica advances an operation now, and the poller's hand-back.

Leases make replicas safe: an operation is advanced by whichever replica's conditional UPDATE
claimed it, and every write the advance makes is conditioned on that lease.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, func, or_, update
from sqlmodel import col, select

from bot.store.db import Store, dialect_name, unit_of_work
from bot.store.models import Operation, utcnow


async def claim_due(db: Store, *, owner: str, now: datetime, lease: timedelta, limit: int) -> list[Operation]:
    """Lease up to ``limit`` due operations to this replica in one conditional UPDATE.

    The lease condition is repeated in the outer WHERE so that under READ COMMITTED two
    replicas racing for the same row cannot both win: the loser's UPDATE re-checks the row
    after the winner commits and no longer matches.
    """
    token = f"{owner}:{uuid.uuid4().hex[:12]}"
    free = or_(col(Operation.lease_expires_at).is_(None), col(Operation.lease_expires_at) < now)
    due = and_(
        col(Operation.next_poll_at).is_not(None),
        col(Operation.next_poll_at) <= now,
        free,
    )
    candidates = select(Operation.id).where(due).order_by(col(Operation.next_poll_at)).limit(limit)
    async with unit_of_work(db) as session:
        if dialect_name(session) == "postgresql":
            candidates = candidates.with_for_update(skip_locked=True)
        await session.exec(
            update(Operation)
            .where(col(Operation.id).in_(candidates.scalar_subquery()), due)
            .values(lease_owner=token, lease_expires_at=now + lease)
            .execution_options(synchronize_session=False)
        )
        claimed = (await session.exec(select(Operation).where(Operation.lease_owner == token))).all()
        return list(claimed)


async def extend_leases(db: Store, *, lease_token: str, until: datetime) -> int:
    """Keep holding everything leased under ``lease_token`` (a long cycle is still working on it)."""
    async with unit_of_work(db) as session:
        result = await session.exec(
            update(Operation).where(col(Operation.lease_owner) == lease_token).values(lease_expires_at=until)
        )
        return int(result.rowcount)


async def release_lease(
    db: Store, *, operation_id: int, lease_token: str, next_poll_at: datetime | None, card_digest: str | None = None
) -> None:
    """Hand the operation back (with the card digest the poller just synced) in one UPDATE."""
    await release_many(db, rows=[(operation_id, lease_token, next_poll_at, card_digest)])


async def release_many(db: Store, *, rows: Sequence[tuple[int, str, datetime | None, str | None]]) -> None:
    """Hand many operations back at once: (id, lease token, next poll time, card digest)."""
    if not rows:
        return
    table = Operation.__table__  # type: ignore[attr-defined]
    statement = (
        update(table)
        .where(table.c.id == bindparam("b_id"), table.c.lease_owner == bindparam("b_lease"))
        .values(
            lease_owner=None,
            lease_expires_at=None,
            next_poll_at=bindparam("b_next"),
            card_digest=func.coalesce(bindparam("b_digest"), table.c.card_digest),
        )
    )
    params: list[dict[str, Any]] = [{"b_id": i, "b_lease": t, "b_next": n, "b_digest": d} for i, t, n, d in rows]
    async with unit_of_work(db) as session:
        connection = await session.connection()
        await connection.execute(statement, params)


async def record_announced(db: Store, *, operation_id: int, lease_token: str, state: str) -> bool:
    """Record that the completion notice of ``state`` is owed to Slack; False when the lease was
    lost (the new holder announces) or it was recorded already. Run it in the transaction that
    queues the notice: the two commit together or not at all."""
    async with unit_of_work(db) as session:
        result = await session.exec(
            update(Operation)
            .where(
                col(Operation.id) == operation_id,
                col(Operation.lease_owner) == lease_token,
                or_(col(Operation.announced_state).is_(None), col(Operation.announced_state) != state),
            )
            .values(announced_state=state, updated_at=utcnow())
        )
        return bool(result.rowcount)
