"""What the poller does with deployments: the deploy kind's steps for the shared skeleton
(``bot.core.advance.KindAdvancer``), which owns approval expiry, concurrency and back-off.

``deploy()`` (or ``deployRecentValidation()``) is called once: ``submit_attempted_at`` is recorded
before the call and the returned id right after it. If the outcome is unknown (the connection
dropped mid-call, or the bot died between the two records) the operation ends in ``error`` saying
so — Salesforce may have started it, and a second deployment must never be sent blindly. Calls that
certainly did nothing (connect errors, 503, limits, an expired session) clear the mark and escape
to the skeleton, which retries later. Status is then polled with ``includeDetails=true``, every few
seconds at first and about once a minute for long deployments.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from bot.clients.salesforce.deploy_result import DeployResult
from bot.core.lifecycle import LeasedWrites
from bot.core.operations import Advance, OpEvent, OpFile
from bot.core.when import aware
from bot.deploy.artifacts import Artifact
from bot.deploy.payloads import (
    ArtifactSummary,
    ClassCoverage,
    ComponentProblem,
    Coverage,
    DeployData,
    FailureTotals,
    FlowCoverage,
    OptionsData,
    Outcome,
    Progress,
    QuickSource,
    TestProblem,
    data_of,
    iso,
    params_of,
)
from bot.deploy.report import deploy_report
from bot.deploy.service import DeployService
from bot.errors import AmbiguousWriteError, ApiError, AuthError, TransientError, UpstreamError, UserError
from bot.redaction import redact_text
from bot.store.models import Operation, OpState

log = logging.getLogger(__name__)

MAX_STORED_FAILURES = 1000  # per list; the report says how many more Salesforce returned
FINAL_STATE = {
    "Succeeded": OpState.SUCCEEDED,
    "SucceededPartial": OpState.FAILED,
    "Failed": OpState.FAILED,
    "Canceled": OpState.CANCELED,
}


@dataclass(frozen=True)
class DeployQueue:
    """Deployments sent from here and not finished, by org: Salesforce runs one at a time per org.
    (Deployments started elsewhere are invisible to the bot.)

    Built once per poll cycle, so that placing each of hundreds of deployments is a bisection,
    not a scan of all the others.
    """

    submitted: dict[str | None, list[str]]  # org → the submitted_at of its running deployments, sorted

    @classmethod
    def of(cls, active: Sequence[Operation]) -> DeployQueue:
        submitted: dict[str | None, list[str]] = {}
        for op in active:
            if op.external_id and op.state in {OpState.RUNNING, OpState.CANCELING}:
                submitted.setdefault(op.org, []).append(data_of(op).submitted_at or "")
        return cls({org: sorted(times) for org, times in submitted.items()})

    def ahead(self, op: Operation) -> int:
        """How many were sent to the same org before this one (itself not counted)."""
        return bisect_left(self.submitted.get(op.org, []), data_of(op).submitted_at or "")


class DeploySteps:
    """The deploy kind's ``KindSteps``."""

    start_states: frozenset[str] = frozenset({OpState.SCHEDULED, OpState.STARTING})
    watch_states: frozenset[str] = frozenset({OpState.RUNNING, OpState.CANCELING})

    def __init__(self, service: DeployService) -> None:
        self._service = service
        self._writes = LeasedWrites(service.db)

    async def settle(self, operation: Operation, lease_token: str) -> Advance:
        return Advance()

    async def refuse(self, operation: Operation, lease_token: str, message: str) -> Advance:
        # e.g. the org was removed from the configuration since it was requested.
        return await self._fail(operation, lease_token, f"Nothing was deployed: {message}")

    async def completion_files(self, operation: Operation) -> list[OpFile]:
        """The full report of a deployment Salesforce finished (or canceled)."""
        if data_of(operation).result is None:
            return []
        return [
            OpFile(
                name=f"deploy-{operation.ref}-report.txt",
                title=f"{operation.ref} deployment report",
                content=deploy_report(operation).encode(),
            )
        ]

    # -- sending -----------------------------------------------------------------------------------
    async def start(self, operation: Operation, lease_token: str) -> Advance:
        op, now = operation, datetime.now(UTC)
        if op.scheduled_for is not None and aware(op.scheduled_for) > now:
            wait = (aware(op.scheduled_for) - now).total_seconds()
            events = []
            if op.state != OpState.SCHEDULED:
                if not await self._writes.save(op, lease_token, state=OpState.SCHEDULED):
                    return Advance()
                events.append(OpEvent("scheduled"))
            return Advance(events=events, next_poll_in=max(1.0, min(wait, 300.0)))
        if op.state == OpState.SCHEDULED and not await self._writes.save(op, lease_token, state=OpState.STARTING):
            return Advance()
        params, data = params_of(op), data_of(op)
        if data.submit_attempted_at and not op.external_id:
            return await self._fail(
                op,
                lease_token,
                "The bot lost track of this deployment while sending it to Salesforce, so it cannot tell whether "
                f"Salesforce received it. It was not sent again: check Setup → Deployment Status in `{op.org}` "
                "before requesting it again.",
            )
        artifact: Artifact | None = None
        if params.action != "quick_deploy":
            try:
                artifact = await self._service.artifacts.reload(params.artifact or ArtifactSummary())
            except UserError as exc:
                return await self._fail(op, lease_token, f"Nothing was deployed: {exc.message}")
        # Recorded before the call: if the bot dies during it, the next attempt knows not to resend.
        data.submit_attempted_at = now.isoformat()
        if not await self._writes.save(op, lease_token, data=data.dump()):
            return Advance()
        client = self._service.metadata(str(op.org))
        try:
            if artifact is not None:
                deploy_id = await client.deploy(artifact.data, (params.options or OptionsData()).options())
            else:
                deploy_id = await client.deploy_recent_validation((params.validation or QuickSource()).id)
        except AmbiguousWriteError as exc:
            return await self._fail(
                op,
                lease_token,
                f"The connection to Salesforce failed while sending it ({exc.message}), so Salesforce may or may "
                f"not have started it. It was not sent again: check Setup → Deployment Status in `{op.org}`.",
            )
        except (TransientError, AuthError):
            # Certainly not received (never connected, 503, a limit, a refused session): clear the
            # mark so that the next attempt may send it; the skeleton backs off.
            data.submit_attempted_at = None
            await self._writes.save(op, lease_token, data=data.dump())
            raise
        except ApiError as exc:
            what = "the quick deploy" if artifact is None else "the deployment"
            return await self._fail(op, lease_token, f"Salesforce refused {what}: {exc.code}: {exc.message}")
        return await self._sent(op, lease_token, data, deploy_id, now=now)

    async def _sent(
        self, op: Operation, lease_token: str, data: DeployData, deploy_id: str, *, now: datetime
    ) -> Advance:
        data.submitted_at = now.isoformat()
        data.progress = Progress()
        status_url = await self._status_url(str(op.org), deploy_id)
        if status_url:
            data.status_url = status_url
        if not await self._writes.save(
            op, lease_token, external_id=deploy_id, state=OpState.RUNNING, step="", data=data.dump()
        ):
            # Canceled (or taken over) while it was being sent: do not leave it running.
            await self._quietly_cancel(str(op.org), deploy_id)
            return Advance()
        submitted = OpEvent("submitted", {"deploy_id": deploy_id})
        try:
            # Read its status at once, so the card says Pending (and behind what) or InProgress.
            first = await self._watch(op, lease_token, DeployQueue.of(await self._service.active()))
        except UpstreamError:
            return Advance(events=[submitted], next_poll_in=2.0)
        return Advance(events=[submitted, *first.events], next_poll_in=first.next_poll_in)

    async def _status_url(self, alias: str, deploy_id: str) -> str | None:
        """The org's Deployment Status page of this deployment; None if it cannot be built now
        (the id was recorded already, and a missing link must never lose it)."""
        try:
            return await self._service.metadata(alias).deploy_status_url(deploy_id)
        except (UpstreamError, UserError, ValueError):
            log.warning("no Deployment Status link for %s in %s", deploy_id, alias)
            return None

    async def _fail(self, op: Operation, lease_token: str, message: str) -> Advance:
        data = data_of(op)
        data.error = redact_text(message)
        await self._writes.save(op, lease_token, state=OpState.ERROR, data=data.dump())
        return Advance(events=[OpEvent("error")])

    async def _quietly_cancel(self, alias: str, deploy_id: str) -> None:
        try:
            await self._service.metadata(alias).cancel_deploy(deploy_id)
        except (UpstreamError, UserError):
            log.warning("could not cancel orphaned deployment %s in %s", deploy_id, alias)

    # -- following ---------------------------------------------------------------------------------
    async def watch(self, operations: Sequence[Operation], lease_token: str) -> Mapping[int, Advance | BaseException]:
        queue = DeployQueue.of(await self._service.active())
        batch: list[dict[str, Any]] = []  # plain progress of many deployments: saved in one statement
        outcomes = await asyncio.gather(
            *(self._watch(op, lease_token, queue, batch=batch) for op in operations), return_exceptions=True
        )
        await self._writes.save_many(batch)
        results: dict[int, Advance | BaseException] = {}
        for op, outcome in zip(operations, outcomes, strict=True):
            assert op.id is not None
            if isinstance(outcome, ApiError) and outcome.code == "INVALID_ID_FIELD":
                # Salesforce no longer knows the id (the sandbox was refreshed, say): asking again
                # cannot help, and the outcome cannot be known from here.
                outcome = await self._fail(
                    op,
                    lease_token,
                    f"Salesforce no longer knows deployment `{op.external_id}` ({outcome.message}); its outcome "
                    f"cannot be read. Check Setup → Deployment Status in `{op.org}`.",
                )
            results[op.id] = outcome
        return results

    async def _watch(
        self, op: Operation, lease_token: str, queue: DeployQueue, *, batch: list[dict[str, Any]] | None = None
    ) -> Advance:
        """Read the deployment's status; a plain progress write goes to ``batch`` when given, else is made now."""
        result = await self._service.metadata(str(op.org)).check_deploy_status(
            str(op.external_id), include_details=True
        )
        data = data_of(op)
        was_pending = data.progress is not None and data.progress.status == "Pending"
        previous = data.progress.model_dump(exclude_unset=True) if data.progress else {}
        progress = _progress(result)
        events: list[OpEvent] = []
        if result.status == "Pending":
            progress.queue_ahead = queue.ahead(op)
            if progress.queue_ahead and not data.queued_announced:
                events.append(OpEvent("queued", {"ahead": progress.queue_ahead}))
        elif was_pending and data.queued_announced and result.status in {"InProgress", "Canceling"}:
            # Only worth a reply after a wait in the queue; otherwise the card says it all.
            events.append(OpEvent("in_progress", {"components": result.components_total, "tests": result.tests_total}))
        if result.done:
            return await self._complete(op, lease_token, data, result, progress, events)
        if events and events[0].name == "queued":
            data.queued_announced = True
        state = OpState(op.state)
        if result.status == "Canceling" and state == OpState.RUNNING:
            state = OpState.CANCELING  # canceled in Salesforce's UI, or by another tool
        if progress.model_dump(exclude_unset=True) != previous or state != op.state or data.last_problem is not None:
            data.progress = progress
            if batch is None:
                await self._writes.save(op, lease_token, state=state, data=data.dump())
            else:
                batch.append(self._writes.pending_save(op, lease_token, state=state, data=data.dump()))
        return Advance(events=events, next_poll_in=_next_poll(data, state))

    async def _complete(
        self,
        op: Operation,
        lease_token: str,
        data: DeployData,
        result: DeployResult,
        progress: Progress,
        events: list[OpEvent],
    ) -> Advance:
        state = FINAL_STATE.get(result.status, OpState.FAILED)
        data.progress = progress
        data.result = Outcome(
            status=result.status,
            success=result.success,
            check_only=result.check_only,
            created_date=iso(result.created_date),
            completed_date=iso(result.completed_date or datetime.now(UTC)),
            components=[result.components_deployed, result.components_total, result.component_errors],
            tests=[result.tests_completed, result.tests_total, result.test_errors],
            error_message=result.error_message[:1000],
            error_status_code=result.error_status_code,
            canceled_by_name=result.canceled_by_name,
        )
        data.component_failures = [
            ComponentProblem(**asdict(f)) for f in result.component_failures[:MAX_STORED_FAILURES]
        ]
        data.test_failures = [
            TestProblem(**asdict(t), qualified=t.qualified) for t in result.test_failures[:MAX_STORED_FAILURES]
        ]
        data.failure_totals = FailureTotals(components=len(result.component_failures), tests=len(result.test_failures))
        if result.code_coverage_warnings or result.flow_coverage_warnings:
            data.coverage = _coverage(result)
        if not data.status_url and op.external_id:
            status_url = await self._status_url(str(op.org), str(op.external_id))
            if status_url:
                data.status_url = status_url
        if op.state == OpState.CANCELING and state != OpState.CANCELED:
            data.finished_before_cancel = True
        if state == OpState.CANCELED and data.cancel_requested_by:
            data.canceled_by = data.cancel_requested_by
        if not await self._writes.save(op, lease_token, state=state, data=data.dump()):
            return Advance()
        return Advance(events=[*events, OpEvent("completed")])


def _next_poll(data: DeployData, state: OpState) -> float:
    """Seconds at first, about a minute once a deployment has run for several minutes."""
    started = data.submitted_at
    elapsed = (datetime.now(UTC) - datetime.fromisoformat(started)).total_seconds() if started else 0.0
    if state == OpState.CANCELING:
        return max(1.0, min(elapsed / 10.0, 15.0))
    return max(1.0, min(elapsed / 6.0, 60.0))


def _progress(result: DeployResult) -> Progress:
    detail = result.state_detail
    return Progress(
        status=result.status,
        state_detail=detail[:200],
        current_test=detail.split(":", 1)[1].strip()[:200] if detail.startswith("Running Test:") else "",
        components=[result.components_deployed, result.components_total, result.component_errors],
        tests=[result.tests_completed, result.tests_total, result.test_errors],
    )


def _coverage(result: DeployResult) -> Coverage:
    """The coverage warnings as plain data: the org-wide figures (average and threshold, from the
    warning without a name) apart from the classes, triggers and flows named below the threshold."""
    summary = Coverage(
        average=None, required=None, flow_average=None, flow_required=None, classes=[], flows=[], other=[]
    )
    for warning in result.code_coverage_warnings[:MAX_STORED_FAILURES]:
        if warning.name:
            summary.classes.append(
                ClassCoverage(
                    name=warning.qualified,
                    type=warning.kind,
                    percent=warning.percent,
                    required=warning.required,
                    message=warning.message[:500],
                )
            )
        elif warning.percent is not None and summary.average is None:
            summary.average, summary.required = warning.percent, warning.required
        else:
            summary.other.append(warning.message[:500])
    for flow in result.flow_coverage_warnings[:MAX_STORED_FAILURES]:
        if flow.flow_name:
            summary.flows.append(
                FlowCoverage(
                    name=flow.qualified, percent=flow.percent, required=flow.required, message=flow.message[:500]
                )
            )
        elif flow.percent is not None and summary.flow_average is None:
            summary.flow_average, summary.flow_required = flow.percent, flow.required
        else:
            summary.other.append(flow.message[:500])
    return summary
