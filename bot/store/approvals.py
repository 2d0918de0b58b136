"""Approval decisions: one row per person and operation, so a double click is recorded once."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from sqlmodel import col, select

from bot.store.db import Store, insert_ignoring_duplicates, unit_of_work
from bot.store.models import Approval
from bot.store.operations import row_values


async def add_approval(db: Store, *, approval: Approval) -> bool:
    """False when this person already decided on this operation (double click)."""
    async with unit_of_work(db) as session:
        table = Approval.__table__  # type: ignore[attr-defined]
        return bool(
            await insert_ignoring_duplicates(
                session, table=table, rows=[row_values(approval)], unique=["operation_id", "approver"]
            )
        )


async def approvals_for(db: Store, *, operation_id: int) -> Sequence[Approval]:
    async with unit_of_work(db) as session:
        query = select(Approval).where(Approval.operation_id == operation_id).order_by(col(Approval.id))
        return (await session.exec(query)).all()


async def approvers(db: Store, *, operation_ids: Sequence[int]) -> dict[int, list[str]]:
    """Who approved each of these operations so far (what their cards show)."""
    if not operation_ids:
        return {}
    async with unit_of_work(db) as session:
        query = select(Approval).where(
            col(Approval.operation_id).in_(list(operation_ids)), Approval.decision == "approve"
        )
        rows = (await session.exec(query)).all()
    result: dict[int, list[str]] = defaultdict(list)
    for row in rows:
        result[row.operation_id].append(row.approver)
    return result
