"""The audit trail (append-only) and the record of Slack deliveries already handled."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlmodel import col, select

from bot.redaction import redact_text
from bot.store.db import Store, insert_ignoring_duplicates, unit_of_work
from bot.store.models import AuditEvent, SlackDelivery
from bot.store.operations import row_values


async def audit(
    db: Store,
    *,
    actor: str,
    action: str,
    channel: str = "",
    operation_ref: str = "",
    detail: str = "",
    outcome: str = "",
) -> None:
    async with unit_of_work(db) as session:
        session.add(
            AuditEvent(
                actor=actor,
                channel=channel,
                operation_ref=operation_ref,
                action=action,
                # Commands are audited as typed (``/sfp submit … password=…``) and outcomes quote
                # upstream errors: the row keeps neither's secrets.
                detail=redact_text(detail)[:4000],
                outcome=redact_text(outcome)[:200],
            )
        )


async def audit_events(db: Store, *, since: datetime | None = None) -> Sequence[AuditEvent]:
    async with unit_of_work(db) as session:
        query = select(AuditEvent).order_by(col(AuditEvent.id))
        if since is not None:
            query = query.where(col(AuditEvent.at) >= since)
        return (await session.exec(query)).all()


async def claim_delivery(db: Store, *, key: str) -> bool:
    """Record a Slack delivery key; False if any replica saw it before."""
    async with unit_of_work(db) as session:
        table = SlackDelivery.__table__  # type: ignore[attr-defined]
        return bool(
            await insert_ignoring_duplicates(
                session, table=table, rows=[row_values(SlackDelivery(key=key))], unique=["key"]
            )
        )
