"""Push upgrades (SPEC §4): plan, create, start, follow, cancel and retry.

The Salesforce writes of a push happen in the poller, step by step, each step recorded before
the next one starts, so a killed bot resumes where it stopped instead of pushing twice:

    starting/create_request → starting/create_jobs → starting/start → scheduled|running → done

Call budget for N orgs (SPEC §11): version lookup 1–2, subscriber pages ⌈N/2000⌉, request 1,
Bulk API job 6 + polls, Pending 1 — independent of N beyond the subscriber pages.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

from bot.clients.salesforce.rest import SalesforceClient, readable_message, soql_id_list, soql_literal
from bot.core.approvals import ApprovalFacts, ApprovalRequirement, production_approvers_missing, requirement_for
from bot.core.lifecycle import LeasedWrites
from bot.core.operations import Advance, OpEvent, OpFile
from bot.core.orgs import OrgRegistry
from bot.errors import (
    AmbiguousWriteError,
    ApiError,
    AuthError,
    NotAllowedError,
    NotFoundError,
    StateError,
    TransientError,
    UpstreamError,
    UsageError,
)
from bot.push.commands import OrgSelection, VersionSpec
from bot.redaction import csv_bytes, redact_text
from bot.settings import Settings
from bot.store import repo
from bot.store.db import Database
from bot.store.models import Operation, OpKind, OpState, PushTarget

log = logging.getLogger(__name__)

BULK_THRESHOLD = 400  # above this many orgs, jobs go through one Bulk API 2.0 ingest job
START_CONCURRENCY = 8  # pushes started side by side in one cycle (each is a few sequential calls)
IN_CHUNK = 200  # ids per IN (...) clause: keeps SOQL well under its 100,000-character limit
NOT_RETRYABLE_ERRORS = {
    "IneligibleUpgrade": "not eligible for this upgrade",
    "FeatureMissing": "a required feature is missing in the org",
}
MAX_BULK_JOBS = 3  # ingest jobs that may end Failed for one push before the orgs left are given up
JOB_DONE_STATES = {"Succeeded", "Failed", "Canceled", "Cancelled"}
REQUEST_TERMINAL = {"Succeeded", "Failed", "Canceled", "Cancelled"}


def _canon(status: str) -> str:
    """Salesforce has spelled it both ways over the years."""
    return "Canceled" if status == "Cancelled" else status


@dataclass(frozen=True)
class VersionInfo:
    id: str
    package_id: str
    package_name: str
    number: tuple[int, int, int, int]
    release_state: str
    deprecated: bool

    @cached_property  # read once per subscriber when planning: thousands of times
    def label(self) -> str:
        return ".".join(str(part) for part in self.number[:3])


@dataclass(frozen=True)
class Target:
    org_key: str
    org_name: str
    org_type: str
    org_status: str
    from_version: str


@dataclass
class PushPlan:
    version: VersionInfo
    selection: OrgSelection
    targets: list[Target]
    not_eligible: list[tuple[str, str]] = field(default_factory=list)  # (org id, why) for listed ids
    skipped: Counter[str] = field(default_factory=Counter)  # why → how many subscribers left out

    @property
    def org_kinds(self) -> frozenset[str]:
        return frozenset(target.org_type.lower() for target in self.targets)

    def by_version_and_type(self) -> list[tuple[str, str, int]]:
        counts = Counter((t.from_version, t.org_type) for t in self.targets)
        return sorted(((v, k, n) for (v, k), n in counts.items()), key=lambda row: (_version_key(row[0]), row[1]))


def _version_key(label: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in label.split("."))
    except ValueError:
        return (0,)


@dataclass(frozen=True)
class RetryPlan:
    plan: PushPlan
    previous: Operation
    left_out: Counter[str]


class PushService:
    def __init__(self, *, db: Database, orgs: OrgRegistry, settings: Settings) -> None:
        self._db = db
        self._orgs = orgs
        self._settings = settings
        self._writes = LeasedWrites(db)

    # -- reading Salesforce ------------------------------------------------------------------
    def _client(self) -> tuple[str, SalesforceClient]:
        alias = self._orgs.packaging_alias()
        return alias, self._orgs.client(alias)

    async def _versions(self, client: SalesforceClient, where: str) -> list[VersionInfo]:
        records = await client.query(
            "SELECT Id, MetadataPackageId, MetadataPackage.Name, MajorVersion, MinorVersion, PatchVersion, "
            f"BuildNumber, ReleaseState, IsDeprecated FROM MetadataPackageVersion WHERE {where}"
        )
        return [
            VersionInfo(
                id=record["Id"],
                package_id=record["MetadataPackageId"],
                package_name=(record.get("MetadataPackage") or {}).get("Name") or "",
                number=(
                    int(record.get("MajorVersion") or 0),
                    int(record.get("MinorVersion") or 0),
                    int(record.get("PatchVersion") or 0),
                    int(record.get("BuildNumber") or 0),
                ),
                release_state=record.get("ReleaseState") or "",
                deprecated=bool(record.get("IsDeprecated")),
            )
            for record in records
        ]

    async def resolve_version(self, spec: VersionSpec) -> tuple[VersionInfo, list[VersionInfo]]:
        """The target version and every version of its package (to place subscribers)."""
        _, client = self._client()
        if spec.version_id:
            found = await self._versions(client, f"Id = {soql_literal(spec.version_id)}")
            if not found:
                raise NotFoundError(f"No package version `{spec.version_id}` in the packaging org.")
            versions = await self._versions(client, f"MetadataPackageId = {soql_literal(found[0].package_id)}")
            target = found[0]
        else:
            assert spec.package_name is not None and spec.number is not None
            versions = await self._versions(client, f"MetadataPackage.Name = {soql_literal(spec.package_name)}")
            if not versions:
                raise NotFoundError(
                    f"No package called `{spec.package_name}` in the packaging org (names are matched exactly)."
                )
            matches = [v for v in versions if v.number[:3] == spec.number]
            released = [v for v in matches if v.release_state == "Released"]
            target_list = sorted(released or matches, key=lambda v: v.number)
            if not target_list:
                available = ", ".join(
                    v.label
                    for v in sorted(versions, key=lambda v: v.number)
                    if v.release_state == "Released" and not v.deprecated
                )
                raise NotFoundError(
                    f"{spec.package_name} has no version {'.'.join(map(str, spec.number))}. "
                    f"Released versions: {available or 'none'}."
                )
            target = target_list[-1]
        if target.release_state != "Released":
            raise StateError(
                f"{target.package_name} {target.label} is {target.release_state or 'not released'}; "
                "only Released versions can be pushed."
            )
        if target.deprecated:
            raise StateError(f"{target.package_name} {target.label} is deprecated; push a current version.")
        return target, versions

    async def plan(self, spec: VersionSpec, selection: OrgSelection) -> PushPlan:
        target, versions = await self.resolve_version(spec)
        by_id = {v.id[:15]: v for v in versions}
        _, client = self._client()
        fields = "OrgKey, OrgName, OrgType, OrgStatus, InstalledStatus, MetadataPackageVersionId"
        of_package = f"MetadataPackageId = {soql_literal(target.package_id)}"
        base = f"SELECT {fields} FROM PackageSubscriber WHERE {of_package}"
        plan = PushPlan(version=target, selection=selection, targets=[])
        if selection.scope == "ids":
            records: list[dict[str, Any]] = []
            for start in range(0, len(selection.org_ids), IN_CHUNK):
                chunk = selection.org_ids[start : start + IN_CHUNK]
                records.extend(await client.query(f"{base} AND OrgKey IN {soql_id_list(chunk)}"))
            seen = {str(r["OrgKey"])[:15] for r in records}
            plan.not_eligible.extend(
                (org_id, "not a subscriber of this package") for org_id in selection.org_ids if org_id[:15] not in seen
            )
        else:
            where = " AND InstalledStatus = 'i' AND OrgStatus != 'Inactive'"
            if selection.scope in {"production", "sandbox"}:
                where += f" AND OrgType = {soql_literal(selection.scope.capitalize())}"
            older = [v.id for v in versions if v.number < target.number]
            up_to_date = [v.id for v in versions if v.number >= target.number]
            if older and len(versions) <= IN_CHUNK:
                # Only the orgs that need the push come back: the pages read (2,000 rows each) grow
                # with the push, not with the whole subscriber base. The rest are only counted.
                older_ids = soql_id_list(older)
                records = await client.query(f"{base}{where} AND MetadataPackageVersionId IN {older_ids}")
                left_out = await client.count(
                    "PackageSubscriber",
                    f"{of_package}{where} AND MetadataPackageVersionId IN {soql_id_list(up_to_date)}",
                )
                if left_out:
                    plan.skipped["already on this version or newer"] += left_out
            else:
                records = await client.query(base + where)
        for record in records:
            key = str(record["OrgKey"])[:15]
            current = by_id.get(str(record.get("MetadataPackageVersionId") or "")[:15])
            reason = None
            if record.get("InstalledStatus") != "i":
                reason = "package uninstalled"
            elif record.get("OrgStatus") == "Inactive":
                reason = "org inactive (expired or deleted)"
            elif current is None:
                reason = "on a version this packaging org does not know"
            elif current.number >= target.number:
                reason = (
                    "already on this version"
                    if current.number == target.number
                    else (f"already on a newer version ({current.label})")
                )
            if reason:
                plan.skipped["already on this version or newer" if reason.startswith("already") else reason] += 1
                if selection.scope == "ids":
                    plan.not_eligible.append((key, reason))
                continue
            assert current is not None
            plan.targets.append(
                Target(
                    org_key=key,
                    org_name=str(record.get("OrgName") or ""),
                    org_type=str(record.get("OrgType") or ""),
                    org_status=str(record.get("OrgStatus") or ""),
                    from_version=current.label,
                )
            )
        return plan

    # -- creating ------------------------------------------------------------------------------
    def approval_for(self, plan: PushPlan) -> ApprovalRequirement | None:
        facts = ApprovalFacts(
            action="push", org=self._orgs.packaging_alias(), org_kinds=plan.org_kinds, package=plan.version.package_name
        )
        requirement = requirement_for(facts, self._settings.approval)
        missing = production_approvers_missing(facts, requirement)
        if missing:
            raise NotAllowedError(missing)
        return requirement

    async def create(
        self,
        plan: PushPlan,
        *,
        requester: str,
        channel: str,
        idempotency_key: str,
        scheduled_for: datetime | None = None,
        retry_of: str | None = None,
        now: datetime | None = None,
    ) -> tuple[Operation, bool]:
        """Record the push; the poller performs the Salesforce writes. Returns (operation, created)."""
        if not plan.targets:
            raise StateError(_nothing_to_push(plan))
        now = now or datetime.now(UTC)
        requirement = self.approval_for(plan)
        data: dict[str, Any] = {
            "plan": {
                "total": len(plan.targets),
                "rows": plan.by_version_and_type(),
                "not_eligible": len(plan.not_eligible),
                "skipped": dict(plan.skipped),
            },
        }
        if requirement:
            data["approval"] = requirement.to_data(now=now)  # a waiver is kept for the card too
        waits = requirement is not None and requirement.needed
        operation = Operation(
            kind=OpKind.PUSH,
            state=OpState.AWAITING_APPROVAL if waits else OpState.STARTING,
            step="create_request",
            org=self._orgs.packaging_alias(),
            summary=f"{plan.version.package_name} {plan.version.label} → {len(plan.targets):,} orgs",
            params={
                "version_id": plan.version.id,
                "package_id": plan.version.package_id,
                "package": plan.version.package_name,
                "version": plan.version.label,
                "orgs": str(plan.selection),
                "retry_of": retry_of,
                "scheduled_for": scheduled_for.isoformat() if scheduled_for else None,
            },
            data=data,
            requester=requester,
            channel=channel,
            idempotency_key=idempotency_key,
            scheduled_for=scheduled_for,
            next_poll_at=now,
            approval_expires_at=(now + requirement.expires_after) if waits and requirement else None,
        )
        operation, created = await repo.insert_operation(self._db, operation=operation)
        if created:
            assert operation.id is not None
            await repo.add_push_targets(
                self._db,
                operation_id=operation.id,
                targets=[
                    {
                        "org_key": t.org_key,
                        "org_name": t.org_name,
                        "org_type": t.org_type,
                        "org_status": t.org_status,
                        "from_version": t.from_version,
                    }
                    for t in plan.targets
                ],
            )
        return operation, created

    async def get(self, ref: str) -> Operation:
        operation = await repo.find_operation(self._db, kind=OpKind.PUSH, ref=ref)
        if operation is None or operation.kind != OpKind.PUSH:
            raise NotFoundError(f"No push `{ref}`. `/push list` shows recent ones.")
        return operation

    async def recent(self, *, channel: str, user: str, limit: int = 15) -> Sequence[Operation]:
        """What a list shows in ``channel`` to ``user``: that channel's, and the user's own anywhere."""
        return await repo.list_operations(self._db, kind=OpKind.PUSH, limit=limit, channel=channel, user=user)

    async def retry_plan(self, ref: str) -> RetryPlan:
        previous = await self.get(ref)
        if not previous.is_terminal or previous.state in {OpState.REJECTED, OpState.EXPIRED}:
            raise StateError(
                f"{previous.ref} is {previous.state.replace('_', ' ')}; only a finished push can be retried."
            )
        assert previous.id is not None
        targets = await repo.push_targets(self._db, operation_id=previous.id)
        failed = [t for t in targets if t.job_status == "Failed"]
        if not failed:
            raise StateError(f"{previous.ref} has no failed orgs to retry.")
        left_out: Counter[str] = Counter()
        retryable: list[PushTarget] = []
        for target in failed:
            why = NOT_RETRYABLE_ERRORS.get(target.error_type or "")
            if why:
                left_out[f"{target.error_type}: {why}"] += 1
            else:
                retryable.append(target)
        selection = OrgSelection(scope="ids", org_ids=tuple(t.org_key for t in retryable))
        spec = VersionSpec(version_id=str(previous.params["version_id"]))
        if retryable:
            plan = await self.plan(spec, selection)
        else:
            version, _ = await self.resolve_version(spec)
            plan = PushPlan(version=version, selection=selection, targets=[])
        for _, why in plan.not_eligible:
            left_out[why] += 1
        plan.not_eligible = []  # already counted in left_out, with the reason
        return RetryPlan(plan=plan, previous=previous, left_out=left_out)

    # -- cancel ------------------------------------------------------------------------------
    async def cancel(self, ref: str, *, user: str) -> Operation:
        operation = await self.get(ref)
        assert operation.id is not None
        if operation.is_terminal:
            raise StateError(f"{operation.ref} already ended ({operation.state}); nothing to cancel.")
        if operation.external_id is None:
            # Nothing exists in Salesforce yet. If the poller is creating the request right now,
            # either its save of the request id comes first (this compare-and-set then fails and
            # the request is canceled in Salesforce below) or ours does (its save fails and it
            # cancels the request it just created).
            done = await repo.update_operation(
                self._db,
                operation_id=operation.id,
                expect_states=[OpState.AWAITING_APPROVAL, OpState.STARTING],
                expect_no_external_id=True,
                values={
                    "state": OpState.CANCELED,
                    "next_poll_at": datetime.now(UTC),
                    "data": {**operation.data, "canceled_by": user},
                },
            )
            if done:
                return await self.get(ref)
            operation = await self.get(ref)
            if operation.external_id is None:
                raise StateError(f"{operation.ref} changed while canceling ({operation.state}); try again.")
        _, client = self._client()
        request = await client.get_record("PackagePushRequest", operation.external_id or "")
        status = _canon(str(request.get("Status") or ""))
        if status not in {"Created", "Pending"}:
            raise StateError(
                f"{operation.ref} is {status} in Salesforce. A push can only be canceled while "
                "Created or Pending; Salesforce does not stop upgrades already in progress."
            )
        try:
            await client.update("PackagePushRequest", operation.external_id or "", {"Status": "Canceled"})
        except ApiError as exc:
            raise StateError(f"Salesforce refused to cancel {operation.ref}: {exc.message}") from None
        await repo.update_operation(
            self._db,
            operation_id=operation.id,
            expect_states=[s for s in OpState if s not in _TERMINAL],
            values={
                "state": OpState.CANCELED,
                "next_poll_at": datetime.now(UTC),
                "data": {**operation.data, "canceled_by": user, "request_status": "Canceled"},
            },
        )
        return await self.get(ref)

    # -- the poller's side ---------------------------------------------------------------------
    async def advance(self, operations: Sequence[Operation], *, lease_token: str) -> dict[int, Advance]:
        results: dict[int, Advance] = {}
        watching = [op for op in operations if op.state in {OpState.SCHEDULED, OpState.RUNNING}]
        others = [op for op in operations if op.state not in {OpState.SCHEDULED, OpState.RUNNING}]
        limit = asyncio.Semaphore(START_CONCURRENCY)

        async def one(operation: Operation) -> None:
            assert operation.id is not None
            async with limit:
                try:
                    results[operation.id] = await self._advance_one(operation, lease_token)
                except TransientError as exc:
                    results[operation.id] = await self._writes.transient(operation, lease_token, exc)
                except AuthError as exc:
                    results[operation.id] = await self._writes.transient(operation, lease_token, exc, delay=300)

        # Pushes being started are independent of each other: start several side by side.
        await asyncio.gather(*(one(op) for op in others))
        if watching:
            try:
                results.update(await self._watch(watching, lease_token))
            except (TransientError, AuthError) as exc:
                for operation in watching:
                    assert operation.id is not None
                    results[operation.id] = await self._writes.transient(operation, lease_token, exc)
        return results

    async def _advance_one(self, operation: Operation, lease_token: str) -> Advance:
        if operation.state == OpState.AWAITING_APPROVAL:
            return await self._writes.check_expiry(operation, lease_token)
        if operation.state == OpState.STARTING:
            return await self._start(operation, lease_token)
        if (
            operation.state == OpState.CANCELED
            and operation.external_id
            and operation.data.get("request_status") != "Canceled"
        ):
            return await self._finish_cancel(operation, lease_token)
        return Advance()

    async def _finish_cancel(self, operation: Operation, lease_token: str) -> Advance:
        """Canceled while its request was being created: cancel that request too, so none is left behind."""
        _, client = self._client()
        request_id = operation.external_id or ""
        status = _canon(str((await client.get_record("PackagePushRequest", request_id)).get("Status") or ""))
        if status in {"Created", "Pending"}:
            await _quietly_cancel(client, request_id)
            status = "Canceled"
        await self._writes.save(operation, lease_token, data={**operation.data, "request_status": status})
        return Advance()

    async def _start(self, operation: Operation, lease_token: str) -> Advance:
        _, client = self._client()
        events: list[OpEvent] = []
        if operation.step == "create_request":
            events.extend(await self._create_request(operation, lease_token, client))
            if operation.state != OpState.STARTING:
                return Advance(events=events)
        if operation.step == "create_jobs":
            events.extend(await self._create_jobs(operation, lease_token, client))
            if operation.state != OpState.STARTING:
                return Advance(events=events)
        if operation.step == "start":
            events.extend(await self._set_pending(operation, lease_token, client))
        return Advance(events=events, next_poll_in=2.0)

    async def _create_request(self, operation: Operation, lease_token: str, client: SalesforceClient) -> list[OpEvent]:
        fields: dict[str, Any] = {"PackageVersionId": operation.params["version_id"]}
        if operation.scheduled_for:
            fields["ScheduledStartTime"] = _sf_datetime(operation.scheduled_for)
        request_id: str | None = None
        if operation.data.get("request_attempted_at"):
            # A previous attempt may have created it and died before recording the id.
            request_id = await self._find_orphan_request(operation, client)
        if request_id is None:
            attempted = {**operation.data, "request_attempted_at": datetime.now(UTC).isoformat()}
            if not await self._writes.save(operation, lease_token, data=attempted):
                return []
            try:
                request_id = await client.create("PackagePushRequest", fields)
            except AmbiguousWriteError:
                request_id = await self._find_orphan_request(operation, client)
                if request_id is None:
                    raise
            except ApiError as exc:
                await self._writes.save(
                    operation,
                    lease_token,
                    state=OpState.ERROR,
                    data={
                        **operation.data,
                        "error": f"Salesforce refused the push request: {redact_text(exc.message)}",
                    },
                )
                return [OpEvent("error")]
        # The push upgrade page, built from the org's instance URL and the id Salesforce returned.
        data = {**operation.data, "request_url": await client.record_url(request_id)}
        if not await self._writes.save(operation, lease_token, external_id=request_id, step="create_jobs", data=data):
            # Canceled (or taken over) while we were creating it: do not leave it behind.
            await _quietly_cancel(client, request_id)
            return []
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
        version_id = str(operation.params["version_id"])
        attempted = _aware(
            datetime.fromisoformat(operation.data.get("request_attempted_at") or operation.created_at.isoformat())
        )
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

    async def _create_jobs(self, operation: Operation, lease_token: str, client: SalesforceClient) -> list[OpEvent]:
        assert operation.id is not None and operation.external_id is not None
        targets = await repo.push_targets(self._db, operation_id=operation.id)
        pending = [t for t in targets if t.job_id is None and t.refused_reason is None]
        if pending:
            bulk_started = operation.data.get("bulk_job_id") or operation.data.get("bulk_failures")
            if len(pending) > BULK_THRESHOLD or bulk_started:
                created, refused = await self._create_jobs_bulk(operation, lease_token, client, pending)
            elif operation.data.get("jobs_attempted_at"):
                # An earlier attempt (a replica killed mid-step, say) may have created some of these
                # jobs without recording them: creating them again would only be refused as duplicates.
                existing = await self._existing_jobs(operation, client)
                remaining = [t for t in pending if t.org_key[:15] not in existing]
                created, refused = (
                    await self._create_jobs_collections(operation, client, remaining) if remaining else ({}, {})
                )
                created = {
                    **{t.org_key[:15]: existing[t.org_key[:15]] for t in pending if t.org_key[:15] in existing},
                    **created,
                }
            else:
                attempted = {**operation.data, "jobs_attempted_at": datetime.now(UTC).isoformat()}
                if not await self._writes.save(operation, lease_token, data=attempted):
                    return []
                created, refused = await self._create_jobs_collections(operation, client, pending)
            await repo.record_push_job_results(self._db, operation_id=operation.id, job_ids=created, refused=refused)
            targets = await repo.push_targets(self._db, operation_id=operation.id)
        # Counted from the stored targets, so a resumed step never counts twice.
        refusals = sorted((t.org_key, t.refused_reason or "") for t in targets if t.refused_reason)
        jobs = {"created": sum(1 for t in targets if t.job_id), "refused": len(refusals)}
        bookkeeping = {"bulk_job_id", "bulk_job_rows", "bulk_failures", "jobs_attempted_at"}
        data = {key: value for key, value in operation.data.items() if key not in bookkeeping}
        data["jobs"] = jobs
        detail = {"created": jobs["created"], "refused": refusals[:50], "refused_total": jobs["refused"]}
        if operation.data.get("bulk_failures"):
            detail["bulk_failures"] = list(operation.data["bulk_failures"])
            detail["bulk_gave_up"] = len(operation.data["bulk_failures"]) >= MAX_BULK_JOBS
        events = [OpEvent("jobs_created", detail)]
        if jobs["created"] == 0:
            await _quietly_cancel(client, operation.external_id)
            await self._writes.save(
                operation,
                lease_token,
                state=OpState.ERROR,
                data={**data, "error": "Salesforce refused every org; nothing was pushed."},
            )
            return [*events, OpEvent("error")]
        await self._writes.save(operation, lease_token, step="start", data=data)
        return events

    async def _create_jobs_collections(
        self, operation: Operation, client: SalesforceClient, targets: Sequence[PushTarget]
    ) -> tuple[dict[str, str], dict[str, str]]:
        records = [
            {"PackagePushRequestId": operation.external_id, "SubscriberOrganizationKey": t.org_key} for t in targets
        ]
        try:
            results = await client.create_many("PackagePushJob", records, all_or_none=False)
        except AmbiguousWriteError:
            # Some chunks may have been created: read back what exists, then create the rest.
            existing = await self._existing_jobs(operation, client)
            remaining = [t for t in targets if t.org_key[:15] not in existing]
            created, refused = (
                await self._create_jobs_collections(operation, client, remaining) if remaining else ({}, {})
            )
            return {**existing, **created}, refused
        created: dict[str, str] = {}
        refused: dict[str, str] = {}
        for target, result in zip(targets, results, strict=True):
            if result.success and result.id:
                created[target.org_key[:15]] = result.id
            else:
                refused[target.org_key[:15]] = result.error_text or "refused"
        return created, refused

    async def _existing_jobs(self, operation: Operation, client: SalesforceClient) -> dict[str, str]:
        records = await client.query(
            "SELECT Id, SubscriberOrganizationKey FROM PackagePushJob WHERE PackagePushRequestId = "
            f"{soql_literal(operation.external_id or '')}"
        )
        return {str(r["SubscriberOrganizationKey"])[:15]: str(r["Id"]) for r in records}

    async def _create_jobs_bulk(
        self, operation: Operation, lease_token: str, client: SalesforceClient, targets: Sequence[PushTarget]
    ) -> tuple[dict[str, str], dict[str, str]]:
        """One ingest job for every org; after a job that ended Failed or Aborted, one more for the rest.

        Salesforce keeps what such a job already inserted ("create a new ingest job to process the
        records that weren't processed"), so the jobs that exist are read back from PackagePushJob
        and only orgs still without one are sent again: never a duplicate, never a lost job. At most
        ``MAX_BULK_JOBS`` jobs end Failed; after that the orgs still without a job are listed as
        refused with the reason and the push goes on with the others.
        """
        failures: list[str] = list(operation.data.get("bulk_failures") or [])
        reconcile = bool(failures)
        job_id = operation.data.get("bulk_job_id")
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
                    existing = await self._existing_jobs(operation, client)
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
            info = await self._wait_bulk(client, job_id)
            if info.get("state") == "JobComplete":
                created, refused = await self._bulk_outcome(client, job_id, info)
                return {**found, **created}, refused
            uploaded = int(operation.data.get("bulk_job_rows") or len(remaining))
            if info.get("state") == "Failed":
                failures.append(_bulk_failure_text(job_id, info, uploaded=uploaded))
                log.warning("push %s: %s", operation.ref, failures[-1])
            # Aborted (by us after an upload whose answer was lost, or by an admin) is not
            # counted as a failure, but what it processed before it stopped is kept all the same.
            reconcile = True
            data = {**operation.data, "bulk_job_id": None, "bulk_failures": failures}
            if not await self._writes.save(operation, lease_token, data=data):
                raise TransientError("the push changed while its jobs were being created", system="salesforce")
            job_id = None

    async def _submit_bulk(
        self, operation: Operation, lease_token: str, client: SalesforceClient, targets: Sequence[PushTarget]
    ) -> str:
        job_id = await client.bulk_create_insert_job("PackagePushJob")
        data = {**operation.data, "bulk_job_id": job_id, "bulk_job_rows": len(targets)}
        await self._writes.save(operation, lease_token, data=data)
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

    async def _bulk_outcome(
        self, client: SalesforceClient, job_id: str, info: dict[str, Any]
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Created and refused orgs of a JobComplete ingest job, from its result sets."""
        # The job's counts say which result sets hold anything: at 50,000 orgs every call counts.
        # Without them (they are documented for every finished job), read both.
        processed, failed = info.get("numberRecordsProcessed"), info.get("numberRecordsFailed")
        counted = processed is not None and failed is not None
        any_created = not counted or int(processed) > int(failed)
        any_refused = not counted or int(failed) > 0
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

    async def _wait_bulk(self, client: SalesforceClient, job_id: str) -> dict[str, Any]:
        """Poll the ingest job with a growing delay; a killed bot resumes from the stored job id."""
        delay = 0.25
        for _ in range(40):
            info = await client.bulk_job(job_id)
            if info.get("state") in {"JobComplete", "Failed", "Aborted"}:
                return info
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
        raise TransientError(f"Bulk API job {job_id} is still processing", system="salesforce")

    async def _set_pending(self, operation: Operation, lease_token: str, client: SalesforceClient) -> list[OpEvent]:
        request_id = operation.external_id or ""
        try:
            await client.update("PackagePushRequest", request_id, {"Status": "Pending"})
        except ApiError as exc:
            status = _canon(str((await client.get_record("PackagePushRequest", request_id)).get("Status") or ""))
            if status == "Canceled":
                await self._writes.save(
                    operation, lease_token, state=OpState.CANCELED, data={**operation.data, "request_status": status}
                )
                return [OpEvent("canceled")]
            if status == "Created":
                await self._writes.save(
                    operation,
                    lease_token,
                    state=OpState.ERROR,
                    data={**operation.data, "error": f"Salesforce refused to start it: {redact_text(exc.message)}"},
                )
                return [OpEvent("error")]
            # Already Pending or further: an earlier attempt went through.
        scheduled = operation.scheduled_for is not None and _aware(operation.scheduled_for) > datetime.now(UTC)
        state = OpState.SCHEDULED if scheduled else OpState.RUNNING
        if not await self._writes.save(
            operation, lease_token, state=state, step="", data={**operation.data, "request_status": "Pending"}
        ):
            return []
        return [OpEvent("scheduled" if scheduled else "started")]

    async def _watch(self, operations: list[Operation], lease_token: str) -> dict[int, Advance]:
        """One status query and one aggregate query for every watched push of the org."""
        _, client = self._client()
        now = datetime.now(UTC)
        due = [
            op
            for op in operations
            if op.state == OpState.RUNNING or op.scheduled_for is None or _aware(op.scheduled_for) <= now
        ]
        results: dict[int, Advance] = {}
        due_ids = {op.id for op in due}
        for op in operations:
            if op.id not in due_ids:
                assert op.id is not None and op.scheduled_for is not None
                wait = (_aware(op.scheduled_for) - now).total_seconds()
                results[op.id] = Advance(next_poll_in=max(1.0, min(wait, 600.0)))
        if not due:
            return results
        ids = [op.external_id or "" for op in due]
        statuses: dict[str, str] = {}
        counts: dict[str, Counter[str]] = {request_id[:15]: Counter() for request_id in ids}
        chunks = [ids[start : start + IN_CHUNK] for start in range(0, len(ids), IN_CHUNK)]
        # The IN lists stay short enough for a GET URL; the chunks run side by side.
        answers = await asyncio.gather(*(self._status_and_counts(client, chunk) for chunk in chunks))
        for chunk_statuses, chunk_counts in answers:
            statuses.update(chunk_statuses)
            for key, counter in chunk_counts.items():
                counts[key].update(counter)
        progress: list[dict[str, Any]] = []  # plain progress of many pushes: saved in one statement
        for op in due:
            assert op.id is not None
            key = (op.external_id or "")[:15]
            results[op.id] = await self._observe(
                op, lease_token, client, statuses.get(key, ""), counts[key], now, progress=progress
            )
        await repo.update_many(self._db, rows=progress)
        return results

    async def _status_and_counts(
        self, client: SalesforceClient, request_ids: Sequence[str]
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
        statuses = {str(r["Id"])[:15]: _canon(str(r.get("Status") or "")) for r in requests}
        counts: dict[str, Counter[str]] = {}
        for record in jobs:
            key = str(record["PackagePushRequestId"])[:15]
            counts.setdefault(key, Counter())[_canon(str(record.get("Status") or ""))] += int(record.get("n") or 0)
        return statuses, counts

    async def _observe(
        self,
        op: Operation,
        lease_token: str,
        client: SalesforceClient,
        status: str,
        counts: Counter[str],
        now: datetime,
        *,
        progress: list[dict[str, Any]],
    ) -> Advance:
        previous = op.data.get("request_status")
        data = {**op.data, "request_status": status, "counts": dict(counts)}
        events: list[OpEvent] = []
        if status == "In Progress" and previous != "In Progress":
            events.append(OpEvent("in_progress"))
        if status in REQUEST_TERMINAL:
            summary = await self._collect_failures(op, client, counts)
            final = {"Succeeded": OpState.SUCCEEDED, "Failed": OpState.FAILED}.get(status, OpState.CANCELED)
            data["summary"] = summary
            if await self._writes.save(op, lease_token, state=final, data=data):
                events.append(OpEvent("completed"))
            return Advance(events=events)
        state = OpState.RUNNING if status == "In Progress" else op.state
        started = op.data.get("running_since") or now.isoformat()
        data = {key: value for key, value in data.items() if key not in {"transient_failures", "last_problem"}}
        data["running_since"] = started
        if state != op.state or data != op.data:  # an idle cycle writes nothing
            progress.append(
                {"id": op.id, "lease_token": lease_token, "expect_state": op.state, "state": state, "data": data}
            )
        elapsed = (now - datetime.fromisoformat(started)).total_seconds()
        return Advance(events=events, next_poll_in=max(2.0, min(elapsed / 10.0, 60.0)))

    async def _collect_failures(self, op: Operation, client: SalesforceClient, counts: Counter[str]) -> dict[str, Any]:
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
                    errors[key] = {
                        name: str(record.get(name) or "")
                        for name in ("ErrorType", "ErrorTitle", "ErrorMessage", "ErrorDetails", "ErrorSeverity")
                    }
        await repo.record_push_failures(self._db, operation_id=op.id, errors=errors)
        groups = _failure_groups(errors.values())
        failed = int(counts.get("Failed", 0))
        return {
            "succeeded": int(counts.get("Succeeded", 0)),
            "failed": failed,
            "canceled": int(counts.get("Canceled", 0)),
            "total": sum(counts.values()),
            "groups": groups[:10],
            "group_count": len(groups),
            "without_error_record": max(0, failed - len(errors)),
        }

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


_TERMINAL = {OpState.REJECTED, OpState.EXPIRED, OpState.SUCCEEDED, OpState.FAILED, OpState.CANCELED, OpState.ERROR}


def _nothing_to_push(plan: PushPlan) -> str:
    reasons = ", ".join(f"{count:,} {why}" for why, count in plan.skipped.most_common()) or "no matching subscribers"
    return f"Nothing to push for {plan.version.package_name} {plan.version.label} ({plan.selection}): {reasons}."


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


_NUMBER_RE = re.compile(r"\d+")


def _failure_groups(errors: Iterable[dict[str, str]]) -> list[dict[str, Any]]:
    """Failures grouped by type, title and message, largest group first.

    Salesforce writes a number of its own into some messages ("…contact support: 1934261182-77421
    (-1093283713)" differs for every org), so messages are compared with their numbers blanked out
    and their whitespace collapsed; the group shows the first message as Salesforce wrote it (one
    line) and says when the numbers differ. The CSV keeps every message whole.
    """
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for error in errors:
        title, message = readable_message(error["ErrorTitle"]), readable_message(error["ErrorMessage"])
        key = (error["ErrorType"], _NUMBER_RE.sub("#", title), _NUMBER_RE.sub("#", message))
        group = groups.get(key)
        if group is None:
            groups[key] = {"type": error["ErrorType"], "title": title, "message": message, "count": 1}
        else:
            group["count"] += 1
            if (title, message) != (group["title"], group["message"]):
                group["numbers_vary"] = True
    return sorted(groups.values(), key=lambda group: -int(group["count"]))


def _sf_datetime(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


async def _quietly_cancel(client: SalesforceClient, request_id: str) -> None:
    try:
        await client.update("PackagePushRequest", request_id, {"Status": "Canceled"})
    except (UpstreamError, UsageError):
        log.warning("could not cancel orphaned push request %s", request_id)
