"""What the poller does with sfp tasks: submit each once, then follow it (``KindSteps``).

The shared skeleton (``bot.core.advance.KindAdvancer``) applies approvals, expires old requests,
decides how many start at once and backs off on upstream trouble; these steps only know sfp:

    starting ──POST──► scheduled | running ──status / recurring-instances──► done
        │                       │
        │ (answer lost)         └─ cancel/stop requested ──► canceling ──► done
        ▼
      error ("may have reached the sfp server")

Before the POST the attempt is recorded; the operationId is recorded the moment it is known,
before anything else. The Tasks API has no idempotency key and no way to list tasks, so an
attempt whose answer was lost (a dropped connection, a 5xx, the bot killed mid-call) is never
sent again: the operation ends in ``error`` and says so, instead of risking a second task.
Only a refusal before any work (no connection, 401, 429, 503) is retried, by the skeleton.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from bot.clients.sfp import Recurrence, SfpClient, TaskStatus
from bot.core.lifecycle import LeasedWrites
from bot.core.operations import Advance, OpEvent, OpFile
from bot.core.when import aware
from bot.errors import (
    AmbiguousWriteError,
    ApiError,
    AuthError,
    StateError,
    TaskNotFoundError,
    TransientError,
    UpstreamError,
    UsageError,
)
from bot.redaction import csv_bytes, redact_text
from bot.sfp.payloads import (
    CurrentRun,
    RunRecord,
    SfpData,
    SubmitAttempt,
    TaskError,
    is_long_result,
    iso,
    params_of,
    parse_iso,
    result_json,
)
from bot.store import repo
from bot.store.db import Database
from bot.store.models import Operation, OpState

log = logging.getLogger(__name__)

# Status calls in flight at once per poll cycle (the API has no batch read): 300 running tasks
# at 50 ms a call are read in about half a second.
FETCH_CONCURRENCY = 32
MAX_NEW_RUN_REPLIES = 10  # per cycle; a backlog of runs is summarised in one reply
MAX_STORED_RUNS = 500
NOT_CONFIGURED = "The sfp server is not configured for this bot: set `[sfp] url` in the config file and `SFP_TOKEN`."


class SfpSteps:
    """The sfp kind's part of the poller's one ``advance``."""

    start_states = frozenset({OpState.STARTING.value})
    watch_states = frozenset({OpState.SCHEDULED.value, OpState.RUNNING.value, OpState.CANCELING.value})

    def __init__(self, *, db: Database, client: SfpClient | None) -> None:
        self._db = db
        self._client = client
        self._writes = LeasedWrites(db)

    async def settle(self, operation: Operation, lease_token: str) -> Advance:
        return Advance()

    async def refuse(self, operation: Operation, lease_token: str, message: str) -> Advance:
        return await self._fail(operation, lease_token, SfpData.of(operation), message)

    async def _fail(self, op: Operation, lease_token: str, data: SfpData, error: str) -> Advance:
        data.error = error
        await self._writes.save(op, lease_token, state=OpState.ERROR, data=data.dump())
        return Advance(events=[OpEvent("error")])

    # -- submitting --------------------------------------------------------------------------------
    async def start(self, operation: Operation, lease_token: str) -> Advance:
        op = operation
        data = SfpData.of(op)
        if self._client is None:
            return await self._fail(op, lease_token, data, NOT_CONFIGURED)
        attempt = data.submit
        if attempt is not None and attempt.state == "sending":
            # An earlier attempt sent the POST and never learned the answer (the bot stopped, or
            # the lease moved on). The task may exist; submitting again could run it twice.
            data.submit = attempt.model_copy(update={"state": "uncertain"})
            return await self._fail(op, lease_token, data, _uncertain_text(op))
        sending = SubmitAttempt(state="sending", at=datetime.now(UTC).isoformat())
        data.submit = sending
        if not await self._writes.save(op, lease_token, data=data.dump()):
            return Advance()
        data = SfpData.of(op)
        try:
            submitted = await self._client.submit(params_of(op).spec())
        except AmbiguousWriteError as exc:
            log.warning("%s: submit outcome unknown: %s", op.ref, exc.message)
            data.submit = sending.model_copy(update={"state": "uncertain"})
            return await self._fail(op, lease_token, data, _uncertain_text(op))
        except ApiError as exc:
            data.submit = sending.model_copy(update={"state": "refused", "status": exc.status})
            return await self._fail(
                op, lease_token, data, f"The sfp server refused the task: {redact_text(exc.message)}"
            )
        except (TransientError, AuthError):
            # Refused before any work was done (no connection, 401, 429, 503): safe to send again.
            data.submit = SubmitAttempt(state="not_sent")
            await self._writes.save(op, lease_token, data=data.dump())
            raise
        # The operation id first, before anything else can go wrong.
        now = datetime.now(UTC)
        scheduled = op.scheduled_for is not None and aware(op.scheduled_for) > now
        data.submit = SubmitAttempt(state="accepted", at=now.isoformat())
        data.status, data.progress = "pending", 0
        saved = await self._writes.save(
            op,
            lease_token,
            external_id=submitted.operation_id,
            state=OpState.SCHEDULED if scheduled else OpState.RUNNING,
            step="",
            data=data.dump(),
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
            if params_of(op).recurring:
                await self._client.stop_recurring(operation_id)
            await self._client.cancel(operation_id)
        except (UpstreamError, UsageError) as exc:
            log.warning("%s: could not cancel task %s submitted while cancelling: %s", op.ref, operation_id, exc)

    # -- following ------------------------------------------------------------------------------------
    async def watch(self, operations: Sequence[Operation], lease_token: str) -> Mapping[int, Advance | BaseException]:
        """One read per task (the API has no batch read), a few in flight at once."""
        now = datetime.now(UTC)
        results: dict[int, Advance | BaseException] = {}
        due: list[Operation] = []
        for op in operations:
            assert op.id is not None
            start = aware(op.scheduled_for) if op.scheduled_for else None
            if op.state == OpState.SCHEDULED and start is not None and (start - now).total_seconds() > 2.0:
                # Nothing happens before its start time; look in now and then in case it was
                # cancelled on the server itself.
                results[op.id] = Advance(next_poll_in=max(1.0, min((start - now).total_seconds() - 1.0, 300.0)))
                continue
            due.append(op)
        if not due:
            return results
        client = self._client
        if client is None:
            # The configuration lost its sfp server while tasks ran there: keep them as they are.
            return {**results, **{op.id or 0: StateError(NOT_CONFIGURED) for op in due}}
        gate = asyncio.Semaphore(FETCH_CONCURRENCY)

        async def read(op: Operation) -> TaskStatus | Recurrence | UpstreamError:
            async with gate:
                try:
                    if params_of(op).recurring:
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
    ) -> Advance | BaseException:
        """Timeouts, 5xx and odd answers alike are returned: the skeleton keeps the task and reads again later."""
        try:
            if isinstance(answer, UpstreamError):
                raise answer
            if isinstance(answer, Recurrence):
                return await self._observe_runs(op, lease_token, answer, now)
            return await self._observe_task(op, lease_token, client, answer, now, progress=progress)
        except TaskNotFoundError:
            return await self._lost(op, lease_token)
        except UpstreamError as exc:
            return exc
        except Exception as exc:  # a bug with one task must not stop following the others
            return exc

    async def _lost(self, op: Operation, lease_token: str) -> Advance:
        text = (
            f"The sfp server no longer knows operation {op.external_id} (404); "
            "it may have expired there. The bot stopped following it."
        )
        return await self._fail(op, lease_token, SfpData.of(op), text)

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
        data = SfpData.of(op)
        events: list[OpEvent] = []
        data.status, data.progress = status.status, status.progress
        if status.current_step:
            data.current_step = redact_text(status.current_step)
        if status.attempts_made is not None:
            previous = data.attempts_made or 0
            data.attempts_made = status.attempts_made
            # A retry is under way when attempts were made, the last one failed, and it is not over.
            if status.attempts_made > previous and status.error is not None and not status.is_terminal:
                message = redact_text(status.error.message)
                events.append(OpEvent("retrying", {"attempt": status.attempts_made + 1, "message": message}))
        if status.status == "active" and not data.started_at:
            data.started_at = now.isoformat()
            if op.state == OpState.SCHEDULED:  # news only for a task that waited for its time
                events.append(OpEvent("started"))
        final: OpState | None = None
        if status.status == "completed":
            full = await client.result(op.external_id or "")  # raises → transient: read again next cycle
            data.keep_result(full.result)
            data.progress = 100
            final = OpState.SUCCEEDED
        elif status.status == "failed":
            error = status.error
            data.task_error = TaskError(
                message=redact_text(error.message) if error else "", stack=redact_text(error.stack) if error else ""
            )
            final = OpState.FAILED
        elif status.status == "cancelled":
            final = OpState.CANCELED
        if final is not None:
            data.finished_at = now.isoformat()
            await self._writes.save(op, lease_token, state=final, data=data.dump())
            return Advance(events=events)
        state = op.state
        if op.state == OpState.SCHEDULED and status.status == "active":
            state = OpState.RUNNING
        fresh = data.progress_dump()
        if state != op.state or fresh != op.data:  # an idle cycle writes nothing
            progress.append(self._writes.pending_save(op, lease_token, state=state, data=fresh))
        if op.state == OpState.CANCELING:
            return Advance(events=events, next_poll_in=1.0)
        since = parse_iso(data.started_at) or now
        elapsed = (now - since).total_seconds()
        # Seconds at first, then less often as a task runs long (a minute at most).
        return Advance(events=events, next_poll_in=max(1.0, min(elapsed / 10.0, 60.0)))

    async def _observe_runs(self, op: Operation, lease_token: str, rec: Recurrence, now: datetime) -> Advance:
        data = SfpData.of(op)
        events: list[OpEvent] = []
        below = data.reported_below or 1
        extra = set(data.reported_extra)
        counts = dict(data.run_counts or {})
        runs = list(data.runs)
        fresh = [i for i in rec.instances if i.is_terminal and i.number >= below and i.number not in extra]
        for position, instance in enumerate(fresh):
            run = RunRecord(
                number=instance.number,
                status=instance.status,
                message=redact_text(instance.error.message) if instance.error else "",
                started_at=iso(instance.started_at),
                finished_at=iso(instance.finished_at),
                operation_id=instance.operation_id,
            )
            if position < MAX_NEW_RUN_REPLIES:
                events.append(OpEvent("run", run.dump()))
            counts[instance.status] = counts.get(instance.status, 0) + 1
            runs.append(run)
            extra.add(instance.number)
        if len(fresh) > MAX_NEW_RUN_REPLIES:
            events.append(OpEvent("runs_backlog", {"more": len(fresh) - MAX_NEW_RUN_REPLIES}))
        while below in extra:
            extra.discard(below)
            below += 1
        data.reported_below, data.reported_extra = below, sorted(extra)
        data.run_counts, data.runs = counts, runs[-MAX_STORED_RUNS:]
        pending = [i for i in rec.instances if not i.is_terminal]
        current = pending[-1] if pending else None
        data.current_run = (
            CurrentRun(number=current.number, status=current.status, progress=current.progress) if current else None
        )
        numbers = [i.number for i in rec.instances]
        data.total_runs = max([rec.total_executions or 0, *numbers]) if numbers or rec.total_executions else 0
        data.next_run_at = iso(rec.next_execution_at)
        data.end_date = iso(rec.end_date) or params_of(op).until
        if rec.stopped_at is not None:
            data.stopped_at = iso(rec.stopped_at)
        active = rec.active
        if active is None:
            active = rec.stopped_at is None and (rec.end_date is None or now < rec.end_date or bool(pending))
        data.active = active
        state = op.state
        if op.state == OpState.SCHEDULED and any(i.status != "pending" for i in rec.instances):
            state = OpState.RUNNING
        if not active and not pending:
            total = sum(counts.values())
            if data.cancel_requested_by or (total == 0 and data.stopped):
                final = OpState.CANCELED
            elif counts.get("failed"):
                final = OpState.FAILED
            else:
                final = OpState.SUCCEEDED
            data.finished_at = now.isoformat()
            events.append(OpEvent("ended", {"reason": "stopped" if data.stopped else "end_date", "total": total}))
            await self._writes.save(op, lease_token, state=final, data=data.dump())
            return Advance(events=events)
        if state != op.state or data.progress_dump() != op.data:
            await self._writes.save(op, lease_token, state=state, data=data.dump())
        if current is not None and current.status == "active":
            delay = 2.0
        elif rec.next_execution_at is not None:
            delay = (rec.next_execution_at - now).total_seconds() + 0.5
        else:
            delay = 5.0
        return Advance(events=events, next_poll_in=max(1.0, min(delay, 60.0)))

    # -- completion ----------------------------------------------------------------------------------
    async def completion_files(self, operation: Operation) -> list[OpFile]:
        data, ref = SfpData.of(operation), operation.ref
        files: list[OpFile] = []
        result = data.stored_result
        if operation.state == OpState.SUCCEEDED and result is not None and is_long_result(result):
            title = f"{ref} result ({params_of(operation).type})"
            files.append(OpFile(name=f"sfp-{ref}-result.json", title=title, content=result_json(result).encode()))
        error = data.task_error
        if error is not None and error.stack:
            content = f"{error.message}\n\n{error.stack}".encode()
            files.append(OpFile(name=f"sfp-{ref}-error.txt", title=f"{ref} error", content=content))
        if data.runs:
            runs_csv = csv_bytes(
                header=["run", "status", "started_at", "finished_at", "error", "operation_id"],
                rows=(
                    [
                        run.number,
                        run.status,
                        run.started_at or "",
                        run.finished_at or "",
                        run.message,
                        run.operation_id or "",
                    ]
                    for run in data.runs
                ),
            )
            files.append(OpFile(name=f"sfp-{ref}-runs.csv", title=f"{ref} runs ({len(data.runs)})", content=runs_csv))
        return files


def _uncertain_text(op: Operation) -> str:
    return (
        f"The bot sent {op.ref} to the sfp server but never got its answer, so the task may or may not exist "
        "there. It is not sent again automatically (that could run it twice): check the sfp server, and submit "
        "it again only if it is not there."
    )
