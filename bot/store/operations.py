"""Operations: insert, look up, and compare-and-set. Every write that can race is a conditional UPDATE.

Each function takes a ``Store``: the caller's session (a decision spanning several statements is
then one transaction, committed by the caller) or the Database (a transaction of its own).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import and_, bindparam, func, or_, update
from sqlmodel import col, select

from bot.store.db import Store, insert_ignoring_duplicates, unit_of_work
from bot.store.models import REF_PREFIX, TERMINAL_STATES, Operation, OpKind, utcnow


def row_values(model: Any) -> dict[str, Any]:
    """A model's column values for a Core INSERT (the database assigns ``id``)."""
    table = type(model).__table__
    return {column.name: getattr(model, column.name) for column in table.columns if column.name != "id"}


async def insert_operation(db: Store, *, operation: Operation) -> tuple[Operation, bool]:
    """Insert, or return the existing operation with the same idempotency key (Slack retries)."""
    async with unit_of_work(db) as session:
        table = Operation.__table__  # type: ignore[attr-defined]
        created = await insert_ignoring_duplicates(
            session, table=table, rows=[row_values(operation)], unique=["idempotency_key"]
        )
        query = select(Operation).where(Operation.idempotency_key == operation.idempotency_key)
        stored = (await session.exec(query.execution_options(populate_existing=True))).one()
        if created:
            operation.id = stored.id  # callers holding the object they passed see its id, as before
        return stored, bool(created)


def parse_ref(ref: str, *, kind: OpKind) -> int | None:
    text = ref.strip().upper()
    prefix = REF_PREFIX[kind]
    if text.startswith(prefix):
        text = text[len(prefix) :]
    return int(text) if text.isdigit() and len(text) < 12 else None


async def find_operation(db: Store, *, kind: OpKind, ref: str) -> Operation | None:
    """The operation a person means: the bot's short ref (``P12``, ``12``), or the id the external
    system gave it — a Salesforce id of either length (its first 15 characters name the record,
    case-sensitively, so a pasted 18-character id finds a stored 15-character one and back), or
    an sfp operationId. The caller has checked the shape; it is only ever a bound parameter."""
    operation_id = parse_ref(ref, kind=kind)
    text = ref.strip()
    salesforce_id = len(text) in (15, 18) and text.isalnum() and kind in {OpKind.PUSH, OpKind.DEPLOY}
    async with unit_of_work(db) as session:
        if operation_id is not None:
            found = await session.get(Operation, operation_id)
            if found is not None and found.kind == kind:
                return found
        query = select(Operation).where(Operation.kind == kind)
        if salesforce_id:
            query = query.where(col(Operation.external_id).startswith(text[:15], autoescape=True))
        else:
            query = query.where(Operation.external_id == text)
        candidates = (await session.exec(query.order_by(col(Operation.id).desc()).limit(20))).all()
    # LIKE ignores case in SQLite; the id's first 15 characters do not.
    matches = [op for op in candidates if (op.external_id or "")[:15] == text[:15]] if salesforce_id else candidates
    return matches[0] if matches else None


async def get_operation(db: Store, *, operation_id: int) -> Operation | None:
    async with unit_of_work(db) as session:
        return await session.get(Operation, operation_id)


async def operations_by_ids(db: Store, *, ids: Sequence[int]) -> list[Operation]:
    """The rows as they are now (the poller reloads what a cycle advanced)."""
    async with unit_of_work(db) as session:
        query = select(Operation).where(col(Operation.id).in_(list(ids)))
        return list((await session.exec(query.execution_options(populate_existing=True))).all())


async def list_operations(
    db: Store, *, kind: OpKind, limit: int = 15, channel: str | None = None, user: str | None = None
) -> Sequence[Operation]:
    """The latest operations of a kind; with ``channel``/``user``, only those of that channel or
    requested by that user."""
    async with unit_of_work(db) as session:
        query = select(Operation).where(Operation.kind == kind)
        if channel is not None or user is not None:
            query = query.where(or_(col(Operation.channel) == channel, col(Operation.requester) == user))
        query = query.order_by(col(Operation.id).desc()).limit(limit)
        return (await session.exec(query)).all()


async def operation_by_external_id(db: Store, *, kind: OpKind, external_id: str) -> Operation | None:
    async with unit_of_work(db) as session:
        query = (
            select(Operation)
            .where(Operation.kind == kind, Operation.external_id == external_id)
            .order_by(col(Operation.id).desc())
            .limit(1)
        )
        return (await session.exec(query)).first()


async def count_operations(db: Store) -> int:
    async with unit_of_work(db) as session:
        return (await session.exec(select(func.count()).select_from(Operation))).one()


async def update_operation(
    db: Store,
    *,
    operation_id: int,
    expect_states: Iterable[str] | None = None,
    lease_token: str | None = None,
    expect_no_external_id: bool = False,
    values: dict[str, Any],
) -> bool:
    """Compare-and-set: applies ``values`` only if the state (and lease, and the absence of an
    external id when asked) still match."""
    conditions = [col(Operation.id) == operation_id]
    if expect_states is not None:
        conditions.append(col(Operation.state).in_(list(expect_states)))
    if expect_no_external_id:
        conditions.append(col(Operation.external_id).is_(None))
    if lease_token is not None:
        conditions.append(col(Operation.lease_owner) == lease_token)
    values = {**values, "updated_at": utcnow()}
    if values.get("state") in TERMINAL_STATES and "finished_at" not in values:
        values["finished_at"] = utcnow()
    async with unit_of_work(db) as session:
        result = await session.exec(update(Operation).where(and_(*conditions)).values(**values))
        return bool(result.rowcount)


async def update_many(db: Store, *, rows: Sequence[dict[str, Any]]) -> None:
    """Many compare-and-set updates of ``state`` and ``data`` in one statement (executemany).

    Each row: ``id``, ``lease_token``, ``expect_state``, ``state``, ``data``. A row whose lease or
    state no longer matches is left alone, as with ``update_operation``.
    """
    if not rows:
        return
    table = Operation.__table__  # type: ignore[attr-defined]
    statement = (
        update(table)
        .where(
            table.c.id == bindparam("b_id"),
            table.c.lease_owner == bindparam("b_lease"),
            table.c.state == bindparam("b_expect"),
        )
        .values(state=bindparam("b_state"), data=bindparam("b_data"), updated_at=bindparam("b_now"))
    )
    now = utcnow()
    params = [
        {
            "b_id": r["id"],
            "b_lease": r["lease_token"],
            "b_expect": r["expect_state"],
            "b_state": r["state"],
            "b_data": r["data"],
            "b_now": now,
        }
        for r in rows
    ]
    async with unit_of_work(db) as session:
        connection = await session.connection()
        await connection.execute(statement, params)
