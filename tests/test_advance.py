"""The one advance skeleton and its lease-checked writes, on their own (bot/core)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bot.core.advance import WATCH_CRASH_RETRY_SECONDS, KindAdvancer
from bot.core.lifecycle import LeasedWrites
from bot.core.operations import Advance, OpFile
from bot.errors import TransientError
from bot.store import repo
from bot.store.db import Database, migrate
from bot.store.models import Operation, OpState


class Steps:
    """A kind whose start fails with a bug for one operation and is slow for another."""

    start_states = frozenset({OpState.STARTING})
    watch_states = frozenset({OpState.RUNNING})

    def __init__(self) -> None:
        self.started: list[str] = []
        self.watched: list[str] = []

    async def start(self, operation: Operation, lease_token: str) -> Advance:
        if operation.requester == "U0BUGGY":
            raise KeyError("an answer the code did not expect")
        await asyncio.sleep(0.2)  # still sending when the buggy one fails
        self.started.append(operation.ref)
        return Advance(next_poll_in=1.0)

    async def watch(self, operations: Sequence[Operation], lease_token: str) -> Mapping[int, Advance | BaseException]:
        self.watched += [op.ref for op in operations]
        return {op.id or 0: Advance() for op in operations}

    async def settle(self, operation: Operation, lease_token: str) -> Advance:
        return Advance()

    async def refuse(self, operation: Operation, lease_token: str, message: str) -> Advance:
        return Advance()

    async def completion_files(self, operation: Operation) -> list[OpFile]:
        return []


def op(number: int, *, state: str, requester: str = "U0ALICE") -> Operation:
    return Operation(
        id=number, kind="push", state=state, requester=requester, channel="C1", idempotency_key=f"k{number}"
    )


async def test_a_bug_starting_one_operation_neither_stops_the_others_nor_the_watching() -> None:
    steps = Steps()
    advancer = KindAdvancer(steps=steps, writes=LeasedWrites(None))  # type: ignore[arg-type]  # no writes here
    batch = [op(1, state=OpState.STARTING, requester="U0BUGGY"), op(2, state=OpState.STARTING), op(3, state="running")]

    results = await advancer.advance(batch, lease_token="lease")

    assert results[1] == Advance(next_poll_in=WATCH_CRASH_RETRY_SECONDS)  # tried again later, not in a loop
    assert steps.started == ["P2"]  # its sibling's start finished inside the same cycle
    assert steps.watched == ["P3"] and results[3] == Advance()


async def test_a_back_off_note_never_puts_back_what_a_cancel_wrote_meanwhile(tmp_path: Path) -> None:
    """The status read failed; meanwhile the user cancelled (new state, new marks in ``data``).
    The note about the failure is written from the copy read before: it must not win."""
    url = f"sqlite:///{tmp_path / 'advance.db'}"
    await migrate(url)
    db = Database(url)
    try:
        lease = uuid.uuid4().hex
        row, _ = await repo.insert_operation(
            db,
            operation=Operation(
                kind="sfp",
                state=OpState.RUNNING,
                requester="U0ALICE",
                channel="C1",
                idempotency_key="k",
                data={"operation_id": "1000000001"},
                lease_owner=lease,
                lease_expires_at=datetime.now(UTC) + timedelta(minutes=1),
            ),
        )
        assert row.id is not None
        stale = row.model_copy()
        cancelled = {"operation_id": "1000000001", "cancel_requested_by": "U0ALICE"}
        assert await repo.update_operation(
            db, operation_id=row.id, expect_states=[OpState.RUNNING], values={"state": "canceling", "data": cancelled}
        )

        advance = await LeasedWrites(db).transient(stale, lease, TransientError("status read timed out"))

        fresh = await repo.get_operation(db, operation_id=row.id)
        assert fresh is not None and (fresh.state, fresh.data) == ("canceling", cancelled)
        assert advance.next_poll_in == 1.0  # looked at again soon, as it is now
    finally:
        await db.close()
