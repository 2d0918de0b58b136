"""Writes the poller's advancers make to operations they hold a lease on, shared by every kind.

Every write is a compare-and-set on the lease and the expected state, so an advancer that lost
its lease (or raced a cancel) changes nothing and finds out from the return value.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from bot.core.approvals import settle
from bot.core.operations import Advance, OpEvent
from bot.core.payloads import common, with_common
from bot.core.when import aware
from bot.errors import UpstreamError
from bot.redaction import redact_text
from bot.store import repo
from bot.store.db import Database
from bot.store.models import Operation, OpState

log = logging.getLogger(__name__)

_PROBLEM_KEYS = {"transient_failures", "last_problem"}


class LeasedWrites:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def save(
        self, operation: Operation, lease_token: str, *, expect: Iterable[str] | None = None, **values: Any
    ) -> bool:
        """Apply ``values`` if this lease and the expected state (default: the current one) still hold.

        Saving new ``data`` clears the transient-problem note: progress means the trouble is over.
        """
        assert operation.id is not None
        if "data" in values:
            values["data"] = {key: value for key, value in values["data"].items() if key not in _PROBLEM_KEYS}
        ok = await repo.update_operation(
            self._db,
            operation_id=operation.id,
            lease_token=lease_token,
            expect_states=list(expect) if expect is not None else [operation.state],
            values=values,
        )
        if ok:
            for key, value in values.items():
                setattr(operation, key, value)
        return ok

    def pending_save(
        self, operation: Operation, lease_token: str, *, state: str, data: dict[str, Any]
    ) -> dict[str, Any]:
        """The same compare-and-set as ``save`` (state and data), to be written with ``save_many``.

        A poll cycle records the progress of hundreds of operations: one statement for all of them
        instead of one round trip each. ``operation`` itself is left as it was.
        """
        assert operation.id is not None
        return {
            "id": operation.id,
            "lease_token": lease_token,
            "expect_state": operation.state,
            "state": state,
            "data": {key: value for key, value in data.items() if key not in _PROBLEM_KEYS},
            "operation": operation,
        }

    async def save_many(self, rows: list[dict[str, Any]]) -> None:
        """Apply rows from ``pending_save`` in one statement; a row whose lease or state moved is skipped.

        The operations in memory are updated as ``save`` does, so the poller can tell the cycle's
        own state changes from those made by someone else meanwhile.
        """
        await repo.update_many(self._db, rows=rows)
        for row in rows:
            row["operation"].state, row["operation"].data = row["state"], row["data"]

    async def transient(
        self, operation: Operation, lease_token: str, exc: UpstreamError, *, delay: float | None = None
    ) -> Advance:
        """Keep the operation as it is, note the problem for the card, and try again later.

        The note is written only if the operation is still in the state it was read in: a cancel
        or stop that landed meanwhile wrote marks of its own in ``data``, which this stale copy
        would otherwise put back as they were.
        """
        assert operation.id is not None
        failures = common(operation).transient_failures + 1
        log.warning("%s: transient failure %s: %s", operation.ref, failures, exc.message)
        data = with_common(operation, transient_failures=failures, last_problem=redact_text(exc.message)[:200])
        noted = await repo.update_operation(
            self._db,
            operation_id=operation.id,
            lease_token=lease_token,
            expect_states=[operation.state],
            values={"data": data},
        )
        if not noted:
            return Advance(next_poll_in=1.0)  # it moved on meanwhile: look at it as it is now
        operation.data = data
        return Advance(next_poll_in=delay or min(5.0 * failures, 120.0))

    async def check_expiry(self, operation: Operation, lease_token: str) -> Advance:
        """An operation waiting for approval expires at ``approval_expires_at``.

        Decisions already recorded are applied first: a replica that died between recording a
        click and applying it leaves that to whichever replica polls the operation next.
        """
        now = datetime.now(UTC)
        outcome, _, _ = await settle(self._db, operation, now=now)
        if outcome in {"approved", "rejected"}:
            log.info("%s: applied a recorded decision (%s)", operation.ref, outcome)
            return Advance(next_poll_in=0.0)
        expires = operation.approval_expires_at
        if expires is not None and aware(expires) <= now:
            await self.save(operation, lease_token, state=OpState.EXPIRED)
            return Advance(events=[OpEvent("expired")])
        remaining = (aware(expires) - now).total_seconds() if expires else 3600.0
        return Advance(next_poll_in=max(1.0, min(remaining, 300.0)))
