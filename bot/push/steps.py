"""The push's steps for the shared poller skeleton (``bot.core.advance.KindAdvancer``).

Starting a push is three Salesforce writes, each recorded before the next one so a killed bot
resumes where it stopped instead of pushing twice:

    starting/create_request → starting/create_jobs (``bot.push.jobs``) → starting/start → scheduled|running

The skeleton owns what every kind shares (approval expiry, concurrency, back-off on transient
and credential trouble); what is here is the push's own: never resending a write whose answer
was lost, adopting an orphaned request only when it is unambiguous, and cleaning up after a
cancel that raced the start.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from bot.clients.salesforce.rest import SalesforceClient, soql_literal
from bot.core.lifecycle import LeasedWrites
from bot.core.operations import Advance, OpEvent, OpFile
from bot.core.orgs import OrgRegistry
from bot.core.when import aware
from bot.errors import AmbiguousWriteError, ApiError
from bot.push.jobs import PushJobs
from bot.push.payloads import PushData, PushParams
from bot.push.progress import PushProgress
from bot.push.upstream import packaging_client, quietly_cancel, request_status, sf_datetime
from bot.redaction import redact_text
from bot.store import repo
from bot.store.db import Database
from bot.store.models import Operation, OpState

log = logging.getLogger(__name__)


class PushSteps:
    """``KindSteps`` for pushes."""

    start_states: frozenset[str] = frozenset({OpState.STARTING})
    watch_states: frozenset[str] = frozenset({OpState.SCHEDULED, OpState.RUNNING})

    def __init__(self, *, db: Database, orgs: OrgRegistry, writes: LeasedWrites) -> None:
        self._db = db
        self._orgs = orgs
        self._writes = writes
        self._jobs = PushJobs(db=db, writes=writes)
        self._progress = PushProgress(db=db, writes=writes)

    async def start(self, operation: Operation, lease_token: str) -> Advance:
        client = packaging_client(self._orgs)
        events: list[OpEvent] = []
        if operation.step == "create_request":
            events.extend(await self._create_request(operation, lease_token, client))
            if operation.state != OpState.STARTING:
                return Advance(events=events)
        if operation.step == "create_jobs":
            events.extend(await self._jobs.create(operation, lease_token, client))
            if operation.state != OpState.STARTING:
                return Advance(events=events)
        if operation.step == "start":
            events.extend(await self._set_pending(operation, lease_token, client))
        return Advance(events=events, next_poll_in=2.0)

    async def watch(self, operations: Sequence[Operation], lease_token: str) -> Mapping[int, Advance | BaseException]:
        return await self._progress.watch(operations, lease_token, packaging_client(self._orgs))

    async def settle(self, operation: Operation, lease_token: str) -> Advance:
        """Canceled while its request was being created: cancel that request too, so none is left behind."""
        if operation.state != OpState.CANCELED or not operation.external_id:
            return Advance()
        data = PushData.of(operation)
        if data.request_status == "Canceled":
            return Advance()
        client = packaging_client(self._orgs)
        status = await request_status(client, operation.external_id)
        if status in {"Created", "Pending"}:
            await quietly_cancel(client, operation.external_id)
            status = "Canceled"
        await self._writes.save(operation, lease_token, data=data.model_copy(update={"request_status": status}).dump())
        return Advance()

    async def refuse(self, operation: Operation, lease_token: str, message: str) -> Advance:
        """Starting is impossible until someone changes the configuration (no packaging org, say)."""
        failed = PushData.of(operation).model_copy(update={"error": message})
        if not await self._writes.save(operation, lease_token, state=OpState.ERROR, data=failed.dump()):
            return Advance()
        return Advance(events=[OpEvent("error")])

    async def completion_files(self, operation: Operation) -> list[OpFile]:
        return await self._progress.completion_files(operation)

    async def _create_request(self, operation: Operation, lease_token: str, client: SalesforceClient) -> list[OpEvent]:
        fields: dict[str, Any] = {"PackageVersionId": PushParams.read(operation.params).version_id}
        if operation.scheduled_for:
            fields["ScheduledStartTime"] = sf_datetime(operation.scheduled_for)
        request_id: str | None = None
        if PushData.of(operation).request_attempted_at:
            # A previous attempt may have created it and died before recording the id.
            request_id = await self._find_orphan_request(operation, client)
        if request_id is None:
            attempted = PushData.of(operation).model_copy(update={"request_attempted_at": datetime.now(UTC)})
            if not await self._writes.save(operation, lease_token, data=attempted.dump()):
                return []
            try:
                request_id = await client.create("PackagePushRequest", fields)
            except AmbiguousWriteError:
                request_id = await self._find_orphan_request(operation, client)
                if request_id is None:
                    raise
            except ApiError as exc:
                error = f"Salesforce refused the push request: {redact_text(exc.message)}"
                failed = PushData.of(operation).model_copy(update={"error": error})
                await self._writes.save(operation, lease_token, state=OpState.ERROR, data=failed.dump())
                return [OpEvent("error")]
        # The push upgrade page, built from the org's instance URL and the id Salesforce returned.
        data = PushData.of(operation).model_copy(update={"request_url": await client.record_url(request_id)})
        if not await self._writes.save(
            operation, lease_token, external_id=request_id, step="create_jobs", data=data.dump()
        ):
            # Canceled (or taken over) while we were creating it: do not leave it behind.
            await quietly_cancel(client, request_id)
        return []

    async def _find_orphan_request(self, operation: Operation, client: SalesforceClient) -> str | None:
        """The request an interrupted attempt created, if it can be told apart from every other one.

        Salesforce has no field to tag a push request with, so a candidate is a Created request of
        the same version, created since the attempt (less a minute of clock skew), that no other
        operation has recorded. If there is more than one candidate, or another push of the same
        version is being created at the same time, nothing is adopted: a second request is created
        and the orphan stays Created — a Created request without jobs never runs — rather than two
        operations sharing one request.
        """
        version_id = PushParams.read(operation.params).version_id
        attempted = aware(PushData.of(operation).request_attempted_at or operation.created_at)
        since = attempted - timedelta(minutes=1)
        records = await client.query(
            f"SELECT Id FROM PackagePushRequest WHERE PackageVersionId = {soql_literal(version_id)} "
            f"AND Status = 'Created' AND CreatedDate >= {since.strftime('%Y-%m-%dT%H:%M:%SZ')}"
        )
        candidates = {str(r["Id"]) for r in records}
        if not candidates:
            return None
        known, concurrent = await repo.push_request_claims(
            self._db,
            operation_id=operation.id or 0,
            version_id=version_id,
            request_ids=sorted(candidates),
            since=since,
        )
        unclaimed = candidates - known
        if len(unclaimed) != 1 or concurrent:
            log.warning(
                "push %s: %d possible orphan request(s), %d concurrent creation(s); not adopting",
                operation.ref,
                len(unclaimed),
                concurrent,
            )
            return None
        return unclaimed.pop()

    async def _set_pending(self, operation: Operation, lease_token: str, client: SalesforceClient) -> list[OpEvent]:
        request_id = operation.external_id or ""
        try:
            await client.update("PackagePushRequest", request_id, {"Status": "Pending"})
        except ApiError as exc:
            status = await request_status(client, request_id)
            if status == "Canceled":
                canceled = PushData.of(operation).model_copy(update={"request_status": status})
                await self._writes.save(operation, lease_token, state=OpState.CANCELED, data=canceled.dump())
                return [OpEvent("canceled")]
            if status == "Created":
                error = f"Salesforce refused to start it: {redact_text(exc.message)}"
                failed = PushData.of(operation).model_copy(update={"error": error})
                await self._writes.save(operation, lease_token, state=OpState.ERROR, data=failed.dump())
                return [OpEvent("error")]
            # Already Pending or further: an earlier attempt went through.
        scheduled = operation.scheduled_for is not None and aware(operation.scheduled_for) > datetime.now(UTC)
        pending = PushData.of(operation).model_copy(update={"request_status": "Pending"})
        state = OpState.SCHEDULED if scheduled else OpState.RUNNING
        if not await self._writes.save(operation, lease_token, state=state, step="", data=pending.dump()):
            return []
        return [OpEvent("scheduled" if scheduled else "started")]
