"""Following pushes that run in Salesforce, many at a time, and reporting how they ended.

Every watched push of the packaging org is read with one status query and one aggregate query
(per ``IN_CHUNK`` requests), not two per push: a poll cycle's calls grow with the chunks, not the
pushes (SPEC §11, measured by ``bench/poll_cycle.py``). Plain progress is saved for all of them
in one statement.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from bot.clients.salesforce.rest import SalesforceClient, readable_message, soql_id_list, soql_literal
from bot.core.lifecycle import LeasedWrites
from bot.core.operations import Advance, OpEvent, OpFile
from bot.core.when import aware
from bot.push.payloads import FailureGroup, JobStatusCounts, PushData, PushSummary
from bot.push.upstream import IN_CHUNK, REQUEST_TERMINAL, canon
from bot.redaction import csv_bytes
from bot.store import repo
from bot.store.db import Database
from bot.store.models import Operation, OpState

_NUMBER_RE = re.compile(r"\d+")
_ERROR_FIELDS = ("ErrorType", "ErrorTitle", "ErrorMessage", "ErrorDetails", "ErrorSeverity")


class PushProgress:
    def __init__(self, *, db: Database, writes: LeasedWrites) -> None:
        self._db = db
        self._writes = writes

    async def watch(
        self, operations: Sequence[Operation], lease_token: str, client: SalesforceClient
    ) -> dict[int, Advance | BaseException]:
        """One status query and one aggregate query for every watched push of the org."""
        now = datetime.now(UTC)
        results: dict[int, Advance | BaseException] = {}
        due: list[Operation] = []
        for op in operations:
            assert op.id is not None
            if op.state == OpState.RUNNING or op.scheduled_for is None or aware(op.scheduled_for) <= now:
                due.append(op)
            else:
                wait = (aware(op.scheduled_for) - now).total_seconds()
                results[op.id] = Advance(next_poll_in=max(1.0, min(wait, 600.0)))
        if not due:
            return results
        ids = [op.external_id or "" for op in due]
        statuses: dict[str, str] = {}
        counts: dict[str, Counter[str]] = {request_id[:15]: Counter() for request_id in ids}
        chunks = [ids[start : start + IN_CHUNK] for start in range(0, len(ids), IN_CHUNK)]
        # The IN lists stay short enough for a GET URL; the chunks run side by side.
        answers = await asyncio.gather(*(_status_and_counts(client, chunk) for chunk in chunks))
        for chunk_statuses, chunk_counts in answers:
            statuses.update(chunk_statuses)
            for key, counter in chunk_counts.items():
                counts[key].update(counter)
        progress: list[dict[str, Any]] = []  # plain progress of many pushes: saved in one statement
        for op in due:
            assert op.id is not None
            key = (op.external_id or "")[:15]
            try:
                results[op.id] = await self._observe(
                    op, lease_token, client, statuses.get(key, ""), counts[key], now=now, progress=progress
                )
            except Exception as exc:  # one push's failure report must not hold up the others
                results[op.id] = exc
        await self._writes.save_many(progress)
        return results

    async def _observe(
        self,
        op: Operation,
        lease_token: str,
        client: SalesforceClient,
        status: str,
        counts: Counter[str],
        *,
        now: datetime,
        progress: list[dict[str, Any]],
    ) -> Advance:
        before = PushData.of(op)
        data = before.model_copy(update={"request_status": status, "counts": JobStatusCounts.of(counts)})
        events: list[OpEvent] = []
        if status == "In Progress" and before.request_status != "In Progress":
            events.append(OpEvent("in_progress"))
        if status in REQUEST_TERMINAL:
            summary = await self._collect_failures(op, client, counts)
            final = {"Succeeded": OpState.SUCCEEDED, "Failed": OpState.FAILED}.get(status, OpState.CANCELED)
            finished = data.model_copy(update={"summary": summary})
            if await self._writes.save(op, lease_token, state=final, data=finished.dump()):
                events.append(OpEvent("completed"))
            return Advance(events=events)
        state = OpState.RUNNING if status == "In Progress" else op.state
        started = before.running_since or now
        # Progress means the trouble is over: the note goes with this write.
        data = data.model_copy(update={"running_since": started, "transient_failures": 0, "last_problem": None})
        if state != op.state or data != before:  # an idle cycle writes nothing
            progress.append(self._writes.pending_save(op, lease_token, state=state, data=data.dump()))
        elapsed = (now - aware(started)).total_seconds()
        return Advance(events=events, next_poll_in=max(2.0, min(elapsed / 10.0, 60.0)))

    async def _collect_failures(self, op: Operation, client: SalesforceClient, counts: Counter[str]) -> PushSummary:
        """Read every PackagePushError of the request into push_targets; return the grouped summary."""
        assert op.id is not None
        errors: dict[str, dict[str, str]] = {}
        if counts.get("Failed"):
            records = await client.query(
                "SELECT PackagePushJob.SubscriberOrganizationKey, ErrorType, ErrorTitle, ErrorMessage, ErrorDetails, "
                "ErrorSeverity FROM PackagePushError WHERE PackagePushJob.PackagePushRequestId = "
                f"{soql_literal(op.external_id or '')}"
            )
            for record in records:
                key = str((record.get("PackagePushJob") or {}).get("SubscriberOrganizationKey") or "")[:15]
                if key and key not in errors:  # first error per org is the one that stopped it
                    errors[key] = {name: str(record.get(name) or "") for name in _ERROR_FIELDS}
        await repo.record_push_failures(self._db, operation_id=op.id, errors=errors)
        groups = failure_groups(errors.values())
        failed = int(counts.get("Failed", 0))
        return PushSummary(
            succeeded=int(counts.get("Succeeded", 0)),
            failed=failed,
            canceled=int(counts.get("Canceled", 0)),
            total=sum(counts.values()),
            groups=groups[:10],
            group_count=len(groups),
            without_error_record=max(0, failed - len(errors)),
        )

    async def completion_files(self, operation: Operation) -> list[OpFile]:
        """Every failed org with its error, as CSV for the thread."""
        assert operation.id is not None
        failed = [t for t in await repo.push_targets(self._db, operation_id=operation.id) if t.job_status == "Failed"]
        if not failed:
            return []
        # Org names are set by the subscribers and error texts by Salesforce: the shared writer
        # neutralises formulas and redacts.
        content = csv_bytes(
            header=[
                "org_key",
                "org_name",
                "org_type",
                "from_version",
                "error_type",
                "error_title",
                "error_message",
                "error_details",
            ],
            rows=(
                [
                    t.org_key,
                    t.org_name,
                    t.org_type,
                    t.from_version,
                    t.error_type or "",
                    t.error_title or "",
                    t.error_message or "",
                    t.error_details or "",
                ]
                for t in sorted(failed, key=lambda t: (t.error_type or "", t.org_key))
            ),
        )
        return [
            OpFile(
                name=f"push-{operation.ref}-failures.csv",
                title=f"{operation.ref} failures ({len(failed)} orgs)",
                content=content,
            )
        ]


async def _status_and_counts(
    client: SalesforceClient, request_ids: Sequence[str]
) -> tuple[dict[str, str], dict[str, Counter[str]]]:
    """Request statuses and job counts by status for these requests: two queries in all."""
    in_list = soql_id_list(request_ids)
    requests, jobs = await asyncio.gather(
        client.query(f"SELECT Id, Status FROM PackagePushRequest WHERE Id IN {in_list}"),
        client.query(
            "SELECT PackagePushRequestId, Status, COUNT(Id) n FROM PackagePushJob "
            f"WHERE PackagePushRequestId IN {in_list} GROUP BY PackagePushRequestId, Status"
        ),
    )
    statuses = {str(r["Id"])[:15]: canon(str(r.get("Status") or "")) for r in requests}
    counts: dict[str, Counter[str]] = {}
    for record in jobs:
        key = str(record["PackagePushRequestId"])[:15]
        counts.setdefault(key, Counter())[canon(str(record.get("Status") or ""))] += int(record.get("n") or 0)
    return statuses, counts


def failure_groups(errors: Iterable[dict[str, str]]) -> list[FailureGroup]:
    """Failures grouped by type, title and message, largest group first.

    Salesforce writes a number of its own into some messages ("…contact support: 1934261182-77421
    (-1093283713)" differs for every org), so messages are compared with their numbers blanked out
    and their whitespace collapsed; the group shows the first message as Salesforce wrote it (one
    line) and says when the numbers differ. The CSV keeps every message whole.
    """
    groups: dict[tuple[str, str, str], FailureGroup] = {}
    for error in errors:
        title, message = readable_message(error["ErrorTitle"]), readable_message(error["ErrorMessage"])
        key = (error["ErrorType"], _NUMBER_RE.sub("#", title), _NUMBER_RE.sub("#", message))
        group = groups.get(key)
        if group is None:
            groups[key] = FailureGroup(type=error["ErrorType"], title=title, message=message, count=1)
        else:
            group.count += 1
            if (title, message) != (group.title, group.message):
                group.numbers_vary = True
    return sorted(groups.values(), key=lambda group: -group.count)
