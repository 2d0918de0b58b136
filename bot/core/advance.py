"""One ``advance`` for every operation kind: the poller's step, written once.

Each poll cycle hands a kind's leased operations to ``KindAdvancer.advance``. What is the same
for every kind lives here: applying recorded approval decisions and expiring old requests,
starting operations side by side under one concurrency limit, following running ones in one
batch, and backing off when an upstream system fails (transient trouble and refused credentials
alike keep the operation as it is, note the problem for the card, and try again later). What
differs lives in the kind's ``KindSteps``: how to start one, how to follow a batch, and what to
do in any other state.

Every write a step makes goes through ``LeasedWrites`` (compare-and-set on the lease and the
expected state), so a step that lost its lease or raced a cancel changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

from bot.core.lifecycle import LeasedWrites
from bot.core.operations import Advance, OpFile
from bot.errors import AuthError, UpstreamError, UserError
from bot.store.models import Operation, OpState

log = logging.getLogger(__name__)

START_CONCURRENCY = 8  # operations started side by side in one cycle, per kind
AUTH_BACKOFF_SECONDS = 300.0  # refused credentials need a person; do not hammer the login endpoint
WATCH_CRASH_RETRY_SECONDS = 30.0  # a bug while starting or following one operation must not stop the others


class KindSteps(Protocol):
    """What one operation kind supplies to the shared skeleton."""

    start_states: frozenset[str]  # states in which ``start`` is called (e.g. starting, scheduled)
    watch_states: frozenset[str]  # states ``watch`` follows, a batch at a time

    async def start(self, operation: Operation, lease_token: str) -> Advance:
        """Take one operation from approved (or scheduled) to running; record each attempt first.

        A definite refusal (``ApiError``) ends the operation here, in the kind's words; any other
        ``UpstreamError`` that escapes is treated as passing trouble and retried after a back-off.
        """
        ...

    async def watch(self, operations: Sequence[Operation], lease_token: str) -> Mapping[int, Advance | BaseException]:
        """Read the progress of many running operations at once.

        An exception for one operation is returned in its place; raising fails the whole batch
        (e.g. the org's status query itself failed) and the skeleton backs off for all of them.
        """
        ...

    async def settle(self, operation: Operation, lease_token: str) -> Advance:
        """Any other state, e.g. finishing a cancel that raced the start. Nothing to do: ``Advance()``."""
        ...

    async def refuse(self, operation: Operation, lease_token: str, message: str) -> Advance:
        """Starting it is impossible for a reason the user can fix (the org left the config …): end it."""
        ...

    async def completion_files(self, operation: Operation) -> list[OpFile]: ...


class KindAdvancer:
    """The poller's ``Advancer`` for one kind: the skeleton around that kind's steps."""

    def __init__(self, *, steps: KindSteps, writes: LeasedWrites) -> None:
        self._steps = steps
        self._writes = writes

    async def completion_files(self, operation: Operation) -> list[OpFile]:
        return await self._steps.completion_files(operation)

    async def advance(self, operations: Sequence[Operation], *, lease_token: str) -> dict[int, Advance]:
        results: dict[int, Advance] = {}
        watching = [op for op in operations if op.state in self._steps.watch_states]
        others = [op for op in operations if op.state not in self._steps.watch_states]
        limit = asyncio.Semaphore(START_CONCURRENCY)

        async def one(operation: Operation) -> None:
            async with limit:
                results[_id(operation)] = await self._one(operation, lease_token)

        # Operations being started are independent of each other: start several side by side.
        await asyncio.gather(*(one(op) for op in others))
        if watching:
            results.update(await self._watch(watching, lease_token))
        return results

    async def _one(self, operation: Operation, lease_token: str) -> Advance:
        try:
            if operation.state == OpState.AWAITING_APPROVAL:
                return await self._writes.check_expiry(operation, lease_token)
            if operation.state in self._steps.start_states:
                return await self._steps.start(operation, lease_token)
            return await self._steps.settle(operation, lease_token)
        except UpstreamError as exc:
            return await self._back_off(operation, lease_token, exc)
        except UserError as exc:
            return await self._steps.refuse(operation, lease_token, exc.message)
        except Exception:
            # A bug or a database blip while starting one operation must not take the others down
            # with it: the batch goes on (siblings keep their leases; running ones are watched).
            log.exception("advancing %s failed", operation.ref)
            return Advance(next_poll_in=WATCH_CRASH_RETRY_SECONDS)

    async def _watch(self, operations: Sequence[Operation], lease_token: str) -> dict[int, Advance]:
        try:
            outcomes = await self._steps.watch(operations, lease_token)
        except UpstreamError as exc:
            outcomes = {_id(op): exc for op in operations}
        results: dict[int, Advance] = {}
        for op in operations:
            outcome = outcomes.get(_id(op))
            if isinstance(outcome, Advance):
                results[_id(op)] = outcome
            elif isinstance(outcome, UpstreamError):
                # A failed status read never fails the operation: it is still running upstream.
                results[_id(op)] = await self._back_off(op, lease_token, outcome)
            elif isinstance(outcome, BaseException):
                log.error("following %s failed", op.ref, exc_info=outcome)
                results[_id(op)] = Advance(next_poll_in=WATCH_CRASH_RETRY_SECONDS)
            else:
                results[_id(op)] = Advance()
        return results

    async def _back_off(self, operation: Operation, lease_token: str, exc: UpstreamError) -> Advance:
        delay = AUTH_BACKOFF_SECONDS if isinstance(exc, AuthError) else None
        return await self._writes.transient(operation, lease_token, exc, delay=delay)


def _id(operation: Operation) -> int:
    assert operation.id is not None
    return operation.id
