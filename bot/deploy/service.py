"""Metadata deployments (SPEC §5): what the handlers ask for — plan, create, cancel, read.

A deployment is an Operation of kind ``deploy`` (refs ``D1`` …). Everything the user can get
wrong is checked by ``plan`` / ``plan_quick`` before the operation exists: the org, the
production rules, the test options, the artifact (see ``bot.deploy.artifacts``) and, for a
quick deploy, the validation it reuses. The Metadata API calls happen in the poller
(``bot.deploy.steps``):

    awaiting_approval ─approve→ starting ─deploy()→ running ─checkDeployStatus…→ done
    [scheduled until --at] ↗                         └cancelDeploy→ canceling → canceled
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Literal

import aiohttp

from bot.clients.retry import RetryPolicy
from bot.clients.salesforce.metadata import DeployOptions, MetadataClient
from bot.core.approvals import (
    ApprovalFacts,
    ApprovalRequirement,
    production_approvers_missing,
    requirement_for,
)
from bot.core.orgs import OrgRegistry
from bot.core.payloads import ApprovalState
from bot.deploy.artifacts import Artifact, ArtifactStore
from bot.deploy.payloads import (
    ACTION_LABEL,
    VALIDATION_WINDOW,
    DeployData,
    DeployParams,
    OptionsData,
    Progress,
    QuickSource,
    data_of,
    iso,
    params_of,
    validation_usable_until,
)
from bot.deploy.requests import DeployFlags, DeployStart
from bot.errors import ApiError, NotAllowedError, NotFoundError, StateError, UsageError
from bot.settings import Settings
from bot.store import repo
from bot.store.db import Database
from bot.store.models import TERMINAL_STATES, Operation, OpKind, OpState

log = logging.getLogger(__name__)


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
    action: Literal["deploy", "validate"]
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
        self.db = db
        self._orgs = orgs
        self._settings = settings
        self._session = session
        self._retry = retry
        self.artifacts = artifacts or ArtifactStore(config=settings.artifacts, session=session)
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
        operation = await repo.find_operation(self.db, kind=OpKind.DEPLOY, ref=ref)
        if operation is None or operation.kind != OpKind.DEPLOY:
            raise NotFoundError(f"No deployment `{ref}`. `/deploy list` shows recent ones.")
        return operation

    async def recent(self, *, channel: str, user: str, limit: int = 15) -> Sequence[Operation]:
        """What a list shows in ``channel`` to ``user``: that channel's, and the user's own anywhere."""
        return await repo.list_operations(self.db, kind=OpKind.DEPLOY, limit=limit, channel=channel, user=user)

    async def active(self) -> list[Operation]:
        """Deployments not finished yet (the queue per org is built from these)."""
        recent = await repo.list_operations(self.db, kind=OpKind.DEPLOY, limit=500)
        return [op for op in recent if op.state not in TERMINAL_STATES]

    async def orgs_overview(self) -> list[OrgInfo]:
        active = await self.active()
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
                    raise UsageError(f"{option} is not allowed for production orgs: {why}.")
            if flags.rollback_on_error is False:
                notes.append("rollbackOnError stays on for production orgs; `--no-rollback-on-error` was ignored.")
            rollback = True
        if flags.tests and flags.test_level != "RunSpecifiedTests":
            raise UsageError("`--tests` only goes with `--test-level RunSpecifiedTests`.")
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
        action = params_of(validation).action
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
        for other in await repo.list_operations(self.db, kind=OpKind.DEPLOY, limit=500):
            source = params_of(other).validation
            if source is None or source.ref != label:
                continue
            if other.state in {OpState.REJECTED, OpState.EXPIRED, OpState.CANCELED, OpState.ERROR}:
                ended += 1
            else:
                raise StateError(
                    f"{label} was already quick-deployed as {other.ref} ({other.state.replace('_', ' ')})."
                )
        org = str(validation.org or params_of(validation).org)
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
        if isinstance(plan, QuickPlan):
            validation, asked = plan.validation, params_of(plan.validation)
            params = DeployParams(
                action="quick_deploy",
                org=plan.org,
                org_kind=plan.org_kind,
                validation=QuickSource(
                    ref=validation.ref,
                    id=plan.validation_id,
                    usable_until=plan.usable_until.isoformat(),
                    artifact=asked.artifact.name if asked.artifact else None,
                    test_level=asked.options.test_level if asked.options else None,
                    requester=validation.requester,
                ),
                notes=plan.notes,
                scheduled_for=iso(scheduled_for),
            )
            summary = f"Quick deploy of {validation.ref} → {plan.org}"
        else:
            params = DeployParams(
                action=plan.action,
                org=plan.org,
                org_kind=plan.org_kind,
                artifact=plan.artifact.summary(),
                options=OptionsData.of(plan.options),
                notes=plan.notes,
                scheduled_for=iso(scheduled_for),
            )
            summary = f"{ACTION_LABEL[plan.action]} {plan.artifact.name} → {plan.org}"
        requirement = self.approval_for(
            action=params.action,
            org=plan.org,
            kind=plan.org_kind,
            validation_requester=plan.validation.requester if isinstance(plan, QuickPlan) else None,
        )
        data = DeployData()
        if requirement:
            # Read back from its stored form, so the row holds exactly what approvals write.
            data.approval = ApprovalState.read(requirement.to_data(now=now))  # a waiver is kept for the card too
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
            params=params.dump(),
            data=data.dump(),
            requester=requester,
            channel=channel,
            idempotency_key=idempotency_key,
            scheduled_for=scheduled_for,
            next_poll_at=now,
            approval_expires_at=(now + requirement.expires_after) if requirement and requirement.needed else None,
        )
        return await repo.insert_operation(self.db, operation=operation)

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
                self.db,
                operation_id=operation.id,
                expect_states=[OpState.AWAITING_APPROVAL, OpState.SCHEDULED, OpState.STARTING],
                values={"state": OpState.CANCELED, "next_poll_at": now, "data": _canceled_by(operation, user)},
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
        data = data_of(operation)
        data.cancel_requested_by = user
        if result.done:
            data.canceled_by = user
            data.progress = (data.progress or Progress()).model_copy(update={"status": "Canceled"})
        assert operation.id is not None
        changed = await repo.update_operation(
            self.db,
            operation_id=operation.id,
            expect_states=[OpState.RUNNING, OpState.STARTING],
            values={
                "state": OpState.CANCELED if result.done else OpState.CANCELING,
                "next_poll_at": now,
                "data": data.dump(),
            },
        )
        if not changed:
            fresh = await self.get(ref)
            if fresh.state not in {OpState.CANCELING, OpState.CANCELED}:
                raise StateError(f"{fresh.ref} finished while canceling ({fresh.state.replace('_', ' ')}).")
        return await self.get(ref)


def _canceled_by(operation: Operation, user: str) -> dict[str, object]:
    data = data_of(operation)
    data.canceled_by = user
    return data.dump()
