"""Metadata deployments (SPEC §5): plan, create, send, follow, cancel, quick-deploy.

A deployment is an Operation of kind ``deploy`` (refs ``D1`` …). Everything the user can get
wrong is checked by ``plan`` / ``plan_quick`` before the operation exists: the org, the
production rules, the test options, the artifact (see ``bot.deploy.artifacts``) and, for a
quick deploy, the validation it reuses. The Metadata API calls happen in the poller:

    awaiting_approval ─approve→ starting ─deploy()→ running ─checkDeployStatus…→ done
    [scheduled until --at] ↗                         └cancelDeploy→ canceling → canceled

``deploy()`` (or ``deployRecentValidation()``) is called once: ``submit_attempted_at`` is
recorded before the call and the returned id right after it. If the outcome is unknown (the
connection dropped mid-call, or the bot died between the two records) the operation ends in
``error`` saying so — Salesforce may have started it, and a second deployment must never be
sent blindly. Calls that certainly did nothing (connect errors, 503, limits, an expired session)
are retried. Status is then polled with ``includeDetails=true``, every few seconds at first and
about once a minute for long deployments.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from bot.clients.retry import RetryPolicy
from bot.clients.salesforce.metadata import DeployOptions, DeployResult, MetadataClient
from bot.core.approvals import (
    ApprovalFacts,
    ApprovalRequirement,
    production_approvers_missing,
    requirement_for,
)
from bot.core.lifecycle import LeasedWrites
from bot.core.operations import Advance, OpEvent, OpFile
from bot.core.orgs import OrgRegistry
from bot.deploy.artifacts import Artifact, ArtifactStore
from bot.deploy.commands import DEPLOY_USAGE, DeployFlags, DeployStart
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
    UserError,
)
from bot.redaction import redact_text
from bot.settings import Settings
from bot.store import repo
from bot.store.db import Database
from bot.store.models import TERMINAL_STATES, Operation, OpKind, OpState

log = logging.getLogger(__name__)

VALIDATION_WINDOW = timedelta(days=10)  # deployRecentValidation: validations of the last 10 days
MAX_STORED_FAILURES = 1000  # per list; the report says how many more Salesforce returned
FINAL_STATE = {
    "Succeeded": OpState.SUCCEEDED,
    "SucceededPartial": OpState.FAILED,
    "Failed": OpState.FAILED,
    "Canceled": OpState.CANCELED,
}
ACTION_LABEL = {"deploy": "Deploy", "validate": "Validate", "quick_deploy": "Quick deploy"}


@dataclass(frozen=True)
class OrgInfo:
    alias: str
    kind: str
    label: str | None
    deploy_approval: bool  # deployments there need an approval
    approvers: tuple[str, ...]  # user / user-group ids; empty: anyone (but the requester)
    validate_approval: bool  # whether a validation there needs approval too
    active: int  # deployments from here not finished yet


@dataclass
class DeployPlan:
    action: str  # deploy | validate
    org: str
    org_kind: str
    options: DeployOptions
    artifact: Artifact
    notes: list[str] = field(default_factory=list)


@dataclass
class QuickPlan:
    validation: Operation
    org: str
    org_kind: str
    validation_id: str
    usable_until: datetime
    # Two clicks (or a click and a command) for the same validation create one quick deploy;
    # after one ended without deploying (rejected, expired, canceled), a new one may be asked.
    idempotency_key: str
    notes: list[str] = field(default_factory=list)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat() if moment else None


def validation_usable_until(op: Operation) -> datetime | None:
    """Until when ``op`` can be quick-deployed, or None if it never can (not a succeeded
    validation whose Apex tests ran)."""
    result = op.data.get("result") or {}
    if op.params.get("action") != "validate" or op.state != OpState.SUCCEEDED or not op.external_id:
        return None
    if int((result.get("tests") or [0, 0, 0])[1] or 0) == 0:
        return None
    completed = result.get("completed_date")
    finished = datetime.fromisoformat(completed) if completed else (op.finished_at or op.updated_at)
    return _aware(finished) + VALIDATION_WINDOW


class DeployService:
    def __init__(
        self,
        *,
        db: Database,
        orgs: OrgRegistry,
        settings: Settings,
        session: aiohttp.ClientSession,
        artifacts: ArtifactStore | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._db = db
        self._orgs = orgs
        self._settings = settings
        self._session = session
        self._retry = retry
        self.artifacts = artifacts or ArtifactStore(config=settings.artifacts, session=session)
        self._writes = LeasedWrites(db)
        self._clients: dict[str, MetadataClient] = {}

    def metadata(self, alias: str) -> MetadataClient:
        if alias not in self._clients:
            timeout = aiohttp.ClientTimeout(total=max(300.0, self._settings.http_timeout_seconds), connect=10)
            self._clients[alias] = MetadataClient(
                rest=self._orgs.client(alias), session=self._session, timeout=timeout, retry=self._retry
            )
        return self._clients[alias]

    # -- reading -------------------------------------------------------------------------------
    async def get(self, ref: str) -> Operation:
        operation = await repo.find_operation(self._db, kind=OpKind.DEPLOY, ref=ref)
        if operation is None or operation.kind != OpKind.DEPLOY:
            raise NotFoundError(f"No deployment `{ref}`. `/deploy list` shows recent ones.")
        return operation

    async def recent(self, *, channel: str, user: str, limit: int = 15) -> Sequence[Operation]:
        """What a list shows in ``channel`` to ``user``: that channel's, and the user's own anywhere."""
        return await repo.list_operations(self._db, kind=OpKind.DEPLOY, limit=limit, channel=channel, user=user)

    async def _active(self) -> list[Operation]:
        recent = await repo.list_operations(self._db, kind=OpKind.DEPLOY, limit=500)
        return [op for op in recent if op.state not in TERMINAL_STATES]

    async def orgs_overview(self) -> list[OrgInfo]:
        active = await self._active()
        result = []
        for alias in self._orgs.aliases:
            config = self._orgs.config(alias)
            requirement = requirement_for(
                ApprovalFacts(action="deploy", org=alias, org_kinds=frozenset({config.kind})), self._settings.approval
            )
            validate = requirement_for(
                ApprovalFacts(action="validate", org=alias, org_kinds=frozenset({config.kind})),
                self._settings.approval,
            )
            result.append(
                OrgInfo(
                    alias=alias,
                    kind=config.kind,
                    label=config.label,
                    deploy_approval=requirement is not None and requirement.needed,
                    approvers=requirement.approvers if requirement else (),
                    validate_approval=validate is not None and validate.needed,
                    active=sum(1 for op in active if op.org == alias),
                )
            )
        return result

    # -- planning (every check before anything is created or sent) ---------------------------
    async def plan(self, request: DeployStart) -> DeployPlan:
        kind = self._orgs.kind(request.org)
        options, notes = self.options_for(request.flags, kind=kind, check_only=request.check_only)
        artifact = await self.artifacts.load(request.artifact)
        if request.flags.single_package and not artifact.root_package:
            raise UsageError(
                f"`--single-package` needs `package.xml` at the root of `{artifact.name}`; it is in a sub-folder.",
                usage=DEPLOY_USAGE,
            )
        single = artifact.root_package if request.flags.single_package is None else True
        options = DeployOptions.from_dict({**options.as_dict(), "single_package": single})
        return DeployPlan(
            action="validate" if request.check_only else "deploy",
            org=request.org,
            org_kind=kind,
            options=options,
            artifact=artifact,
            notes=notes,
        )

    @staticmethod
    def options_for(flags: DeployFlags, *, kind: str, check_only: bool) -> tuple[DeployOptions, list[str]]:
        """The DeployOptions to send, with the production rules (SPEC §5) applied or refused."""
        notes: list[str] = []
        rollback = True if flags.rollback_on_error is None else flags.rollback_on_error
        if kind == "production":
            refused = [
                (flags.test_level == "NoTestRun", "`--test-level NoTestRun`", "Salesforce requires Apex tests there"),
                (flags.purge_on_delete, "`--purge-on-delete`", "deleted components must go to the recycle bin"),
                (flags.allow_missing_files, "`--allow-missing-files`", "every file in package.xml must be present"),
                (flags.auto_update_package, "`--auto-update-package`", "package.xml must list what is deployed"),
            ]
            for hit, option, why in refused:
                if hit:
                    raise UsageError(f"{option} is not allowed for production orgs: {why}.", usage=DEPLOY_USAGE)
            if flags.rollback_on_error is False:
                notes.append("rollbackOnError stays on for production orgs; `--no-rollback-on-error` was ignored.")
            rollback = True
        if flags.tests and flags.test_level != "RunSpecifiedTests":
            raise UsageError("`--tests` only goes with `--test-level RunSpecifiedTests`.", usage=DEPLOY_USAGE)
        return (
            DeployOptions(
                allow_missing_files=flags.allow_missing_files,
                auto_update_package=flags.auto_update_package,
                check_only=check_only,
                ignore_warnings=flags.ignore_warnings,
                perform_retrieve=flags.perform_retrieve,
                purge_on_delete=flags.purge_on_delete,
                rollback_on_error=rollback,
                run_tests=flags.tests,
                single_package=bool(flags.single_package),
                test_level=flags.test_level,
            ),
            notes,
        )

    async def plan_quick(self, ref: str, *, scheduled_for: datetime | None = None) -> QuickPlan:
        validation = await self.get(ref)
        label = validation.ref
        action = validation.params.get("action")
        if action != "validate":
            raise StateError(
                f"{label} is a {'quick deploy' if action == 'quick_deploy' else 'deployment'}, not a validation; "
                f"only validations (`/deploy validate …`) can be quick-deployed."
            )
        if validation.state != OpState.SUCCEEDED:
            raise StateError(
                f"{label} is {validation.state.replace('_', ' ')}; "
                "only a validation that succeeded can be quick-deployed."
            )
        until = validation_usable_until(validation)
        if until is None:
            raise StateError(
                f"{label} ran no Apex tests, and Salesforce quick-deploys only validations whose tests ran and passed. "
                "Validate again with `--test-level RunLocalTests` (or `--tests …`)."
            )
        now = datetime.now(UTC)
        finished = (until - VALIDATION_WINDOW).strftime("%Y-%m-%d %H:%M UTC")
        if until <= now:
            raise StateError(
                f"{label}'s validation finished on {finished}, more than 10 days ago; Salesforce quick-deploys only "
                "validations from the last 10 days. Validate again."
            )
        if scheduled_for is not None and scheduled_for >= until:
            raise StateError(
                f"{label}'s validation can be quick-deployed only until {until.strftime('%Y-%m-%d %H:%M UTC')}; "
                "`--at` is later than that."
            )
        ended = 0
        for other in await repo.list_operations(self._db, kind=OpKind.DEPLOY, limit=500):
            if (other.params.get("validation") or {}).get("ref") != label:
                continue
            if other.state in {OpState.REJECTED, OpState.EXPIRED, OpState.CANCELED, OpState.ERROR}:
                ended += 1
            else:
                raise StateError(
                    f"{label} was already quick-deployed as {other.ref} ({other.state.replace('_', ' ')})."
                )
        org = str(validation.org or validation.params.get("org"))
        return QuickPlan(
            validation=validation,
            org=org,
            org_kind=self._orgs.kind(org),
            validation_id=str(validation.external_id),
            usable_until=until,
            idempotency_key=f"deploy:quick:{validation.id}:{ended}",
        )

    # -- creating --------------------------------------------------------------------------------
    def approval_for(
        self, *, action: str, org: str, kind: str, validation_requester: str | None = None
    ) -> ApprovalRequirement | None:
        """The approval a deployment needs; refuses a production one that nobody is named to approve."""
        facts = ApprovalFacts(action=action, org=org, org_kinds=frozenset({kind}))
        requirement = requirement_for(facts, self._settings.approval)
        missing = production_approvers_missing(facts, requirement)
        if missing:
            raise NotAllowedError(missing)
        if requirement is not None and validation_requester:
            # Four eyes on the change: whoever asked for the validation does not approve deploying it.
            why = "requested the validation this quick deploy would deploy"
            requirement = replace(requirement, excluded=((validation_requester, why),))
        return requirement

    async def create(
        self,
        plan: DeployPlan | QuickPlan,
        *,
        requester: str,
        channel: str,
        idempotency_key: str,
        scheduled_for: datetime | None = None,
        now: datetime | None = None,
    ) -> tuple[Operation, bool]:
        """Record the deployment; the poller sends it. Returns (operation, created)."""
        now = now or datetime.now(UTC)
        params: dict[str, Any]
        if isinstance(plan, QuickPlan):
            action = "quick_deploy"
            validation = plan.validation
            params = {
                "action": action,
                "org": plan.org,
                "org_kind": plan.org_kind,
                "validation": {
                    "ref": validation.ref,
                    "id": plan.validation_id,
                    "usable_until": plan.usable_until.isoformat(),
                    "artifact": (validation.params.get("artifact") or {}).get("name"),
                    "test_level": (validation.params.get("options") or {}).get("test_level"),
                    "requester": validation.requester,
                },
                "notes": plan.notes,
            }
            summary = f"Quick deploy of {validation.ref} → {plan.org}"
        else:
            action = plan.action
            params = {
                "action": action,
                "org": plan.org,
                "org_kind": plan.org_kind,
                "artifact": plan.artifact.summary(),
                "options": plan.options.as_dict(),
                "notes": plan.notes,
            }
            summary = f"{ACTION_LABEL[action]} {plan.artifact.name} → {plan.org}"
        params["scheduled_for"] = _iso(scheduled_for)
        requirement = self.approval_for(
            action=action,
            org=plan.org,
            kind=plan.org_kind,
            validation_requester=plan.validation.requester if isinstance(plan, QuickPlan) else None,
        )
        data: dict[str, Any] = {}
        if requirement:
            data["approval"] = requirement.to_data(now=now)  # a waiver is kept for the card too
        if requirement and requirement.needed:
            state = OpState.AWAITING_APPROVAL
        else:
            state = OpState.SCHEDULED if scheduled_for and scheduled_for > now else OpState.STARTING
        operation = Operation(
            kind=OpKind.DEPLOY,
            state=state,
            step="deploy",
            org=plan.org,
            summary=summary,
            params=params,
            data=data,
            requester=requester,
            channel=channel,
            idempotency_key=idempotency_key,
            scheduled_for=scheduled_for,
            next_poll_at=now,
            approval_expires_at=(now + requirement.expires_after) if requirement and requirement.needed else None,
        )
        return await repo.insert_operation(self._db, operation=operation)

    # -- cancel ----------------------------------------------------------------------------------
    async def cancel(self, ref: str, *, user: str) -> Operation:
        operation = await self.get(ref)
        assert operation.id is not None
        if operation.is_terminal:
            raise StateError(f"{operation.ref} already ended ({operation.state.replace('_', ' ')}); nothing to cancel.")
        if operation.state == OpState.CANCELING:
            raise StateError(f"{operation.ref} is already being canceled; Salesforce is finishing that.")
        now = datetime.now(UTC)
        if operation.external_id is None:
            # Not in Salesforce yet. If the poller sends it meanwhile, it finds the operation
            # canceled when it records the id, and cancels that deployment itself.
            done = await repo.update_operation(
                self._db,
                operation_id=operation.id,
                expect_states=[OpState.AWAITING_APPROVAL, OpState.SCHEDULED, OpState.STARTING],
                values={
                    "state": OpState.CANCELED,
                    "next_poll_at": now,
                    "data": {**operation.data, "canceled_by": user},
                },
            )
            if done:
                return await self.get(ref)
            operation = await self.get(ref)
            if operation.external_id is None or operation.is_terminal:
                raise StateError(f"{operation.ref} changed while canceling ({operation.state}); try again.")
        try:
            result = await self.metadata(str(operation.org)).cancel_deploy(str(operation.external_id))
        except ApiError as exc:
            if "completed" in exc.message.lower():
                raise StateError(f"{operation.ref} already finished in Salesforce; nothing to cancel.") from None
            raise StateError(f"Salesforce refused to cancel {operation.ref}: {exc.message}") from None
        data = {**operation.data, "cancel_requested_by": user}
        if result.done:
            data["canceled_by"] = user
            data["progress"] = {**(data.get("progress") or {}), "status": "Canceled"}
        assert operation.id is not None
        changed = await repo.update_operation(
            self._db,
            operation_id=operation.id,
            expect_states=[OpState.RUNNING, OpState.STARTING],
            values={
                "state": OpState.CANCELED if result.done else OpState.CANCELING,
                "next_poll_at": now,
                "data": data,
            },
        )
        if not changed:
            fresh = await self.get(ref)
            if fresh.state not in {OpState.CANCELING, OpState.CANCELED}:
                raise StateError(f"{fresh.ref} finished while canceling ({fresh.state.replace('_', ' ')}).")
        return await self.get(ref)

    # -- the poller's side -----------------------------------------------------------------------
    async def advance(self, operations: Sequence[Operation], *, lease_token: str) -> dict[int, Advance]:
        results: dict[int, Advance] = {}
        watching: list[Operation] = []
        for operation in operations:
            assert operation.id is not None
            try:
                if operation.state == OpState.AWAITING_APPROVAL:
                    results[operation.id] = await self._writes.check_expiry(operation, lease_token)
                elif operation.state in {OpState.SCHEDULED, OpState.STARTING}:
                    results[operation.id] = await self._start(operation, lease_token)
                elif operation.state in {OpState.RUNNING, OpState.CANCELING}:
                    watching.append(operation)
                else:
                    results[operation.id] = Advance()
            except TransientError as exc:
                results[operation.id] = await self._writes.transient(operation, lease_token, exc)
            except AuthError as exc:
                results[operation.id] = await self._writes.transient(operation, lease_token, exc, delay=300)
            except UserError as exc:
                # e.g. the org was removed from the configuration since it was requested.
                results[operation.id] = await self._fail(operation, lease_token, f"Nothing was deployed: {exc.message}")
        if watching:
            queue = DeployQueue.of(await self._active())
            batch: list[dict[str, Any]] = []  # plain progress of many deployments: saved in one statement
            outcomes = await asyncio.gather(
                *(self._watch(op, lease_token, queue, batch=batch) for op in watching), return_exceptions=True
            )
            await self._writes.save_many(batch)
            for op, outcome in zip(watching, outcomes, strict=True):
                assert op.id is not None
                if isinstance(outcome, Advance):
                    results[op.id] = outcome
                elif isinstance(outcome, AuthError):
                    results[op.id] = await self._writes.transient(op, lease_token, outcome, delay=300)
                elif isinstance(outcome, ApiError) and outcome.code == "INVALID_ID_FIELD":
                    # Salesforce no longer knows the id (the sandbox was refreshed, say): asking
                    # again cannot help, and the outcome cannot be known from here.
                    results[op.id] = await self._fail(
                        op,
                        lease_token,
                        f"Salesforce no longer knows deployment `{op.external_id}` ({outcome.message}); its outcome "
                        f"cannot be read. Check Setup → Deployment Status in `{op.org}`.",
                    )
                elif isinstance(outcome, UpstreamError):
                    # Transient or not, a failed status read never fails the deployment: it is
                    # still running in Salesforce; say so on the card and look again later.
                    results[op.id] = await self._writes.transient(op, lease_token, outcome)
                else:
                    log.error("following %s failed", op.ref, exc_info=outcome)
                    results[op.id] = Advance(next_poll_in=30.0)
        return results

    async def _start(self, op: Operation, lease_token: str) -> Advance:
        now = datetime.now(UTC)
        if op.scheduled_for is not None and _aware(op.scheduled_for) > now:
            wait = (_aware(op.scheduled_for) - now).total_seconds()
            events = []
            if op.state != OpState.SCHEDULED:
                if not await self._writes.save(op, lease_token, state=OpState.SCHEDULED):
                    return Advance()
                events.append(OpEvent("scheduled"))
            return Advance(events=events, next_poll_in=max(1.0, min(wait, 300.0)))
        if op.state == OpState.SCHEDULED and not await self._writes.save(op, lease_token, state=OpState.STARTING):
            return Advance()
        if op.data.get("submit_attempted_at") and not op.external_id:
            return await self._fail(
                op,
                lease_token,
                "The bot lost track of this deployment while sending it to Salesforce, so it cannot tell whether "
                f"Salesforce received it. It was not sent again: check Setup → Deployment Status in `{op.org}` "
                "before requesting it again.",
            )
        action = op.params.get("action")
        artifact: Artifact | None = None
        if action != "quick_deploy":
            try:
                artifact = await self.artifacts.reload(op.params.get("artifact") or {})
            except UserError as exc:
                return await self._fail(op, lease_token, f"Nothing was deployed: {exc.message}")
        if not await self._writes.save(op, lease_token, data={**op.data, "submit_attempted_at": now.isoformat()}):
            return Advance()
        client = self.metadata(str(op.org))
        try:
            if artifact is not None:
                deploy_id = await client.deploy(artifact.data, DeployOptions.from_dict(op.params.get("options") or {}))
            else:
                deploy_id = await client.deploy_recent_validation(str(op.params["validation"]["id"]))
        except AmbiguousWriteError as exc:
            return await self._fail(
                op,
                lease_token,
                f"The connection to Salesforce failed while sending it ({exc.message}), so Salesforce may or may "
                f"not have started it. It was not sent again: check Setup → Deployment Status in `{op.org}`.",
            )
        except (TransientError, AuthError):
            # Certainly not received (never connected, 503, a limit, a refused session): clear the
            # mark so that the next attempt may send it.
            data = {key: value for key, value in op.data.items() if key != "submit_attempted_at"}
            await self._writes.save(op, lease_token, data=data)
            raise
        except ApiError as exc:
            what = "the quick deploy" if artifact is None else "the deployment"
            return await self._fail(op, lease_token, f"Salesforce refused {what}: {exc.code}: {exc.message}")
        data = {**op.data, "submitted_at": now.isoformat(), "progress": {}}
        status_url = await self._status_url(str(op.org), deploy_id)
        if status_url:
            data["status_url"] = status_url
        if not await self._writes.save(
            op, lease_token, external_id=deploy_id, state=OpState.RUNNING, step="", data=data
        ):
            # Canceled (or taken over) while it was being sent: do not leave it running.
            await self._quietly_cancel(str(op.org), deploy_id)
            return Advance()
        submitted = OpEvent("submitted", {"deploy_id": deploy_id})
        try:
            # Read its status at once, so the card says Pending (and behind what) or InProgress.
            first = await self._watch(op, lease_token, DeployQueue.of(await self._active()))
        except UpstreamError:
            return Advance(events=[submitted], next_poll_in=2.0)
        return Advance(events=[submitted, *first.events], next_poll_in=first.next_poll_in)

    async def _status_url(self, alias: str, deploy_id: str) -> str | None:
        """The org's Deployment Status page of this deployment; None if it cannot be built now
        (the id was recorded already, and a missing link must never lose it)."""
        try:
            return await self.metadata(alias).deploy_status_url(deploy_id)
        except (UpstreamError, UserError, ValueError):
            log.warning("no Deployment Status link for %s in %s", deploy_id, alias)
            return None

    async def _fail(self, op: Operation, lease_token: str, message: str) -> Advance:
        await self._writes.save(op, lease_token, state=OpState.ERROR, data={**op.data, "error": redact_text(message)})
        return Advance(events=[OpEvent("error")])

    async def _quietly_cancel(self, alias: str, deploy_id: str) -> None:
        try:
            await self.metadata(alias).cancel_deploy(deploy_id)
        except (UpstreamError, UserError):
            log.warning("could not cancel orphaned deployment %s in %s", deploy_id, alias)

    async def _watch(
        self,
        op: Operation,
        lease_token: str,
        queue: DeployQueue,
        *,
        batch: list[dict[str, Any]] | None = None,
    ) -> Advance:
        """Read the deployment's status; a plain progress write goes to ``batch`` when given, else is made now."""
        result = await self.metadata(str(op.org)).check_deploy_status(str(op.external_id), include_details=True)
        previous = op.data.get("progress") or {}
        progress = _progress(result)
        events: list[OpEvent] = []
        if result.status == "Pending":
            progress["queue_ahead"] = queue.ahead(op)
            if progress["queue_ahead"] and not op.data.get("queued_announced"):
                events.append(OpEvent("queued", {"ahead": progress["queue_ahead"]}))
        elif (
            previous.get("status") == "Pending"
            and op.data.get("queued_announced")
            and result.status in {"InProgress", "Canceling"}
        ):
            # Only worth a reply after a wait in the queue; otherwise the card says it all.
            events.append(OpEvent("in_progress", {"components": result.components_total, "tests": result.tests_total}))
        if result.done:
            return await self._complete(op, lease_token, result, progress, events)
        data = dict(op.data)
        if events and events[0].name == "queued":
            data["queued_announced"] = True
        state = OpState(op.state)
        if result.status == "Canceling" and state == OpState.RUNNING:
            state = OpState.CANCELING  # canceled in Salesforce's UI, or by another tool
        if progress != previous or state != op.state or "last_problem" in op.data:
            data["progress"] = progress
            if batch is None:
                await self._writes.save(op, lease_token, state=state, data=data)
            else:
                batch.append(self._writes.pending_save(op, lease_token, state=state, data=data))
        return Advance(events=events, next_poll_in=self._next_poll(op, state))

    def _next_poll(self, op: Operation, state: OpState) -> float:
        """Seconds at first, about a minute once a deployment has run for several minutes."""
        started = op.data.get("submitted_at")
        elapsed = (datetime.now(UTC) - datetime.fromisoformat(started)).total_seconds() if started else 0.0
        if state == OpState.CANCELING:
            return max(1.0, min(elapsed / 10.0, 15.0))
        return max(1.0, min(elapsed / 6.0, 60.0))

    async def _complete(
        self, op: Operation, lease_token: str, result: DeployResult, progress: dict[str, Any], events: list[OpEvent]
    ) -> Advance:
        state = FINAL_STATE.get(result.status, OpState.FAILED)
        data = dict(op.data)
        data["progress"] = progress
        data["result"] = {
            "status": result.status,
            "success": result.success,
            "check_only": result.check_only,
            "created_date": _iso(result.created_date),
            "completed_date": _iso(result.completed_date or datetime.now(UTC)),
            "components": [result.components_deployed, result.components_total, result.component_errors],
            "tests": [result.tests_completed, result.tests_total, result.test_errors],
            "error_message": result.error_message[:1000],
            "error_status_code": result.error_status_code,
            "canceled_by_name": result.canceled_by_name,
        }
        data["component_failures"] = [asdict(f) for f in result.component_failures[:MAX_STORED_FAILURES]]
        data["test_failures"] = [
            {**asdict(t), "qualified": t.qualified} for t in result.test_failures[:MAX_STORED_FAILURES]
        ]
        data["failure_totals"] = {"components": len(result.component_failures), "tests": len(result.test_failures)}
        if result.code_coverage_warnings or result.flow_coverage_warnings:
            data["coverage"] = _coverage(result)
        if not data.get("status_url") and op.external_id:
            status_url = await self._status_url(str(op.org), str(op.external_id))
            if status_url:
                data["status_url"] = status_url
        if op.state == OpState.CANCELING and state != OpState.CANCELED:
            data["finished_before_cancel"] = True
        if state == OpState.CANCELED and data.get("cancel_requested_by"):
            data["canceled_by"] = data["cancel_requested_by"]
        if not await self._writes.save(op, lease_token, state=state, data=data):
            return Advance()
        return Advance(events=[*events, OpEvent("completed")])

    async def completion_files(self, operation: Operation) -> list[OpFile]:
        """The full report of a deployment Salesforce finished (or canceled)."""
        if not operation.data.get("result"):
            return []
        return [
            OpFile(
                name=f"deploy-{operation.ref}-report.txt",
                title=f"{operation.ref} deployment report",
                content=deploy_report(operation).encode(),
            )
        ]


def _coverage(result: DeployResult) -> dict[str, Any]:
    """The coverage warnings as plain data: the org-wide figures (average and threshold, from the
    warning without a name) apart from the classes, triggers and flows named below the threshold."""
    summary: dict[str, Any] = {"average": None, "required": None, "flow_average": None, "flow_required": None}
    summary["classes"] = []
    summary["flows"] = []
    summary["other"] = []  # org-wide messages whose figures could not be read
    for warning in result.code_coverage_warnings[:MAX_STORED_FAILURES]:
        if warning.name:
            summary["classes"].append(
                {
                    "name": warning.qualified,
                    "type": warning.kind,
                    "percent": warning.percent,
                    "required": warning.required,
                    "message": warning.message[:500],
                }
            )
        elif warning.percent is not None and summary["average"] is None:
            summary["average"], summary["required"] = warning.percent, warning.required
        else:
            summary["other"].append(warning.message[:500])
    for flow in result.flow_coverage_warnings[:MAX_STORED_FAILURES]:
        if flow.flow_name:
            summary["flows"].append(
                {
                    "name": flow.qualified,
                    "percent": flow.percent,
                    "required": flow.required,
                    "message": flow.message[:500],
                }
            )
        elif flow.percent is not None and summary["flow_average"] is None:
            summary["flow_average"], summary["flow_required"] = flow.percent, flow.required
        else:
            summary["other"].append(flow.message[:500])
    return summary


def failed_without_reason(op: Operation) -> bool:
    """Salesforce ended it as failed and said nothing about why: no error, no component or test
    failure, no coverage warning. Real orgs do answer that; the user is then sent to Setup."""
    result = op.data.get("result") or {}
    if op.state != OpState.FAILED or not result:
        return False
    totals = op.data.get("failure_totals") or {}
    return not (
        result.get("error_message") or totals.get("components") or totals.get("tests") or op.data.get("coverage")
    )


def _progress(result: DeployResult) -> dict[str, Any]:
    detail = result.state_detail
    return {
        "status": result.status,
        "state_detail": detail[:200],
        "current_test": detail.split(":", 1)[1].strip()[:200] if detail.startswith("Running Test:") else "",
        "components": [result.components_deployed, result.components_total, result.component_errors],
        "tests": [result.tests_completed, result.tests_total, result.test_errors],
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
                submitted.setdefault(op.org, []).append(str(op.data.get("submitted_at") or ""))
        return cls({org: sorted(times) for org, times in submitted.items()})

    def ahead(self, op: Operation) -> int:
        """How many were sent to the same org before this one (itself not counted)."""
        return bisect_left(self.submitted.get(op.org, []), str(op.data.get("submitted_at") or ""))


def deploy_report(op: Operation) -> str:
    """Plain text: every option, count and failure with its full stack trace."""
    params, data = op.params, op.data
    result = data.get("result") or {}
    lines = [
        f"{ACTION_LABEL.get(str(params.get('action')), 'Deploy')} {op.ref} to {op.org} ({params.get('org_kind')})",
        f"Salesforce deployment id: {op.external_id or '-'}",
        f"Salesforce status: {result.get('status', '-')}",
        f"Requested by: {op.requester}  at {op.created_at.isoformat() if op.created_at else '-'}",
    ]
    if data.get("approved_by"):
        lines.append("Approved by: " + ", ".join(data["approved_by"]))
    artifact = params.get("artifact") or {}
    if artifact:
        lines.append(
            f"Artifact: {artifact.get('ref')} ({artifact.get('kind')}, {artifact.get('files')} files, "
            f"{artifact.get('compressed')} bytes zipped, sha256 {artifact.get('sha256')})"
        )
    validation = params.get("validation") or {}
    if validation:
        lines.append(f"Quick deploy of validation {validation.get('ref')} ({validation.get('id')})")
    options = params.get("options") or {}
    if options:
        lines.append("Options: " + ", ".join(f"{key}={value}" for key, value in options.items()))
    deployed, total, errors = (result.get("components") or [0, 0, 0])[:3]
    lines.append(f"Components: {deployed} deployed, {errors} failed, {total} total")
    passed, tests_total, test_errors = (result.get("tests") or [0, 0, 0])[:3]
    lines.append(f"Apex tests: {passed} passed, {test_errors} failed, {tests_total} total")
    lines.append(f"Created: {result.get('created_date') or '-'}   Completed: {result.get('completed_date') or '-'}")
    if result.get("error_message"):
        lines.append(f"Error: {result.get('error_status_code') or ''} {result['error_message']}".strip())
    totals = data.get("failure_totals") or {}
    failures = data.get("component_failures") or []
    lines += ["", f"Component failures ({totals.get('components', len(failures))})"]
    for f in failures:
        where = (
            f["file_name"] + (f":{f['line']}" if f.get("line") else "") + (f":{f['column']}" if f.get("column") else "")
        )
        lines.append(f"  {where}  {f['component_type']} {f['full_name']}  {f['problem_type']}: {f['problem']}")
    tests = data.get("test_failures") or []
    lines += ["", f"Apex test failures ({totals.get('tests', len(tests))})"]
    for t in tests:
        lines.append(f"  {t['qualified']}")
        lines.append(f"    {t['message']}")
        lines.extend(f"    {line}" for line in (t.get("stack_trace") or "").splitlines())
    for key, stored in (("components", failures), ("tests", tests)):
        missing = int(totals.get(key, 0)) - len(stored)
        if missing > 0:
            lines.append(f"({missing} more {key[:-1]} failures were returned but not kept)")
    coverage = data.get("coverage")
    if coverage:
        lines += ["", "Code coverage"]
        if coverage.get("average") is not None:
            lines.append(
                f"  Average across all Apex classes and triggers: {percent_text(coverage['average'])}"
                + (
                    f" (at least {percent_text(coverage['required'])} required)"
                    if coverage.get("required") is not None
                    else ""
                )
            )
        if coverage.get("flow_average") is not None:
            lines.append(
                f"  Flows and processes: {percent_text(coverage['flow_average'])}"
                + (
                    f" (at least {percent_text(coverage['flow_required'])} required)"
                    if coverage.get("flow_required") is not None
                    else ""
                )
            )
        for item in coverage.get("classes") or []:
            lines.append(f"  {item.get('type') or 'Apex'} {item['name']}: {item['message']}")
        for item in coverage.get("flows") or []:
            lines.append(f"  Flow {item['name']}: {item['message']}")
        lines.extend(f"  {message}" for message in coverage.get("other") or [])
    if failed_without_reason(op):
        lines += ["", "Salesforce gave no reason for this failure (no error, no failures, no coverage warnings)."]
    if data.get("status_url"):
        lines.append(f"Deployment Status in Salesforce: {data['status_url']}")
    return "\n".join(lines) + "\n"


def percent_text(value: float) -> str:
    """68.0 → "68%", 74.5 → "74.5%"."""
    return f"{value:g}%"
