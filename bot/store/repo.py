"""Keyword-only data access functions. Every write that can race is a conditional UPDATE."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, func, or_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from bot.redaction import redact_text
from bot.store.db import Database
from bot.store.models import (
    REF_PREFIX,
    TERMINAL_STATES,
    Approval,
    AuditEvent,
    Operation,
    OpKind,
    PushTarget,
    SlackDelivery,
    utcnow,
)


async def insert_operation(db: Database, *, operation: Operation) -> tuple[Operation, bool]:
    """Insert, or return the existing operation with the same idempotency key (Slack retries)."""
    async with db.session() as session:
        session.add(operation)
        try:
            await session.commit()
        except IntegrityError:
            await session.rollback()
            existing = (
                await session.exec(select(Operation).where(Operation.idempotency_key == operation.idempotency_key))
            ).one()
            return existing, False
        await session.refresh(operation)
        return operation, True


def parse_ref(ref: str, *, kind: OpKind) -> int | None:
    text = ref.strip().upper()
    prefix = REF_PREFIX[kind]
    if text.startswith(prefix):
        text = text[len(prefix) :]
    return int(text) if text.isdigit() and len(text) < 12 else None


async def find_operation(db: Database, *, kind: OpKind, ref: str) -> Operation | None:
    """The operation a person means: the bot's short ref (``P12``, ``12``), or the id the external
    system gave it — a Salesforce id of either length (its first 15 characters name the record,
    case-sensitively, so a pasted 18-character id finds a stored 15-character one and back), or
    an sfp operationId. The caller has checked the shape; it is only ever a bound parameter."""
    operation_id = parse_ref(ref, kind=kind)
    if operation_id is not None:
        found = await get_operation(db, operation_id=operation_id)
        if found is not None and found.kind == kind:
            return found
    text = ref.strip()
    salesforce_id = len(text) in (15, 18) and text.isalnum() and kind in {OpKind.PUSH, OpKind.DEPLOY}
    async with db.session() as session:
        query = select(Operation).where(Operation.kind == kind)
        if salesforce_id:
            query = query.where(col(Operation.external_id).startswith(text[:15], autoescape=True))
        else:
            query = query.where(Operation.external_id == text)
        candidates = (await session.exec(query.order_by(col(Operation.id).desc()).limit(20))).all()
    # LIKE ignores case in SQLite; the id's first 15 characters do not.
    matches = [op for op in candidates if (op.external_id or "")[:15] == text[:15]] if salesforce_id else candidates
    return matches[0] if matches else None


async def get_operation(db: Database, *, operation_id: int) -> Operation | None:
    async with db.session() as session:
        return await session.get(Operation, operation_id)


async def list_operations(
    db: Database, *, kind: OpKind, limit: int = 15, channel: str | None = None, user: str | None = None
) -> Sequence[Operation]:
    """The latest operations of a kind; with ``channel``/``user``, only those of that channel or
    requested by that user."""
    async with db.session() as session:
        query = select(Operation).where(Operation.kind == kind)
        if channel is not None or user is not None:
            query = query.where(or_(col(Operation.channel) == channel, col(Operation.requester) == user))
        query = query.order_by(col(Operation.id).desc()).limit(limit)
        return (await session.exec(query)).all()


async def operation_by_external_id(db: Database, *, kind: OpKind, external_id: str) -> Operation | None:
    async with db.session() as session:
        query = (
            select(Operation)
            .where(Operation.kind == kind, Operation.external_id == external_id)
            .order_by(col(Operation.id).desc())
            .limit(1)
        )
        return (await session.exec(query)).first()


async def update_operation(
    db: Database,
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
    async with db.session() as session:
        result = await session.exec(update(Operation).where(and_(*conditions)).values(**values))
        await session.commit()
        return bool(result.rowcount)  # type: ignore[attr-defined]


async def update_many(db: Database, *, rows: Sequence[dict[str, Any]]) -> None:
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
    async with db.session() as session:
        connection = await session.connection()
        await connection.execute(statement, params)
        await session.commit()


async def release_many(db: Database, *, rows: Sequence[tuple[int, str, datetime | None, str | None]]) -> None:
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
    params = [{"b_id": i, "b_lease": t, "b_next": n, "b_digest": d} for i, t, n, d in rows]
    async with db.session() as session:
        connection = await session.connection()
        await connection.execute(statement, params)
        await session.commit()


async def claim_due(db: Database, *, owner: str, now: datetime, lease: timedelta, limit: int) -> list[Operation]:
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
    if db.engine.dialect.name == "postgresql":
        candidates = candidates.with_for_update(skip_locked=True)
    async with db.session() as session:
        await session.exec(
            update(Operation)
            .where(col(Operation.id).in_(candidates.scalar_subquery()), due)
            .values(lease_owner=token, lease_expires_at=now + lease)
            .execution_options(synchronize_session=False)
        )
        await session.commit()
        claimed = (await session.exec(select(Operation).where(Operation.lease_owner == token))).all()
        return list(claimed)


async def extend_leases(db: Database, *, lease_token: str, until: datetime) -> int:
    """Keep holding everything leased under ``lease_token`` (a long cycle is still working on it)."""
    async with db.session() as session:
        result = await session.exec(
            update(Operation).where(col(Operation.lease_owner) == lease_token).values(lease_expires_at=until)
        )
        await session.commit()
        return int(result.rowcount)  # type: ignore[attr-defined]


async def release_lease(
    db: Database, *, operation_id: int, lease_token: str, next_poll_at: datetime | None, card_digest: str | None = None
) -> None:
    """Hand the operation back (with the card digest the poller just synced) in one UPDATE."""
    values: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None, "next_poll_at": next_poll_at}
    if card_digest is not None:
        values["card_digest"] = card_digest
    async with db.session() as session:
        await session.exec(
            update(Operation)
            .where(col(Operation.id) == operation_id, col(Operation.lease_owner) == lease_token)
            .values(**values)
        )
        await session.commit()


async def mark_announced(db: Database, *, operation_id: int, state: str) -> bool:
    """True exactly once per (operation, terminal state): whoever flips it posts the notice."""
    async with db.session() as session:
        result = await session.exec(
            update(Operation)
            .where(
                col(Operation.id) == operation_id,
                or_(col(Operation.announced_state).is_(None), col(Operation.announced_state) != state),
            )
            .values(announced_state=state)
        )
        await session.commit()
        return bool(result.rowcount)  # type: ignore[attr-defined]


async def claim_delivery(db: Database, *, key: str) -> bool:
    """Record a Slack delivery key; False if any replica saw it before."""
    async with db.session() as session:
        session.add(SlackDelivery(key=key))
        try:
            await session.commit()
        except IntegrityError:
            return False
        return True


async def add_push_targets(db: Database, *, operation_id: int, targets: Sequence[dict[str, Any]]) -> None:
    """Insert the planned targets: one statement, many parameter sets (a push can have 50,000)."""
    if not targets:
        return
    rows = [{"operation_id": operation_id, **target} for target in targets]
    table = PushTarget.__table__  # type: ignore[attr-defined]
    async with db.session() as session:
        connection = await session.connection()
        await connection.execute(table.insert(), rows)
        await session.commit()


async def push_targets(db: Database, *, operation_id: int) -> Sequence[PushTarget]:
    async with db.session() as session:
        return (await session.exec(select(PushTarget).where(PushTarget.operation_id == operation_id))).all()


async def record_push_job_results(
    db: Database, *, operation_id: int, job_ids: dict[str, str], refused: dict[str, str]
) -> None:
    """Store the job id or refusal reason per org key (15-char keys).

    Two UPDATE statements with many parameter sets, not one ORM object per target: a push to
    50,000 orgs records 50,000 results.
    """
    table = PushTarget.__table__  # type: ignore[attr-defined]
    async with db.session() as session:
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
        await session.commit()


async def add_approval(db: Database, *, approval: Approval) -> bool:
    """False when this person already decided on this operation (double click)."""
    async with db.session() as session:
        session.add(approval)
        try:
            await session.commit()
        except IntegrityError:
            return False
        return True


async def approvals_for(db: Database, *, operation_id: int) -> Sequence[Approval]:
    async with db.session() as session:
        query = select(Approval).where(Approval.operation_id == operation_id).order_by(col(Approval.id))
        return (await session.exec(query)).all()


async def audit(
    db: Database,
    *,
    actor: str,
    action: str,
    channel: str = "",
    operation_ref: str = "",
    detail: str = "",
    outcome: str = "",
) -> None:
    async with db.session() as session:
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
        await session.commit()


async def audit_events(db: Database, *, since: datetime | None = None) -> Sequence[AuditEvent]:
    async with db.session() as session:
        query = select(AuditEvent).order_by(col(AuditEvent.id))
        if since is not None:
            query = query.where(col(AuditEvent.at) >= since)
        return (await session.exec(query)).all()


async def count_operations(db: Database) -> int:
    async with db.session() as session:
        return (await session.exec(select(func.count()).select_from(Operation))).one()


async def record_push_failures(db: Database, *, operation_id: int, errors: dict[str, dict[str, str]]) -> None:
    """Mark failed orgs with their first PackagePushError (keys are 15-char org ids)."""
    if not errors:
        return
    async with db.session() as session:
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
        await session.commit()


async def push_request_claims(
    db: Database, *, operation_id: int, version_id: str, request_ids: Sequence[str], since: datetime
) -> tuple[set[str], int]:
    """For adopting an orphaned push request: which of ``request_ids`` other operations recorded,
    and how many other pushes of the version were being created since ``since`` without a request."""
    async with db.session() as session:
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
