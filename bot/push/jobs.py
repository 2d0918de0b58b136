"""The ``create_jobs`` step of a push: one PackagePushJob per target org, never two, none lost.

Up to ``BULK_THRESHOLD`` orgs the jobs go through sObject Collections; above it through one
Bulk API 2.0 ingest job. Either way a resumed step first reads back what an interrupted attempt
created, because Salesforce refuses a second job for the same org as a duplicate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from bot.clients.salesforce.rest import SalesforceClient, readable_message, soql_literal
from bot.core.lifecycle import LeasedWrites
from bot.core.operations import OpEvent
from bot.errors import AmbiguousWriteError, TransientError
from bot.push.payloads import JobCounts, PushData
from bot.push.upstream import quietly_cancel
from bot.store import repo
from bot.store.db import Database
from bot.store.models import Operation, OpState, PushTarget

log = logging.getLogger(__name__)

BULK_THRESHOLD = 400  # above this many orgs, jobs go through one Bulk API 2.0 ingest job
MAX_BULK_JOBS = 3  # ingest jobs that may end Failed for one push before the orgs left are given up

Outcome = tuple[dict[str, str], dict[str, str]]  # (org key → job id created, org key → why refused)


class PushJobs:
    def __init__(self, *, db: Database, writes: LeasedWrites) -> None:
        self._db = db
        self._writes = writes

    async def create(self, operation: Operation, lease_token: str, client: SalesforceClient) -> list[OpEvent]:
        assert operation.id is not None and operation.external_id is not None
        targets = await repo.push_targets(self._db, operation_id=operation.id)
        pending = [t for t in targets if t.job_id is None and t.refused_reason is None]
        if pending:
            data = PushData.of(operation)
            if len(pending) > BULK_THRESHOLD or data.bulk_job_id or data.bulk_failures:
                created, refused = await self._bulk(operation, lease_token, client, pending)
            elif data.jobs_attempted_at:
                # An earlier attempt (a replica killed mid-step, say) may have created some of these
                # jobs without recording them: creating them again would only be refused as duplicates.
                existing = await self._existing(operation, client)
                remaining = [t for t in pending if t.org_key[:15] not in existing]
                created, refused = await self._collections(operation, client, remaining) if remaining else ({}, {})
                created = {
                    **{t.org_key[:15]: existing[t.org_key[:15]] for t in pending if t.org_key[:15] in existing},
                    **created,
                }
            else:
                attempted = data.model_copy(update={"jobs_attempted_at": datetime.now(UTC)})
                if not await self._writes.save(operation, lease_token, data=attempted.dump()):
                    return []
                created, refused = await self._collections(operation, client, pending)
            await repo.record_push_job_results(self._db, operation_id=operation.id, job_ids=created, refused=refused)
            targets = await repo.push_targets(self._db, operation_id=operation.id)
        # Counted from the stored targets, so a resumed step never counts twice.
        refusals = sorted((t.org_key, t.refused_reason or "") for t in targets if t.refused_reason)
        jobs = JobCounts(created=sum(1 for t in targets if t.job_id), refused=len(refusals))
        before = PushData.of(operation)
        data = before.job_bookkeeping_done.model_copy(update={"jobs": jobs})
        detail: dict[str, Any] = {"created": jobs.created, "refused": refusals[:50], "refused_total": jobs.refused}
        if before.bulk_failures:
            detail["bulk_failures"] = list(before.bulk_failures)
            detail["bulk_gave_up"] = len(before.bulk_failures) >= MAX_BULK_JOBS
        events = [OpEvent("jobs_created", detail)]
        if jobs.created == 0:
            await quietly_cancel(client, operation.external_id)
            failed = data.model_copy(update={"error": "Salesforce refused every org; nothing was pushed."})
            await self._writes.save(operation, lease_token, state=OpState.ERROR, data=failed.dump())
            return [*events, OpEvent("error")]
        await self._writes.save(operation, lease_token, step="start", data=data.dump())
        return events

    async def _collections(
        self, operation: Operation, client: SalesforceClient, targets: Sequence[PushTarget]
    ) -> Outcome:
        records = [
            {"PackagePushRequestId": operation.external_id, "SubscriberOrganizationKey": t.org_key} for t in targets
        ]
        try:
            results = await client.create_many("PackagePushJob", records, all_or_none=False)
        except AmbiguousWriteError:
            # Some chunks may have been created: read back what exists, then create the rest.
            existing = await self._existing(operation, client)
            remaining = [t for t in targets if t.org_key[:15] not in existing]
            created, refused = await self._collections(operation, client, remaining) if remaining else ({}, {})
            return {**existing, **created}, refused
        created = {}
        refused = {}
        for target, result in zip(targets, results, strict=True):
            if result.success and result.id:
                created[target.org_key[:15]] = result.id
            else:
                refused[target.org_key[:15]] = result.error_text or "refused"
        return created, refused

    async def _existing(self, operation: Operation, client: SalesforceClient) -> dict[str, str]:
        records = await client.query(
            "SELECT Id, SubscriberOrganizationKey FROM PackagePushJob WHERE PackagePushRequestId = "
            f"{soql_literal(operation.external_id or '')}"
        )
        return {str(r["SubscriberOrganizationKey"])[:15]: str(r["Id"]) for r in records}

    async def _bulk(
        self, operation: Operation, lease_token: str, client: SalesforceClient, targets: Sequence[PushTarget]
    ) -> Outcome:
        """One ingest job for every org; after a job that ended Failed or Aborted, one more for the rest.

        Salesforce keeps what such a job already inserted ("create a new ingest job to process the
        records that weren't processed"), so the jobs that exist are read back from PackagePushJob
        and only orgs still without one are sent again: never a duplicate, never a lost job. At most
        ``MAX_BULK_JOBS`` jobs end Failed; after that the orgs still without a job are listed as
        refused with the reason and the push goes on with the others.
        """
        failures: list[str] = list(PushData.of(operation).bulk_failures or [])
        reconcile = bool(failures)
        job_id = PushData.of(operation).bulk_job_id
        if job_id:
            info = await client.bulk_job(job_id)
            if info.get("state") == "Open":
                # We died between creating and closing it: nothing was processed. Start over.
                await client.bulk_set_state(job_id, "Aborted")
                job_id = None
        remaining = list(targets)
        found: dict[str, str] = {}
        while True:
            if not job_id:
                if reconcile:
                    existing = await self._existing(operation, client)
                    found.update(
                        {t.org_key[:15]: existing[t.org_key[:15]] for t in remaining if t.org_key[:15] in existing}
                    )
                    remaining = [t for t in remaining if t.org_key[:15] not in existing]
                    if not remaining:
                        return found, {}
                    if len(failures) >= MAX_BULK_JOBS:
                        why = f"no push job created: {len(failures)} Bulk API jobs ended Failed"
                        return found, {t.org_key[:15]: why for t in remaining}
                job_id = await self._submit_bulk(operation, lease_token, client, remaining)
            info = await _wait_bulk(client, job_id)
            if info.get("state") == "JobComplete":
                created, refused = await _bulk_outcome(client, job_id, info)
                return {**found, **created}, refused
            uploaded = PushData.of(operation).bulk_job_rows or len(remaining)
            if info.get("state") == "Failed":
                failures.append(_bulk_failure_text(job_id, info, uploaded=uploaded))
                log.warning("push %s: %s", operation.ref, failures[-1])
            # Aborted (by us after an upload whose answer was lost, or by an admin) is not
            # counted as a failure, but what it processed before it stopped is kept all the same.
            reconcile = True
            data = PushData.of(operation).model_copy(update={"bulk_job_id": None, "bulk_failures": failures})
            if not await self._writes.save(operation, lease_token, data=data.dump()):
                raise TransientError("the push changed while its jobs were being created", system="salesforce")
            job_id = None

    async def _submit_bulk(
        self, operation: Operation, lease_token: str, client: SalesforceClient, targets: Sequence[PushTarget]
    ) -> str:
        job_id = await client.bulk_create_insert_job("PackagePushJob")
        data = PushData.of(operation).model_copy(update={"bulk_job_id": job_id, "bulk_job_rows": len(targets)})
        await self._writes.save(operation, lease_token, data=data.dump())
        rows = [
            {"PackagePushRequestId": operation.external_id or "", "SubscriberOrganizationKey": t.org_key}
            for t in targets
        ]
        try:
            await client.bulk_upload(job_id, rows, ["PackagePushRequestId", "SubscriberOrganizationKey"])
        except AmbiguousWriteError:
            await client.bulk_set_state(job_id, "Aborted")
            raise
        await client.bulk_set_state(job_id, "UploadComplete")
        return job_id


async def _bulk_outcome(client: SalesforceClient, job_id: str, info: dict[str, Any]) -> Outcome:
    """Created and refused orgs of a JobComplete ingest job, from its result sets."""
    # The job's counts say which result sets hold anything: at 50,000 orgs every call counts.
    # Without them (they are documented for every finished job), read both.
    processed, failed = info.get("numberRecordsProcessed"), info.get("numberRecordsFailed")
    any_created = any_refused = True
    if processed is not None and failed is not None:
        any_created, any_refused = int(processed) > int(failed), int(failed) > 0
    created = {
        row["SubscriberOrganizationKey"][:15]: row["sf__Id"]
        for row in (await client.bulk_results(job_id, "successfulResults") if any_created else [])
        if row.get("sf__Id")
    }
    refused = {
        row["SubscriberOrganizationKey"][:15]: _bulk_error(row.get("sf__Error", ""))
        for row in (await client.bulk_results(job_id, "failedResults") if any_refused else [])
    }
    return created, refused


async def _wait_bulk(client: SalesforceClient, job_id: str) -> dict[str, Any]:
    """Poll the ingest job with a growing delay; a killed bot resumes from the stored job id."""
    delay = 0.25
    for _ in range(40):
        info = await client.bulk_job(job_id)
        if info.get("state") in {"JobComplete", "Failed", "Aborted"}:
            return info
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)
    raise TransientError(f"Bulk API job {job_id} is still processing", system="salesforce")


def _bulk_failure_text(job_id: str, info: dict[str, Any], *, uploaded: int) -> str:
    """What a person needs about an ingest job that ended Failed, even when Salesforce says nothing."""
    processed = int(info.get("numberRecordsProcessed") or 0)
    message = " ".join(str(info.get("errorMessage") or "").split())[:200]
    reason = f"Salesforce said: {message}" if message else "Salesforce gave no message"
    return f"Bulk API job {job_id} ended Failed after {processed:,} of {uploaded:,} records; {reason}"


def _bulk_error(text: str) -> str:
    """``CODE:message:fields`` as Bulk API 2.0 writes sf__Error; keep code and message."""
    code, _, rest = text.partition(":")
    message = rest.rsplit(":", 1)[0] if rest.count(":") else rest
    return f"{code}: {readable_message(message)}".strip(": ") or "refused"
