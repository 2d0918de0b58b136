"""Engine and session factory, plus schema migrations (Alembic) run at start-up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel.ext.asyncio.session import AsyncSession

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

_ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
}
_SYNC_DRIVERS = {
    "sqlite+aiosqlite": "sqlite",
    "postgresql+asyncpg": "postgresql+psycopg",
}


def async_url(url: str) -> str:
    """Accept the URLs people write (sqlite:///x.db, postgresql://…) and pick an async driver."""
    parsed = make_url(url)
    driver = _ASYNC_DRIVERS.get(parsed.drivername, parsed.drivername)
    return parsed.set(drivername=driver).render_as_string(hide_password=False)


def sync_url(url: str) -> str:
    """The same database through a synchronous driver, for Alembic."""
    parsed = make_url(async_url(url))
    driver = _SYNC_DRIVERS.get(parsed.drivername, parsed.drivername)
    return parsed.set(drivername=driver).render_as_string(hide_password=False)


def create_engine(url: str) -> AsyncEngine:
    target = async_url(url)
    if target.startswith("sqlite"):
        engine = create_async_engine(target, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            # WAL lets the console, the poller and a second process read while one writes.
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            # With WAL, NORMAL loses nothing when the process dies (only on power loss or an OS
            # crash can the last commits go): the right trade for a poller that commits per operation.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_async_engine(target, pool_size=10, max_overflow=10, pool_pre_ping=True)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", sync_url(url).replace("%", "%%"))
    return config


def migrate_sync(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


async def migrate(url: str, revision: str = "head") -> None:
    """Bring the schema to ``revision``; safe to run on every start and from several replicas."""
    await asyncio.to_thread(migrate_sync, url, revision)


class Database:
    """Owns the engine; hands out sessions. One per process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)
        self._sessions = async_sessionmaker(self.engine, class_=AsyncSession, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        async with self._sessions() as session:
            yield session

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """One unit of work: everything done with the session commits together when the block
        ends, or none of it when the block raises. Repository functions take this session, so
        a decision spanning several statements is one transaction."""
        async with self._sessions() as session, session.begin():
            yield session

    async def close(self) -> None:
        await self.engine.dispose()


Store = Database | AsyncSession
"""What repository functions accept: the caller's session (they run inside its transaction and
leave committing to the caller) or the Database (they run in a transaction of their own)."""


@asynccontextmanager
async def unit_of_work(store: Store) -> AsyncIterator[AsyncSession]:
    """The caller's session as is, or a transaction of its own committed when the block ends."""
    if isinstance(store, AsyncSession):
        yield store
        return
    async with store.transaction() as session:
        yield session


def dialect_name(session: AsyncSession) -> str:
    """``postgresql`` or ``sqlite``: the few statements that differ (upserts, SKIP LOCKED) ask."""
    return session.get_bind().dialect.name


async def insert_ignoring_duplicates(
    session: AsyncSession, *, table: Any, rows: Sequence[dict[str, Any]], unique: Sequence[str]
) -> int:
    """INSERT … ON CONFLICT DO NOTHING: a row whose unique key exists is skipped without an error,
    so the caller's transaction goes on (an IntegrityError would abort it on PostgreSQL).

    One statement with many parameter sets (executemany), not a multi-row VALUES clause:
    SQLAlchemy builds the latter value by value in Python. Returns how many were inserted, exact
    for one row (for many, how many were offered).
    """
    if not rows:
        return 0
    insert = postgresql_insert(table) if dialect_name(session) == "postgresql" else sqlite_insert(table)
    connection = await session.connection()
    statement = insert.on_conflict_do_nothing(index_elements=list(unique))
    if len(rows) > 1:
        await connection.execute(statement, list(rows))
        return len(rows)
    # psycopg reports no row count for an INSERT SQLAlchemy adds RETURNING to: ask for the row.
    inserted = await connection.execute(statement.returning(*(table.c[name] for name in unique)), rows[0])
    return len(inserted.all())
