"""Push upgrades (SPEC §4): what the handlers ask for — plan, create, look up, retry and cancel.

The Salesforce writes of a push happen later, in the poller (``bot.push.steps``), step by step,
each step recorded before the next one starts, so a killed bot resumes where it stopped instead
of pushing twice:

    starting/create_request → starting/create_jobs → starting/start → scheduled|running → done

Call budget for N orgs (SPEC §11): version lookup 1–2, subscriber pages ⌈N/2000⌉, request 1,
Bulk API job 6 + polls, Pending 1 — independent of N beyond the subscriber pages.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime

from bot.core.approvals import ApprovalFacts, ApprovalRequirement, production_approvers_missing, requirement_for
from bot.core.orgs import OrgRegistry
from bot.errors import ApiError, NotAllowedError, NotFoundError, StateError
from bot.push.payloads import PlanSummary, PushData, PushParams
from bot.push.plans import PushPlan, PushPlanner, RetryPlan, VersionInfo, nothing_to_push
from bot.push.requests import OrgSelection, VersionSpec
from bot.push.upstream import packaging_client, request_status
from bot.settings import Settings
from bot.store import repo
from bot.store.db import Database
from bot.store.models import Operation, OpKind, OpState, PushTarget

NOT_RETRYABLE_ERRORS = {
    "IneligibleUpgrade": "not eligible for this upgrade",
    "FeatureMissing": "a required feature is missing in the org",
}
_TERMINAL = {OpState.REJECTED, OpState.EXPIRED, OpState.SUCCEEDED, OpState.FAILED, OpState.CANCELED, OpState.ERROR}


class PushService:
    def __init__(self, *, db: Database, orgs: OrgRegistry, settings: Settings) -> None:
        self._db = db
        self._orgs = orgs
        self._settings = settings
        self._planner = PushPlanner(orgs)

    async def resolve_version(self, spec: VersionSpec) -> tuple[VersionInfo, list[VersionInfo]]:
        """The target version and every version of its package (to place subscribers)."""
        return await self._planner.resolve_version(spec)

    async def plan(self, spec: VersionSpec, selection: OrgSelection) -> PushPlan:
        return await self._planner.plan(spec, selection)

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
            raise StateError(nothing_to_push(plan))
        now = now or datetime.now(UTC)
        requirement = self.approval_for(plan)
        data = PushData(
            plan=PlanSummary(
                total=len(plan.targets),
                rows=plan.by_version_and_type(),
                not_eligible=len(plan.not_eligible),
                skipped=dict(plan.skipped),
            ),
            # A waiver is kept for the card too.
            approval=requirement.to_state(now=now) if requirement else None,
        )
        params = PushParams(
            version_id=plan.version.id,
            package_id=plan.version.package_id,
            package=plan.version.package_name,
            version=plan.version.label,
            orgs=str(plan.selection),
            retry_of=retry_of,
            scheduled_for=scheduled_for,
        )
        waits = requirement is not None and requirement.needed
        operation = Operation(
            kind=OpKind.PUSH,
            state=OpState.AWAITING_APPROVAL if waits else OpState.STARTING,
            step="create_request",
            org=self._orgs.packaging_alias(),
            summary=f"{plan.version.package_name} {plan.version.label} → {len(plan.targets):,} orgs",
            params=params.dump(),
            data=data.dump(),
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
        spec = VersionSpec(version_id=PushParams.read(previous.params).version_id)
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
                    "data": PushData.read(operation.data).model_copy(update={"canceled_by": user}).dump(),
                },
            )
            if done:
                return await self.get(ref)
            operation = await self.get(ref)
            if operation.external_id is None:
                raise StateError(f"{operation.ref} changed while canceling ({operation.state}); try again.")
        assert operation.id is not None
        client = packaging_client(self._orgs)
        request_id = operation.external_id or ""
        status = await request_status(client, request_id)
        if status not in {"Created", "Pending"}:
            raise StateError(
                f"{operation.ref} is {status} in Salesforce. A push can only be canceled while "
                "Created or Pending; Salesforce does not stop upgrades already in progress."
            )
        try:
            await client.update("PackagePushRequest", request_id, {"Status": "Canceled"})
        except ApiError as exc:
            raise StateError(f"Salesforce refused to cancel {operation.ref}: {exc.message}") from None
        canceled = PushData.read(operation.data).model_copy(update={"canceled_by": user, "request_status": "Canceled"})
        await repo.update_operation(
            self._db,
            operation_id=operation.id,
            expect_states=[s for s in OpState if s not in _TERMINAL],
            values={"state": OpState.CANCELED, "next_poll_at": datetime.now(UTC), "data": canceled.dump()},
        )
        return await self.get(ref)
