"""The orgs a push targets and what Salesforce did with each (a push can have 50,000)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, update
from sqlmodel import col, select

from bot.store.db import Store, unit_of_work
from bot.store.models import Operation, OpKind, PushTarget


async def add_push_targets(db: Store, *, operation_id: int, targets: Sequence[dict[str, Any]]) -> None:
    """Insert the planned targets: one statement, many parameter sets (a push can have 50,000)."""
    if not targets:
        return
    rows = [{"operation_id": operation_id, **target} for target in targets]
    table = PushTarget.__table__  # type: ignore[attr-defined]
    async with unit_of_work(db) as session:
        connection = await session.connection()
        await connection.execute(table.insert(), rows)


async def push_targets(db: Store, *, operation_id: int) -> Sequence[PushTarget]:
    async with unit_of_work(db) as session:
        return (await session.exec(select(PushTarget).where(PushTarget.operation_id == operation_id))).all()


async def record_push_job_results(
    db: Store, *, operation_id: int, job_ids: dict[str, str], refused: dict[str, str]
) -> None:
    """Store the job id or refusal reason per org key (15-char keys).

    Two UPDATE statements with many parameter sets, not one ORM object per target: a push to
    50,000 orgs records 50,000 results.
    """
    table = PushTarget.__table__  # type: ignore[attr-defined]
    async with unit_of_work(db) as session:
        connection = await session.connection()
        targets = (
            await connection.execute(select(table.c.id, table.c.org_key).where(table.c.operation_id == operation_id))
        ).all()
        jobs: list[dict[str, Any]] = []
        refusals: list[dict[str, Any]] = []
        for target_id, org_key in targets:
            key = org_key[:15]
            if key in job_ids:
                jobs.append({"b_id": target_id, "b_value": job_ids[key]})
            elif key in refused:
                refusals.append({"b_id": target_id, "b_value": refused[key]})
        for column, params in (("job_id", jobs), ("refused_reason", refusals)):
            if params:
                statement = update(table).where(table.c.id == bindparam("b_id")).values({column: bindparam("b_value")})
                await connection.execute(statement, params)


async def record_push_failures(db: Store, *, operation_id: int, errors: dict[str, dict[str, str]]) -> None:
    """Mark failed orgs with their first PackagePushError (keys are 15-char org ids)."""
    if not errors:
        return
    async with unit_of_work(db) as session:
        targets = (await session.exec(select(PushTarget).where(PushTarget.operation_id == operation_id))).all()
        for target in targets:
            error = errors.get(target.org_key[:15])
            if error is None:
                continue
            target.job_status = "Failed"
            target.error_type = error.get("ErrorType") or None
            target.error_title = error.get("ErrorTitle") or None
            target.error_message = error.get("ErrorMessage") or None
            target.error_details = (error.get("ErrorDetails") or "")[:2000] or None
            session.add(target)


async def push_request_claims(
    db: Store, *, operation_id: int, version_id: str, request_ids: Sequence[str], since: datetime
) -> tuple[set[str], int]:
    """For adopting an orphaned push request: which of ``request_ids`` other operations recorded,
    and how many other pushes of the version were being created since ``since`` without a request."""
    async with unit_of_work(db) as session:
        known = set(
            (
                await session.exec(
                    select(Operation.external_id).where(
                        Operation.kind == OpKind.PUSH, col(Operation.external_id).in_(list(request_ids))
                    )
                )
            ).all()
        )
        others = (
            await session.exec(
                select(Operation).where(
                    Operation.kind == OpKind.PUSH,
                    col(Operation.id) != operation_id,
                    col(Operation.external_id).is_(None),
                    Operation.step == "create_request",
                    col(Operation.updated_at) >= since,
                )
            )
        ).all()
    concurrent = sum(
        1 for op in others if op.params.get("version_id") == version_id and op.data.get("request_attempted_at")
    )
    return {str(k) for k in known if k}, concurrent
