"""sfp server tasks (SPEC §6): record, submit once, follow, cancel, stop, list runs.

A task is an Operation of kind ``sfp`` (refs S1, S2 …). The handler records it (waiting for
approval when a rule matches, otherwise starting); the poller's ``advance`` submits it, and only
once:

    starting/submit ──POST──► scheduled | running ──status / recurring-instances──► done
          │                         │
          │ (answer lost)           └─ cancel/stop requested ──► canceling ──► done
          ▼
        error ("may have reached the sfp server")

Before the POST the attempt is recorded; the operationId is recorded the moment it is known,
before anything else. The Tasks API has no idempotency key and no way to list tasks, so an
attempt whose answer was lost (a dropped connection, a 5xx, the bot killed mid-call) is never
sent again: the operation ends in ``error`` and says so, instead of risking a second task.
Only a refusal before any work (no connection, 429, 503) is retried.

Results and errors are stored with secret-looking fields removed (``sfdxAuthUrl``, tokens,
``force://`` URLs …): they are shown in Slack and kept in the database.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import aiohttp

from bot.clients.retry import RetryPolicy
from bot.clients.sfp import Cancelled, Recurrence, SfpClient, Stopped, TaskSpec, TaskStatus
from bot.core.approvals import ApprovalFacts, ApprovalRequirement, requirement_for
from bot.core.grammar import REF_RE
from bot.core.lifecycle import LeasedWrites
from bot.core.operations import Advance, OpEvent, OpFile
from bot.errors import (
    AmbiguousWriteError,
    ApiError,
    AuthError,
    NotAllowedError,
    NotFoundError,
    StateError,
    TaskNotFoundError,
    TransientError,
    UpstreamError,
    UsageError,
)
from bot.redaction import csv_bytes, redact, redact_text
from bot.settings import Settings
from bot.sfp.commands import SFP_USAGE, SfpRef
from bot.store import repo
from bot.store.db import Database
from bot.store.models import Operation, OpKind, OpState

log = logging.getLogger(__name__)

T = TypeVar("T")

# Status calls in flight at once per poll cycle (the API has no batch read): 300 running tasks
# at 50 ms a call are read in about half a second.
FETCH_CONCURRENCY = 32
MAX_NEW_RUN_REPLIES = 10  # per cycle; a backlog of runs is summarised in one reply
MAX_STORED_RUNS = 500
MAX_STORED_RESULT = 200_000  # characters of JSON kept in the database
INLINE_RESULT_CHARS = 1800  # longer results are attached as a file
INLINE_RESULT_LINES = 30
NOT_CONFIGURED = "The sfp server is not configured for this bot: set `[sfp] url` in the config file and `SFP_TOKEN`."
NO_TASK_TYPES = (
    "No sfp task types are allowed yet, so `/sfp submit` is refused: add "
    '`task_types = ["fetchReviewEnvironment", …]` under `[sfp]` in the config file '
    '(`["*"]` allows every type).'
)
_ACTIVE = {OpState.SCHEDULED, OpState.RUNNING, OpState.CANCELING}


# -- plain data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskRequest:
    """A task as the user asked for it, with times already resolved."""

    task_type: str
    data: dict[str, Any]
    priority: str = "low"
    scheduled_for: datetime | None = None
    every: timedelta | None = None
    until: datetime | None = None
    retries: int | None = None
    shortcut: str | None = None

    @property
    def recurring(self) -> bool:
        return self.every is not None

    def to_params(self) -> dict[str, Any]:
        return {
            "type": self.task_type,
            "data": self.data,
            "priority": self.priority,
            "scheduled_for": self.scheduled_for.isoformat() if self.scheduled_for else None,
            "every_seconds": int(self.every.total_seconds()) if self.every else None,
            "until": self.until.isoformat() if self.until else None,
            "retries": self.retries,
            "shortcut": self.shortcut,
        }


def spec_from_params(params: dict[str, Any]) -> TaskSpec:
    every = params.get("every_seconds")
    return TaskSpec(
        type=str(params["type"]),
        data=dict(params.get("data") or {}),
        priority=str(params.get("priority") or "low"),
        scheduled_for=_parse(params.get("scheduled_for")),
        every_ms=int(every) * 1000 if every else None,
        end_date=_parse(params.get("until")),
        max_retries=params.get("retries"),
        # The docs give no default delay between attempts; 5 s lets a flaky pool or org recover.
        retry_delay_ms=5000 if params.get("retries") else None,
    )


def is_recurring(op: Operation) -> bool:
    return bool(op.params.get("every_seconds"))


@dataclass(frozen=True)
class Target:
    """What a ``status|result|cancel|stop|runs`` names: one of ours, or a bare operation id."""

    operation: Operation | None
    operation_id: str | None

    @property
    def label(self) -> str:
        if self.operation is not None:
            return self.operation.ref
        return f"operation `{self.operation_id}`"


@dataclass(frozen=True)
class CancelOutcome:
    target: Target
    text: str  # what happened, in a sentence


@dataclass(frozen=True)
class StopOutcome:
    target: Target
    stopped: Stopped | None  # None when the answer was lost but the task is stopped


# -- result size (redaction: bot.redaction) --------------------------------------------------------------------


def result_json(result: Any) -> str:
    if isinstance(result, str):
        return result
    return json.dumps(result, indent=2, ensure_ascii=False, default=str)


def is_long_result(result: Any) -> bool:
    text = result_json(result)
    return len(text) > INLINE_RESULT_CHARS or text.count("\n") >= INLINE_RESULT_LINES


def stored_result(data: dict[str, Any]) -> Any:
    """The result as kept in ``Operation.data`` (possibly cut to MAX_STORED_RESULT characters)."""
    if "result_text" in data:
        return data["result_text"]
    return data.get("result")


def _storable_result(result: Any) -> dict[str, Any]:
    cleaned = redact(result)
    text = result_json(cleaned)
    if len(text) > MAX_STORED_RESULT:
        return {"result_text": text[:MAX_STORED_RESULT] + "\n… (cut: the result is larger than the bot keeps)"}
    return {"result": cleaned}


def _parse(value: Any) -> datetime | None:
    if not value:
        return None
    moment = datetime.fromisoformat(str(value))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat() if moment else None


# -- the service ----------------------------------------------------------------------------------


class SfpService:
    def __init__(self, *, db: Database, settings: Settings, client: SfpClient | None) -> None:
        self._db = db
        self._settings = settings
        self._client = client
        self._writes = LeasedWrites(db)

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
            raise UsageError("`--until` must be after the first run (`--at`, or now).", usage=SFP_USAGE)

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
        data: dict[str, Any] = {}
        if requirement:
            data["approval"] = requirement.to_data(now=now)
        summary = request.task_type
        if request.every:
            summary += f" every {_duration_text(request.every)}"
        operation = Operation(
            kind=OpKind.SFP,
            state=OpState.AWAITING_APPROVAL if requirement and requirement.needed else OpState.STARTING,
            step="submit",
            summary=summary[:200],
            params=request.to_params(),
            data=data,
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
                    "data": {**op.data, "cancel_requested_by": user},
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
        await self._request_end(op, mark={"cancel_requested_by": user})
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
            record: dict[str, Any] = {"by": user, "at": datetime.now(UTC).isoformat()}
            if stopped is not None:
                record.update(
                    {
                        "total_executions": stopped.total_executions,
                        "last_execution_at": _iso(stopped.last_execution_at),
                        "original_end_date": _iso(stopped.original_end_date),
                        "stopped_at": _iso(stopped.stopped_at),
                    }
                )
            await self._request_end(op, mark={"stop": record})
        return StopOutcome(target=target, stopped=stopped)

    async def _request_end(self, op: Operation, *, mark: dict[str, Any]) -> None:
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
                values={"state": OpState.CANCELING, "next_poll_at": datetime.now(UTC), "data": {**fresh.data, **mark}},
            )
            if done:
                return
        log.warning("%s: could not record the end request; the poller will still see it on the sfp server", op.ref)

    # -- the poller's side -------------------------------------------------------------------------
    async def advance(self, operations: Sequence[Operation], *, lease_token: str) -> dict[int, Advance]:
        results: dict[int, Advance] = {}
        watching: list[Operation] = []
        for op in operations:
            assert op.id is not None
            try:
                if op.state == OpState.AWAITING_APPROVAL:
                    results[op.id] = await self._writes.check_expiry(op, lease_token)
                elif op.state == OpState.STARTING:
                    results[op.id] = await self._submit(op, lease_token)
                elif op.state in _ACTIVE:
                    watching.append(op)
                else:
                    results[op.id] = Advance()
            except AuthError as exc:
                results[op.id] = await self._writes.transient(op, lease_token, exc, delay=120)
            except TransientError as exc:
                results[op.id] = await self._writes.transient(op, lease_token, exc)
        if watching:
            results.update(await self._watch(watching, lease_token))
        return results

    async def _submit(self, op: Operation, lease_token: str) -> Advance:
        if self._client is None:
            await self._writes.save(op, lease_token, state=OpState.ERROR, data={**op.data, "error": NOT_CONFIGURED})
            return Advance(events=[OpEvent("error")])
        attempt = op.data.get("submit") or {}
        if attempt.get("state") == "sending":
            # An earlier attempt sent the POST and never learned the answer (the bot stopped, or
            # the lease moved on). The task may exist; submitting again could run it twice.
            await self._writes.save(
                op,
                lease_token,
                state=OpState.ERROR,
                data={**op.data, "error": _uncertain_text(op), "submit": {**attempt, "state": "uncertain"}},
            )
            return Advance(events=[OpEvent("error")])
        sending = {**op.data, "submit": {"state": "sending", "at": datetime.now(UTC).isoformat()}}
        if not await self._writes.save(op, lease_token, data=sending):
            return Advance()
        spec = spec_from_params(op.params)
        try:
            submitted = await self._client.submit(spec)
        except AmbiguousWriteError as exc:
            log.warning("%s: submit outcome unknown: %s", op.ref, exc.message)
            await self._writes.save(
                op,
                lease_token,
                state=OpState.ERROR,
                data={**op.data, "error": _uncertain_text(op), "submit": {**sending["submit"], "state": "uncertain"}},
            )
            return Advance(events=[OpEvent("error")])
        except ApiError as exc:
            await self._writes.save(
                op,
                lease_token,
                state=OpState.ERROR,
                data={
                    **op.data,
                    "error": f"The sfp server refused the task: {redact_text(exc.message)}",
                    "submit": {**sending["submit"], "state": "refused", "status": exc.status},
                },
            )
            return Advance(events=[OpEvent("error")])
        except (TransientError, AuthError):
            # Refused before any work was done (no connection, 401, 429, 503): safe to send again.
            await self._writes.save(op, lease_token, data={**op.data, "submit": {"state": "not_sent"}})
            raise
        # The operation id first, before anything else can go wrong.
        now = datetime.now(UTC)
        scheduled = op.scheduled_for is not None and _aware(op.scheduled_for) > now
        saved = await self._writes.save(
            op,
            lease_token,
            external_id=submitted.operation_id,
            state=OpState.SCHEDULED if scheduled else OpState.RUNNING,
            step="",
            data={
                **op.data,
                "submit": {"state": "accepted", "at": now.isoformat()},
                "status": "pending",
                "progress": 0,
            },
        )
        if not saved:
            await self._orphaned(op, submitted.operation_id)
            return Advance()
        # The card shows the operation id; only a start time worth knowing gets a thread reply.
        return Advance(events=[OpEvent("scheduled")] if scheduled else [], next_poll_in=1.0)

    async def _orphaned(self, op: Operation, operation_id: str) -> None:
        """Cancelled (or taken over) while the POST was in flight: do not leave the task running."""
        fresh = await repo.get_operation(self._db, operation_id=op.id or 0)
        if fresh is None:
            return
        if fresh.external_id is None:
            # Whatever happened meanwhile, the operation id is worth keeping for the person reading it.
            await repo.update_operation(
                self._db, operation_id=op.id or 0, expect_states=[fresh.state], values={"external_id": operation_id}
            )
        if fresh.state != OpState.CANCELED:
            log.warning("%s: lost the lease while submitting; it is operation %s", op.ref, operation_id)
            return
        assert self._client is not None
        try:
            if is_recurring(op):
                await self._client.stop_recurring(operation_id)
            await self._client.cancel(operation_id)
        except (UpstreamError, UsageError) as exc:
            log.warning("%s: could not cancel task %s submitted while cancelling: %s", op.ref, operation_id, exc)

    async def _watch(self, operations: list[Operation], lease_token: str) -> dict[int, Advance]:
        """One read per task (the API has no batch read), a few in flight at once."""
        assert self._client is not None or not operations
        now = datetime.now(UTC)
        results: dict[int, Advance] = {}
        due: list[Operation] = []
        for op in operations:
            assert op.id is not None
            start = _aware(op.scheduled_for) if op.scheduled_for else None
            if op.state == OpState.SCHEDULED and start is not None and (start - now).total_seconds() > 2.0:
                # Nothing happens before its start time; look in now and then in case it was
                # cancelled on the server itself.
                results[op.id] = Advance(next_poll_in=max(1.0, min((start - now).total_seconds() - 1.0, 300.0)))
                continue
            due.append(op)
        if not due:
            return results
        client = self._require_client()
        gate = asyncio.Semaphore(FETCH_CONCURRENCY)

        async def read(op: Operation) -> TaskStatus | Recurrence | UpstreamError:
            async with gate:
                try:
                    if is_recurring(op):
                        return await client.recurring_instances(op.external_id or "")
                    return await client.status(op.external_id or "")
                except UpstreamError as exc:
                    return exc

        answers = await asyncio.gather(*(read(op) for op in due))
        progress: list[dict[str, Any]] = []  # plain progress of many tasks: saved in one statement
        try:
            for op, answer in zip(due, answers, strict=True):
                results[op.id or 0] = await self._observe(op, lease_token, client, answer, now, progress=progress)
        finally:
            await self._writes.save_many(progress)
        return results

    async def _observe(
        self,
        op: Operation,
        lease_token: str,
        client: SfpClient,
        answer: TaskStatus | Recurrence | UpstreamError,
        now: datetime,
        *,
        progress: list[dict[str, Any]],
    ) -> Advance:
        try:
            if isinstance(answer, UpstreamError):
                raise answer
            if isinstance(answer, Recurrence):
                return await self._observe_runs(op, lease_token, answer, now)
            return await self._observe_task(op, lease_token, client, answer, now, progress=progress)
        except TaskNotFoundError:
            return await self._lost(op, lease_token)
        except AuthError as exc:
            return await self._writes.transient(op, lease_token, exc, delay=120)
        except UpstreamError as exc:
            # Timeouts, 5xx, and odd answers alike: keep the task as it is and read it again later.
            return await self._writes.transient(op, lease_token, exc)

    async def _lost(self, op: Operation, lease_token: str) -> Advance:
        text = (
            f"The sfp server no longer knows operation {op.external_id} (404); "
            "it may have expired there. The bot stopped following it."
        )
        await self._writes.save(op, lease_token, state=OpState.ERROR, data={**op.data, "error": text})
        return Advance(events=[OpEvent("error")])

    async def _observe_task(
        self,
        op: Operation,
        lease_token: str,
        client: SfpClient,
        status: TaskStatus,
        now: datetime,
        *,
        progress: list[dict[str, Any]],
    ) -> Advance:
        data = _clean(op.data)
        events: list[OpEvent] = []
        data["status"], data["progress"] = status.status, status.progress
        if status.current_step:
            data["current_step"] = redact_text(status.current_step)
        if status.attempts_made is not None:
            previous = int(op.data.get("attempts_made") or 0)
            data["attempts_made"] = status.attempts_made
            # A retry is under way when attempts were made, the last one failed, and it is not over.
            if status.attempts_made > previous and status.error is not None and not status.is_terminal:
                message = redact_text(status.error.message) if status.error else ""
                events.append(OpEvent("retrying", {"attempt": status.attempts_made + 1, "message": message}))
        if status.status == "active" and not data.get("started_at"):
            data["started_at"] = now.isoformat()
            if op.state == OpState.SCHEDULED:  # news only for a task that waited for its time
                events.append(OpEvent("started"))
        final: OpState | None = None
        if status.status == "completed":
            full = await client.result(op.external_id or "")  # raises → transient: read again next cycle
            data.update(_storable_result(full.result))
            data["progress"] = 100
            final = OpState.SUCCEEDED
        elif status.status == "failed":
            error = status.error
            data["task_error"] = {
                "message": redact_text(error.message) if error else "",
                "stack": redact_text(error.stack) if error else "",
            }
            final = OpState.FAILED
        elif status.status == "cancelled":
            final = OpState.CANCELED
        if final is not None:
            data["finished_at"] = now.isoformat()
            await self._writes.save(op, lease_token, state=final, data=data)
            return Advance(events=events)
        state = op.state
        if op.state == OpState.SCHEDULED and status.status == "active":
            state = OpState.RUNNING
        if state != op.state or data != op.data:  # an idle cycle writes nothing
            progress.append(self._writes.pending_save(op, lease_token, state=state, data=data))
        if op.state == OpState.CANCELING:
            return Advance(events=events, next_poll_in=1.0)
        since = _parse(data.get("started_at")) or now
        elapsed = (now - since).total_seconds()
        # Seconds at first, then less often as a task runs long (a minute at most).
        return Advance(events=events, next_poll_in=max(1.0, min(elapsed / 10.0, 60.0)))

    async def _observe_runs(self, op: Operation, lease_token: str, rec: Recurrence, now: datetime) -> Advance:
        data = _clean(op.data)
        events: list[OpEvent] = []
        below = int(data.get("reported_below") or 1)
        extra = {int(n) for n in data.get("reported_extra") or []}
        counts: dict[str, int] = dict(data.get("run_counts") or {})
        runs: list[dict[str, Any]] = list(data.get("runs") or [])
        fresh = [i for i in rec.instances if i.is_terminal and i.number >= below and i.number not in extra]
        for position, instance in enumerate(fresh):
            detail = {
                "number": instance.number,
                "status": instance.status,
                "message": redact_text(instance.error.message) if instance.error else "",
                "started_at": _iso(instance.started_at),
                "finished_at": _iso(instance.finished_at),
                "operation_id": instance.operation_id,
            }
            if position < MAX_NEW_RUN_REPLIES:
                events.append(OpEvent("run", detail))
            counts[instance.status] = counts.get(instance.status, 0) + 1
            runs.append(detail)
            extra.add(instance.number)
        if len(fresh) > MAX_NEW_RUN_REPLIES:
            events.append(OpEvent("runs_backlog", {"more": len(fresh) - MAX_NEW_RUN_REPLIES}))
        while below in extra:
            extra.discard(below)
            below += 1
        data["reported_below"], data["reported_extra"] = below, sorted(extra)
        data["run_counts"], data["runs"] = counts, runs[-MAX_STORED_RUNS:]
        pending = [i for i in rec.instances if not i.is_terminal]
        current = pending[-1] if pending else None
        data["current_run"] = (
            {"number": current.number, "status": current.status, "progress": current.progress} if current else None
        )
        numbers = [i.number for i in rec.instances]
        data["total_runs"] = max([rec.total_executions or 0, *numbers]) if numbers or rec.total_executions else 0
        data["next_run_at"] = _iso(rec.next_execution_at)
        data["end_date"] = _iso(rec.end_date) or op.params.get("until")
        if rec.stopped_at is not None:
            data["stopped_at"] = _iso(rec.stopped_at)
        active = rec.active
        if active is None:
            active = rec.stopped_at is None and (rec.end_date is None or now < rec.end_date or bool(pending))
        data["active"] = active
        state = op.state
        if op.state == OpState.SCHEDULED and any(i.status != "pending" for i in rec.instances):
            state = OpState.RUNNING
        if not active and not pending:
            total = sum(counts.values())
            stopped = "stop" in data or "stopped_at" in data
            if data.get("cancel_requested_by") or (total == 0 and stopped):
                final = OpState.CANCELED
            elif counts.get("failed"):
                final = OpState.FAILED
            else:
                final = OpState.SUCCEEDED
            data["finished_at"] = now.isoformat()
            events.append(OpEvent("ended", {"reason": "stopped" if stopped else "end_date", "total": total}))
            await self._writes.save(op, lease_token, state=final, data=data)
            return Advance(events=events)
        if state != op.state or data != op.data:
            await self._writes.save(op, lease_token, state=state, data=data)
        if current is not None and current.status == "active":
            delay = 2.0
        elif rec.next_execution_at is not None:
            delay = (rec.next_execution_at - now).total_seconds() + 0.5
        else:
            delay = 5.0
        return Advance(events=events, next_poll_in=max(1.0, min(delay, 60.0)))

    # -- completion ----------------------------------------------------------------------------
    async def completion_files(self, operation: Operation) -> list[OpFile]:
        data = operation.data
        files: list[OpFile] = []
        result = stored_result(data)
        if operation.state == OpState.SUCCEEDED and result is not None and is_long_result(result):
            files.append(
                OpFile(
                    name=f"sfp-{operation.ref}-result.json",
                    title=f"{operation.ref} result ({operation.params.get('type')})",
                    content=result_json(result).encode(),
                )
            )
        error = data.get("task_error") or {}
        if error.get("stack"):
            files.append(
                OpFile(
                    name=f"sfp-{operation.ref}-error.txt",
                    title=f"{operation.ref} error",
                    content=f"{error.get('message', '')}\n\n{error['stack']}".encode(),
                )
            )
        runs = data.get("runs") or []
        if runs:
            runs_csv = csv_bytes(
                header=["run", "status", "started_at", "finished_at", "error", "operation_id"],
                rows=(
                    [
                        run.get("number"),
                        run.get("status"),
                        run.get("started_at") or "",
                        run.get("finished_at") or "",
                        run.get("message") or "",
                        run.get("operation_id") or "",
                    ]
                    for run in runs
                ),
            )
            files.append(
                OpFile(
                    name=f"sfp-{operation.ref}-runs.csv",
                    title=f"{operation.ref} runs ({len(runs)})",
                    content=runs_csv,
                )
            )
        return files


def _clean(data: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if key not in {"transient_failures", "last_problem"}}


def _state_word(op: Operation) -> str:
    return {OpState.CANCELED: "cancelled", OpState.CANCELING: "cancelling", OpState.SUCCEEDED: "completed"}.get(
        OpState(op.state), op.state.replace("_", " ")
    )


def _already_stopped(target: Target) -> str:
    op = target.operation
    stop = (op.data.get("stop") if op is not None else None) or {}
    when = _parse(stop.get("stopped_at") or stop.get("at"))
    if when is not None:
        return (
            f"{target.label} is already stopped (since {when:%Y-%m-%d %H:%M} UTC); no further runs will start. "
            f"`/sfp runs {target.label if op is not None else 'op:' + str(target.operation_id)}` lists its runs."
        )
    return f"{target.label} is already stopped, or it has completed; no further runs will start."


def _uncertain_text(op: Operation) -> str:
    return (
        f"The bot sent {op.ref} to the sfp server but never got its answer, so the task may or may not exist "
        "there. It is not sent again automatically (that could run it twice): check the sfp server, and submit "
        "it again only if it is not there."
    )


def _duration_text(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def duration_text(delta: timedelta) -> str:
    return _duration_text(delta)
