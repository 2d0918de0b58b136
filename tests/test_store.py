"""The operation store on SQLite and PostgreSQL: migrations, idempotency, leases between replicas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from bot.store import repo
from bot.store.db import Database, migrate
from bot.store.models import Operation, OpState
from tests.conftest import postgres_url


def _pg() -> str:
    url = postgres_url()
    if not url:
        pytest.skip("CHATOPS_TEST_DATABASE_URL is not set; PostgreSQL tests need a server (see .ci/run)")
    return url


@pytest.fixture(params=["sqlite", "postgres"])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    url = _pg()
    probe = Database(url)
    async with probe.engine.begin() as conn:
        # A clean database per test: whatever an earlier run or an older schema left goes.
        await conn.execute(text("DROP SCHEMA public CASCADE"))
        await conn.execute(text("CREATE SCHEMA public"))
    await probe.close()
    yield url


def operation(key: str, *, due: datetime) -> Operation:
    return Operation(
        kind="push", state=OpState.RUNNING, requester="U1", channel="C1", idempotency_key=key, next_poll_at=due
    )


async def test_migrations_from_empty_and_again(db_url: str) -> None:
    await migrate(db_url)
    await migrate(db_url)  # a second replica starting: nothing to do, nothing lost
    db = Database(db_url)
    try:
        created, fresh = await repo.insert_operation(db, operation=operation("k1", due=datetime.now(UTC)))
        assert fresh
        await migrate(db_url)
        assert (await repo.get_operation(db, operation_id=created.id or 0)) is not None
    finally:
        await db.close()


async def test_same_idempotency_key_returns_the_first_operation(db_url: str) -> None:
    await migrate(db_url)
    db = Database(db_url)
    try:
        first, created_first = await repo.insert_operation(db, operation=operation("trigger-1", due=datetime.now(UTC)))
        again, created_again = await repo.insert_operation(db, operation=operation("trigger-1", due=datetime.now(UTC)))
        assert created_first and not created_again and again.id == first.id
        assert await repo.count_operations(db) == 1
    finally:
        await db.close()


async def test_replicas_never_lease_the_same_operation(db_url: str) -> None:
    await migrate(db_url)
    replicas = [Database(db_url) for _ in range(3)]
    now = datetime.now(UTC)
    try:
        for index in range(60):
            await repo.insert_operation(replicas[0], operation=operation(f"op-{index}", due=now - timedelta(seconds=1)))
        claims = await asyncio.gather(
            *(
                repo.claim_due(db, owner=f"replica-{n}", now=now, lease=timedelta(seconds=30), limit=25)
                for n, db in enumerate(replicas)
            )
        )
        ids = [op.id for claim in claims for op in claim]
        assert len(ids) == len(set(ids)) == 60
        # Nothing is due while the leases hold …
        assert await repo.claim_due(replicas[1], owner="late", now=now, lease=timedelta(seconds=30), limit=100) == []
        # … and everything is again once they expire (a replica died holding them).
        later = now + timedelta(seconds=31)
        taken = await repo.claim_due(replicas[2], owner="survivor", now=later, lease=timedelta(seconds=30), limit=100)
        assert len(taken) == 60
    finally:
        for db in replicas:
            await db.close()


async def test_writes_under_a_lost_lease_are_refused(db_url: str) -> None:
    await migrate(db_url)
    db = Database(db_url)
    now = datetime.now(UTC)
    try:
        op, _ = await repo.insert_operation(db, operation=operation("lease", due=now - timedelta(seconds=1)))
        first = (await repo.claim_due(db, owner="a", now=now, lease=timedelta(seconds=5), limit=1))[0]
        second = (
            await repo.claim_due(db, owner="b", now=now + timedelta(seconds=6), lease=timedelta(seconds=5), limit=1)
        )[0]
        assert first.lease_owner != second.lease_owner
        assert not await repo.update_operation(
            db, operation_id=op.id or 0, lease_token=first.lease_owner, values={"step": "stale"}
        )
        assert await repo.update_operation(
            db, operation_id=op.id or 0, lease_token=second.lease_owner, values={"step": "fresh"}
        )
    finally:
        await db.close()


async def test_upgrade_from_the_previous_schema_keeps_every_row(db_url: str) -> None:
    await migrate(db_url, "0001")
    db = Database(db_url)
    try:
        op, _ = await repo.insert_operation(db, operation=operation("before-upgrade", due=datetime.now(UTC)))
        await repo.audit(db, actor="U1", action="command", detail="/push list", outcome="ok")
        await migrate(db_url)  # to head: adds the Slack outbox tables
        kept = await repo.get_operation(db, operation_id=op.id or 0)
        assert kept is not None and kept.idempotency_key == "before-upgrade"
        assert [e.detail for e in await repo.audit_events(db)] == ["/push list"]
        async with db.engine.connect() as conn:
            assert (await conn.execute(text("SELECT COUNT(*) FROM slack_outbox"))).scalar() == 0
    finally:
        await db.close()
