"""sfp server tasks (SPEC §6): what the handlers ask for — record, read, cancel, stop, list runs.

A task is an Operation of kind ``sfp`` (refs S1, S2 …). The handler records it here (waiting
for approval when a rule matches, otherwise starting); the poller submits and follows it
(``bot.sfp.steps``), through the shared skeleton.

Cancel and stop are requests the poller sees through: they move a task to ``canceling`` with
who asked, so that the poller's saves, conditioned on the old state, cannot overwrite the mark.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp

from bot.clients.retry import RetryPolicy
from bot.clients.sfp import Cancelled, Recurrence, SfpClient, Stopped, TaskStatus
from bot.core.approvals import ApprovalFacts, ApprovalRequirement, requirement_for
from bot.core.grammar import REF_RE
from bot.errors import (
    AmbiguousWriteError,
    ApiError,
    NotAllowedError,
    NotFoundError,
    StateError,
    TaskNotFoundError,
    TransientError,
    UsageError,
)
from bot.settings import Settings
from bot.sfp.payloads import SfpData, StopRecord, duration_text, is_recurring, iso
from bot.sfp.requests import CancelOutcome, SfpRef, StopOutcome, Target, TaskRequest
from bot.sfp.steps import NOT_CONFIGURED, SfpSteps
from bot.store import repo
from bot.store.db import Database
from bot.store.models import Operation, OpKind, OpState

log = logging.getLogger(__name__)

T = TypeVar("T")

NO_TASK_TYPES = (
    "No sfp task types are allowed yet, so `/sfp submit` is refused: add "
    '`task_types = ["fetchReviewEnvironment", …]` under `[sfp]` in the config file '
    '(`["*"]` allows every type).'
)

__all__ = ["NOT_CONFIGURED", "CancelOutcome", "SfpService", "StopOutcome", "Target", "TaskRequest"]


class SfpService:
    def __init__(self, *, db: Database, settings: Settings, client: SfpClient | None) -> None:
        self._db = db
        self._settings = settings
        self._client = client
        self.steps = SfpSteps(db=db, client=client)  # what the poller runs (bot.runtime)

    @classmethod
    def from_settings(
        cls, *, settings: Settings, db: Database, session: aiohttp.ClientSession, retry: RetryPolicy | None = None
    ) -> SfpService:
        """With a client when ``[sfp] url`` and ``SFP_TOKEN`` are set; otherwise every command says so."""
        client = None
        if settings.sfp is not None and settings.sfp_token is not None:
            client = SfpClient(session=session, base_url=settings.sfp.url, token=settings.sfp_token, retry=retry)
        return cls(db=db, settings=settings, client=client)

    @property
    def configured(self) -> bool:
        return self._client is not None

    def _require_client(self) -> SfpClient:
        if self._client is None:
            raise StateError(NOT_CONFIGURED)
        return self._client

    # -- creating ------------------------------------------------------------------------------
    def approval_for(self, request: TaskRequest) -> ApprovalRequirement | None:
        """Rules for ``sfp_recurring`` apply to recurring tasks first; then the ``sfp`` rules."""
        rules = self._settings.approval
        if request.recurring:
            requirement = requirement_for(ApprovalFacts(action="sfp_recurring", task_type=request.task_type), rules)
            if requirement is not None:
                return requirement
        return requirement_for(ApprovalFacts(action="sfp", task_type=request.task_type), rules)

    def check(self, request: TaskRequest, *, now: datetime) -> None:
        """The allowed task types, and rules that need the resolved times; the grammar checked
        everything else."""
        config = self._settings.sfp
        if config is None or config.task_types is None:
            raise NotAllowedError(NO_TASK_TYPES)
        if not config.allows(request.task_type):
            allowed = ", ".join(f"`{name}`" for name in config.task_types)
            raise NotAllowedError(
                f"Task type `{request.task_type}` is not allowed here (allowed: {allowed}); "
                "to allow it, add it to `task_types` under `[sfp]` in the config file."
            )
        start = request.scheduled_for or now
        if request.until is not None and request.until <= start:
            raise UsageError("`--until` must be after the first run (`--at`, or now).")

    async def create(
        self,
        request: TaskRequest,
        *,
        requester: str,
        channel: str,
        idempotency_key: str,
        now: datetime | None = None,
    ) -> tuple[Operation, bool]:
        """Record the task; the poller submits it. Returns (operation, created)."""
        self._require_client()
        now = now or datetime.now(UTC)
        self.check(request, now=now)
        requirement = self.approval_for(request)
        data = SfpData(approval=requirement.to_state(now=now)) if requirement else SfpData()
        summary = request.task_type
        if request.every:
            summary += f" every {duration_text(request.every)}"
        operation = Operation(
            kind=OpKind.SFP,
            state=OpState.AWAITING_APPROVAL if requirement and requirement.needed else OpState.STARTING,
            step="submit",
            summary=summary[:200],
            params=request.to_params().dump(),
            data=data.dump(),
            requester=requester,
            channel=channel,
            idempotency_key=idempotency_key,
            scheduled_for=request.scheduled_for,
            next_poll_at=now,
            approval_expires_at=(now + requirement.expires_after) if requirement and requirement.needed else None,
        )
        return await repo.insert_operation(self._db, operation=operation)

    # -- reading -------------------------------------------------------------------------------
    async def get(self, ref: str) -> Operation:
        operation = await repo.find_operation(self._db, kind=OpKind.SFP, ref=ref)
        if operation is None or operation.kind != OpKind.SFP:
            raise NotFoundError(f"No sfp task `{ref}`. `/sfp list` shows recent ones.")
        return operation

    async def recent(self, *, channel: str, user: str, limit: int = 15) -> Sequence[Operation]:
        """What a list shows in ``channel`` to ``user``: that channel's, and the user's own anywhere."""
        return await repo.list_operations(self._db, kind=OpKind.SFP, limit=limit, channel=channel, user=user)

    async def target(self, parsed: SfpRef) -> Target:
        """What the ref names; ``op:<id>`` of a task the bot submitted is that operation, so that
        naming a task by its sfp id gives nobody more than its bot ref would."""
        if parsed.operation_id is not None:
            ours = await repo.operation_by_external_id(self._db, kind=OpKind.SFP, external_id=parsed.operation_id)
            return Target(operation=ours, operation_id=parsed.operation_id)
        assert parsed.ref is not None
        if not REF_RE.match(parsed.ref):
            # An operationId: the task the bot submitted under it, or one it did not (like op:<id>).
            found = await repo.find_operation(self._db, kind=OpKind.SFP, ref=parsed.ref)
            return Target(operation=found, operation_id=found.external_id if found else parsed.ref)
        operation = await self.get(parsed.ref)
        return Target(operation=operation, operation_id=operation.external_id)

    async def live_status(self, target: Target) -> TaskStatus | None:
        """The sfp server's status now, or None for a task not submitted yet."""
        if target.operation_id is None:
            return None
        client = self._require_client()
        return await self._mapped(target, "status", lambda: client.status(str(target.operation_id)))

    async def result(self, target: Target) -> TaskStatus:
        operation_id = self._submitted(target)
        client = self._require_client()
        return await self._mapped(target, "result", lambda: client.result(operation_id))

    async def runs(self, target: Target) -> Recurrence:
        if target.operation is not None and not is_recurring(target.operation):
            raise StateError(f"{target.label} is not a recurring task, so it has no runs to list.")
        operation_id = self._submitted(target)
        client = self._require_client()
        return await self._mapped(target, "runs", lambda: client.recurring_instances(operation_id))

    def _submitted(self, target: Target) -> str:
        if target.operation_id is None:
            assert target.operation is not None
            raise StateError(
                f"{target.label} has not been submitted to the sfp server yet "
                f"({target.operation.state.replace('_', ' ')})."
            )
        return target.operation_id

    async def _mapped(self, target: Target, action: str, call: Callable[[], Awaitable[T]]) -> T:
        """The sfp server's 404 and 400 answers as messages a person can act on."""
        self._require_client()
        try:
            return await call()
        except TaskNotFoundError:
            if action in {"stop", "runs"}:
                if target.operation is None:
                    raise NotFoundError(
                        f"The sfp server has no recurring task with operation id `{target.operation_id}` "
                        "(it does not exist, or it is not a recurring task)."
                    ) from None
                raise NotFoundError(
                    f"The sfp server answered that {target.label} (operation `{target.operation_id}`) is not a "
                    "recurring task it knows; it may have expired there."
                ) from None
            if target.operation is None:
                raise NotFoundError(
                    f"The sfp server has no task with operation id `{target.operation_id}`. Check the id; "
                    "results are only kept for a limited time."
                ) from None
            raise NotFoundError(
                f"The sfp server no longer knows {target.label} (operation `{target.operation_id}`); "
                "it keeps tasks for a limited time."
            ) from None
        except ApiError as exc:
            if exc.status == 400 and action == "stop":
                raise StateError(_already_stopped(target)) from None
            if exc.status == 400 and action == "cancel":
                raise StateError(f"{target.label} cannot be cancelled any more: {exc.message}") from None
            raise

    # -- cancel and stop -------------------------------------------------------------------------
    async def cancel(self, target: Target, *, user: str) -> CancelOutcome:
        client = self._require_client()
        op = target.operation
        if op is None:
            cancelled = await self._cancel_call(target, client)
            return CancelOutcome(target=target, text=f"The sfp server answered: {cancelled.message}")
        if op.is_terminal:
            raise StateError(f"{op.ref} already ended ({_state_word(op)}); nothing to cancel.")
        if op.external_id is None:
            # Not submitted yet: withdrawing it is a local change. If the poller is submitting it
            # right now, its save after the POST fails on the state and it cancels the new task.
            done = await repo.update_operation(
                self._db,
                operation_id=op.id or 0,
                expect_states=[OpState.AWAITING_APPROVAL, OpState.STARTING],
                values={
                    "state": OpState.CANCELED,
                    "next_poll_at": datetime.now(UTC),
                    "data": SfpData.of(op).model_copy(update={"cancel_requested_by": user}).dump(),
                },
            )
            if done:
                return CancelOutcome(target=target, text=f"{op.ref} is cancelled; it was never sent to the sfp server.")
            op = await self.get(op.ref)
            target = Target(operation=op, operation_id=op.external_id)
            if op.external_id is None or op.is_terminal:
                raise StateError(f"{op.ref} changed while cancelling ({_state_word(op)}); try again.")
        if is_recurring(op):
            try:
                await client.stop_recurring(op.external_id or "")
            except ApiError as exc:
                if exc.status != 400:  # 400: already stopped or completed, which is what we want
                    raise
            except AmbiguousWriteError:
                pass  # the cancel below and the poller's reading of the runs settle it
            try:
                await client.cancel(op.external_id or "")
                text = f"{op.ref} is stopped: no further runs will start, and the run in progress is being cancelled."
            except (ApiError, AmbiguousWriteError):
                text = f"{op.ref} is stopped: no further runs will start."
        else:
            await self._cancel_call(target, client)
            text = f"The sfp server is cancelling {op.ref}; the card will show when it has stopped."
        await self._request_end(op, cancel_requested_by=user)
        return CancelOutcome(target=target, text=text)

    async def _cancel_call(self, target: Target, client: SfpClient) -> Cancelled:
        operation_id = str(target.operation_id)
        try:
            return await self._mapped(target, "cancel", lambda: client.cancel(operation_id))
        except AmbiguousWriteError:
            # The answer was lost: the status says whether the cancel took effect.
            status = await self._mapped(target, "status", lambda: client.status(operation_id))
            if status.status == "cancelled":
                return Cancelled(message="Task cancelled")
            raise TransientError(
                f"the sfp server did not confirm the cancel of {target.label}; it is {status.status}. Try again.",
                system="sfp",
            ) from None

    async def stop(self, target: Target, *, user: str) -> StopOutcome:
        client = self._require_client()
        op = target.operation
        if op is not None:
            if not is_recurring(op):
                raise StateError(f"{op.ref} is not a recurring task; `/sfp cancel {op.ref}` cancels it.")
            if op.external_id is None:
                raise StateError(
                    f"{op.ref} has not been submitted yet ({_state_word(op)}); `/sfp cancel {op.ref}` withdraws it."
                )
        operation_id = str(target.operation_id)
        try:
            stopped: Stopped | None = await self._mapped(target, "stop", lambda: client.stop_recurring(operation_id))
        except AmbiguousWriteError:
            # Asking again is safe: "already stopped" then means our first request did it.
            try:
                stopped = await self._mapped(target, "stop", lambda: client.stop_recurring(operation_id))
            except StateError:
                stopped = None
        if op is not None:
            record = StopRecord(by=user, at=datetime.now(UTC).isoformat())
            if stopped is not None:
                record = StopRecord(
                    by=user,
                    at=record.at,
                    total_executions=stopped.total_executions,
                    last_execution_at=iso(stopped.last_execution_at),
                    original_end_date=iso(stopped.original_end_date),
                    stopped_at=iso(stopped.stopped_at),
                )
            await self._request_end(op, stop=record)
        return StopOutcome(target=target, stopped=stopped)

    async def _request_end(self, op: Operation, **mark: Any) -> None:
        """Move a running task to ``canceling`` with who asked; the poller sees it through.

        The state change (not just a data write) keeps the poller from overwriting the mark with
        a copy of ``data`` it read before: its saves are conditioned on the old state.
        """
        for _ in range(3):
            fresh = await repo.get_operation(self._db, operation_id=op.id or 0)
            if fresh is None or fresh.is_terminal:
                return
            done = await repo.update_operation(
                self._db,
                operation_id=op.id or 0,
                expect_states=[fresh.state],
                values={
                    "state": OpState.CANCELING,
                    "next_poll_at": datetime.now(UTC),
                    "data": SfpData.of(fresh).model_copy(update=mark).dump(),
                },
            )
            if done:
                return
        log.warning("%s: could not record the end request; the poller will still see it on the sfp server", op.ref)


def _state_word(op: Operation) -> str:
    return {OpState.CANCELED: "cancelled", OpState.CANCELING: "cancelling", OpState.SUCCEEDED: "completed"}.get(
        OpState(op.state), op.state.replace("_", " ")
    )


def _already_stopped(target: Target) -> str:
    op = target.operation
    stop = SfpData.of(op).stop if op is not None else None
    when = stop.when if stop is not None else None
    if when is not None:
        return (
            f"{target.label} is already stopped (since {when:%Y-%m-%d %H:%M} UTC); no further runs will start. "
            f"`/sfp runs {target.label if op is not None else 'op:' + str(target.operation_id)}` lists its runs."
        )
    return f"{target.label} is already stopped, or it has completed; no further runs will start."
