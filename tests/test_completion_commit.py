"""The poller's completion is one transaction: the notices queued for Slack, ``announced_state``
and the audit row commit together, so a failure half-way leaves none of them, and the next cycle
announces the operation exactly once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text, update
from sqlmodel import col, select

from bot.core.operations import Advance, OpEvent, OpFile
from bot.poller import KindView, Poller
from bot.settings import PollerConfig
from bot.slack.outbox import SlackOutbox, card_digest
from bot.slack.web import SlackPoster, make_outbox_client
from bot.store import outbox as outbox_store
from bot.store import repo
from bot.store.db import Database, migrate
from bot.store.models import Operation, OpState, OutboxMessage
from tests.conftest import postgres_url

CARD = ("card", [{"type": "section", "text": {"type": "mrkdwn", "text": "card"}}])


class Finished:
    """An advancer whose operations are already over: the cycle only has to announce them."""

    async def advance(self, operations: list[Operation], *, lease_token: str) -> dict[int, Advance]:
        return {}

    async def completion_files(self, operation: Operation) -> list[OpFile]:
        return [OpFile(name="result.txt", title="Result", content=b"all good")]


def card(op: Operation, **_: Any) -> tuple[str, list[dict[str, Any]]]:
    return CARD


def no_reply(op: Operation, event: OpEvent) -> str | None:
    return None


@pytest.fixture(params=["sqlite", "postgres"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    url = f"sqlite:///{tmp_path / 'completion.db'}" if request.param == "sqlite" else postgres_url()
    if not url:
        pytest.skip("CHATOPS_TEST_DATABASE_URL is not set; PostgreSQL tests need a server (see .ci/run)")
    database = Database(url)
    if request.param == "postgres":
        async with database.engine.begin() as conn:
            await conn.execute(text("DROP SCHEMA public CASCADE"))
            await conn.execute(text("CREATE SCHEMA public"))
    await migrate(url)
    yield database
    await database.close()


async def owed(db: Database, op_id: int) -> list[str]:
    async with db.session() as session:
        query = select(OutboxMessage.dedupe_key).where(OutboxMessage.operation_id == op_id)
        return sorted((await session.exec(query)).all())


@pytest.mark.parametrize("failing", ["enqueue", "audit"])
async def test_a_failure_between_queueing_the_notice_and_recording_it_leaves_neither(
    db: Database, failing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    view = KindView(advancer=Finished(), card=card, event_reply=no_reply, completion_text=lambda op: "finished")
    poster = SlackPoster(make_outbox_client(token="xoxb-unused", base_url="http://127.0.0.1:9/api/"))
    outbox = SlackOutbox(db=db, poster=poster, render_card=lambda op: None, owner="test")  # type: ignore[arg-type,return-value]
    poller = Poller(db=db, views={"push": view}, poster=poster, outbox=outbox, config=PollerConfig(), owner="test")
    op, _ = await repo.insert_operation(
        db,
        operation=Operation(
            kind="push",
            state=OpState.SUCCEEDED,
            requester="U1",
            channel="C1",
            idempotency_key="done",
            card_ts="1.000001",
            card_digest=card_digest(*CARD),  # the card is up to date: only the completion is owed
            next_poll_at=datetime.now(UTC) - timedelta(seconds=1),
        ),
    )
    assert op.id is not None

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the database went away half-way")

    monkeypatch.setattr(outbox_store if failing == "enqueue" else repo, failing, broken)
    assert await poller.tick() == 1
    stored = await repo.get_operation(db, operation_id=op.id)
    assert stored is not None and stored.announced_state is None
    assert await owed(db, op.id) == []
    assert [e for e in await repo.audit_events(db) if e.action == "completed"] == []

    monkeypatch.undo()
    async with db.transaction() as session:  # due again now rather than after the retry delay
        await session.exec(update(Operation).where(col(Operation.id) == op.id).values(next_poll_at=datetime.now(UTC)))
    assert await poller.tick() == 1
    assert await poller.tick() == 0  # announced: no longer due
    stored = await repo.get_operation(db, operation_id=op.id)
    assert stored is not None and stored.announced_state == OpState.SUCCEEDED
    assert await owed(db, op.id) == [f"completion:{op.id}:succeeded", f"file:{op.id}:succeeded:0"]
    assert len([e for e in await repo.audit_events(db) if e.action == "completed"]) == 1
