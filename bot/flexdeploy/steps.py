"""The poller's side of an ``fd`` operation: its steps in the shared skeleton (``bot.core.advance``).

A FlexDeploy change is one call. ``start`` makes it, for a change that was approved and for one
that needed no approval alike, recording the attempt first so that a bot killed mid-call checks
what FlexDeploy holds instead of calling twice:

    awaiting_approval → starting/call → succeeded | failed          (rejected, expired, canceled)

Waiting, expiry, back-off after passing trouble (an unknown outcome included: the next attempt
reads the package first) and refused credentials belong to the skeleton.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from bot.clients.flexdeploy import FlexDeployClient, Package
from bot.core.lifecycle import LeasedWrites
from bot.core.operations import Advance, OpEvent, OpFile
from bot.errors import AmbiguousWriteError, ApiError, NotFoundError, UsageError
from bot.flexdeploy.payloads import FdData, FdParams, PackageSummary
from bot.flexdeploy.plan import LONG_LIST, Change, already_done, file_entries, files_csv, read_or_none, send, stale
from bot.redaction import redact_text
from bot.store import repo
from bot.store.db import Database
from bot.store.models import Operation, OpState

NOT_CONFIGURED = (
    "FlexDeploy is not configured for this bot: an admin sets `[flexdeploy] url` in the config and "
    "FLEXDEPLOY_USER / FLEXDEPLOY_PASSWORD in the environment."
)


class FlexDeploySteps:
    """``KindSteps`` for ``fd``: one call, no running state to follow."""

    start_states: frozenset[str] = frozenset({OpState.STARTING})
    watch_states: frozenset[str] = frozenset()

    def __init__(self, *, db: Database, client: FlexDeployClient | None) -> None:
        self._db = db
        self._client = client
        self._writes = LeasedWrites(db)

    @property
    def client(self) -> FlexDeployClient:
        if self._client is None:
            raise UsageError(NOT_CONFIGURED)
        return self._client

    async def start(self, operation: Operation, lease_token: str) -> Advance:
        """The call, made once: the attempt is recorded first, and a repeat checks first."""
        change = Change.of(FdParams.read(operation.params))
        data = FdData.read(operation.data)
        retried = data.attempted_at is not None
        # Re-read when the package may have changed since the plan read it: while the request waited
        # for approval, or since an attempt whose outcome is unknown. A change that needed no approval
        # is sent right after its plan, with no second GET.
        if change.action != "delete" and (retried or data.waited_for_approval):
            try:
                current = await read_or_none(self.client, change.project_id, change.package)
            except ApiError as exc:
                return await self._finish(operation, lease_token, OpState.FAILED, error=f"FlexDeploy: {exc.message}")
            if (retried or change.action in {"status", "complete"}) and already_done(change, current):
                return await self._finish(operation, lease_token, OpState.SUCCEEDED, after=current)
            problem = stale(change, current)
            if problem:
                return await self._finish(operation, lease_token, OpState.FAILED, error=problem)
        if change.action == "delete" and retried:
            # An earlier DELETE's answer was lost (its replica died, or FlexDeploy answered 5xx after
            # deleting): a package already gone is that delete done, not a reason to send another.
            if await read_or_none(self.client, change.project_id, change.package) is None:
                await self._audit(operation, change, outcome="ok (already deleted)")
                return await self._finish(operation, lease_token, OpState.SUCCEEDED, after=None)
        attempted = data.model_copy(update={"attempted_at": datetime.now(UTC).isoformat()})
        if not await self._writes.save(operation, lease_token, data=attempted.dump()):
            return Advance()
        try:
            after = await send(self.client, change)
        except AmbiguousWriteError:
            raise  # passing trouble for the skeleton: the next round reads the package and decides
        except (ApiError, NotFoundError, UsageError) as exc:
            await self._audit(operation, change, outcome=f"refused: {exc.message[:150]}")
            return await self._finish(operation, lease_token, OpState.FAILED, error=f"FlexDeploy: {exc.message}")
        await self._audit(operation, change, outcome="ok")
        return await self._finish(operation, lease_token, OpState.SUCCEEDED, after=after)

    async def watch(self, operations: Sequence[Operation], lease_token: str) -> Mapping[int, Advance | BaseException]:
        return {}  # nothing runs in FlexDeploy after the call: ``watch_states`` is empty

    async def settle(self, operation: Operation, lease_token: str) -> Advance:
        return Advance()

    async def refuse(self, operation: Operation, lease_token: str, message: str) -> Advance:
        return await self._finish(operation, lease_token, OpState.FAILED, error=message)

    async def completion_files(self, operation: Operation) -> list[OpFile]:
        """The package's full file list when it is too long for the thread."""
        data = FdData.read(operation.data)
        package = data.after_package()
        if package is None or len(package.files) <= LONG_LIST:
            return []
        return [files_csv(package, project_id=FdParams.read(operation.params).project_id)]

    async def _audit(self, operation: Operation, change: Change, *, outcome: str) -> None:
        await repo.audit(
            self._db,
            actor="bot",
            channel=operation.channel,
            operation_ref=operation.ref,
            action="call",
            detail=change.call,
            outcome=outcome,
        )

    async def _finish(
        self,
        operation: Operation,
        lease_token: str,
        state: OpState,
        *,
        after: Package | None = None,
        error: str | None = None,
    ) -> Advance:
        data = FdData.read(operation.data).model_copy(update={"attempted_at": None})
        if after is not None:
            data = data.model_copy(update={"after": PackageSummary.of(after), "after_files": file_entries(after.files)})
        if error:
            data = data.model_copy(update={"error": redact_text(error)[:500]})
        if not await self._writes.save(operation, lease_token, state=state, step="", data=data.dump()):
            return Advance()
        return Advance(events=[OpEvent("completed" if state == OpState.SUCCEEDED else "error")])
