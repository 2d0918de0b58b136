"""FlexDeploy packages (SPEC §7): the requests ``/fd`` makes — show, plan, submit, cancel.

Every change is planned first: the package is read with a GET and the request is checked
against it (a COMPLETED package cannot be modified; USER_MANAGED packages take files, DYNAMIC
ones include/exclude expressions; sequence numbers stay unique), so a bad request is refused
before anything is written.

A planned change then becomes an Operation of kind ``fd``: ``starting`` when no approval is
needed, so the poller makes the call at once (``bot.flexdeploy.steps``) and its card and notice go
through the outbox like every other operation's; ``awaiting_approval`` when an approval rule
applies — by default to deleting (``fd_delete``) and completing (``fd_complete``) a package.

Approval rules for FlexDeploy: ``action`` is ``fd_<verb>`` (fd_create, fd_add, fd_replace,
fd_status, fd_complete, fd_delete), ``package`` matches the package name and ``org`` the
project id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp

from bot.clients.flexdeploy import FlexDeployClient, Package
from bot.clients.retry import RetryPolicy
from bot.core.approvals import ApprovalFacts, ApprovalRequirement, requirement_for
from bot.errors import ApiError, NotFoundError, StateError, UsageError
from bot.flexdeploy.payloads import Action, FdData, PackageBody, PackageSummary
from bot.flexdeploy.plan import (
    Change,
    add_body,
    create_body,
    read_or_none,
    read_package,
    reason,
    refuse_completed,
    replace_body,
)
from bot.flexdeploy.requests import FdDelete, FdStatus, FdWrite, check_type_rules
from bot.flexdeploy.steps import NOT_CONFIGURED, FlexDeploySteps
from bot.settings import Settings
from bot.store import repo
from bot.store.db import Database
from bot.store.models import Operation, OpKind, OpState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What ``submit`` did with a planned change."""

    change: Change
    operation: Operation | None = None  # None: nothing to do (deleting a package that is not there)
    created: bool = False  # False: the same request (idempotency key) was already received
    notes: tuple[str, ...] = field(default=())


class FlexDeployService:
    """The requests the ``/fd`` handler makes; the calls themselves are the poller's (``steps``)."""

    def __init__(self, *, db: Database, client: FlexDeployClient | None, settings: Settings) -> None:
        self._db = db
        self._client = client
        self._settings = settings
        self.steps = FlexDeploySteps(db=db, client=client)  # what the poller runs (``KindAdvancer``)

    @classmethod
    def from_settings(
        cls,
        *,
        settings: Settings,
        db: Database,
        session: aiohttp.ClientSession,
        retry: RetryPolicy | None = None,
    ) -> FlexDeployService:
        """Fails fast when FlexDeploy is configured without its credentials."""
        client: FlexDeployClient | None = None
        if settings.flexdeploy is not None:
            if settings.flexdeploy_user is None or settings.flexdeploy_password is None:
                raise ValueError("[flexdeploy] is configured but FLEXDEPLOY_USER or FLEXDEPLOY_PASSWORD is not set")
            timeout = settings.http_timeout_seconds
            client = FlexDeployClient(
                session=session,
                base_url=settings.flexdeploy.url,
                user=settings.flexdeploy_user.get_secret_value(),
                password=settings.flexdeploy_password.get_secret_value(),
                timeout=aiohttp.ClientTimeout(total=timeout, connect=min(10.0, timeout)),
                retry=retry,
            )
        return cls(db=db, client=client, settings=settings)

    @property
    def client(self) -> FlexDeployClient:
        if self._client is None:
            raise UsageError(NOT_CONFIGURED)
        return self._client

    # -- reading -------------------------------------------------------------------------------
    async def show(self, project_id: int, name: str) -> Package:
        return await read_package(self.client, project_id, name)

    # -- planning ------------------------------------------------------------------------------
    async def plan(self, command: FdWrite | FdStatus | FdDelete) -> Change:
        """Read the package and check the request against it; nothing is written here."""
        client = self.client
        if isinstance(command, FdDelete):
            try:
                before = await client.get_package(command.project_id, command.package)
            except ApiError as exc:
                if exc.status != 404:
                    raise
                notes = (f"FlexDeploy: {reason(exc)}",)
                return Change("delete", command.project_id, command.package, None, None, notes)
            return Change("delete", command.project_id, command.package, None, before)
        if isinstance(command, FdStatus):
            before = await read_package(client, command.project_id, command.package)
            refuse_completed(before, command.project_id)
            if before.package_status == command.status:
                raise StateError(
                    f"`{before.name}` in project {command.project_id} is already {command.status}; nothing to change."
                )
            action: Action = "complete" if command.status == "COMPLETED" else "status"
            body = PackageBody(package_status=command.status)
            return Change(action, command.project_id, command.package, body, before)
        if command.action == "create":
            existing = await read_or_none(client, command.project_id, command.package)
            if existing is not None:
                raise StateError(
                    f"Project {command.project_id} already has a package `{existing.name}` "
                    f"({existing.package_status}, {len(existing.files)} files). Use `/fd add` or `/fd replace` "
                    "to change it, or pick another name."
                )
            body = create_body(command.package, command.fields)
            return Change("create", command.project_id, command.package, body, None)
        before = await read_package(client, command.project_id, command.package)
        refuse_completed(before, command.project_id)
        fields = command.fields
        target_type = fields.package_type or before.package_type
        check_type_rules(fields, package_type=target_type)
        if target_type == "DYNAMIC" and not (fields.include_path or before.include_path):
            raise UsageError(
                f"`{before.name}` would be DYNAMIC without an include expression; add `--include <regex,…>`."
            )
        if command.action == "replace":
            if target_type == "USER_MANAGED" and fields.files is None and fields.add_file_filter is None:
                raise UsageError(
                    "`replace` sets the package's files to exactly the ones you list: give `--files <list>` "
                    "(or `--files none` to empty it) or `--add-file-filter <text>`."
                )
            return Change("replace", command.project_id, command.package, replace_body(before, fields), before)
        body, added_notes = add_body(before, fields)
        return Change("add", command.project_id, command.package, body, before, added_notes)

    def approval_for(self, change: Change) -> ApprovalRequirement | None:
        facts = ApprovalFacts(action=change.approval_action, org=str(change.project_id), package=change.package)
        return requirement_for(facts, self._settings.approval)

    # -- doing ---------------------------------------------------------------------------------
    async def submit(
        self, change: Change, *, requester: str, channel: str, idempotency_key: str, now: datetime | None = None
    ) -> Outcome:
        """Record the change for the poller: to be sent at once, or once it is approved."""
        if change.action == "delete" and change.before is None:
            # Nothing to delete, so nothing to approve. No DELETE is sent either: had the package
            # been created a moment ago, an unapproved DELETE would remove it.
            return Outcome(change, notes=change.notes)
        now = now or datetime.now(UTC)
        requirement = self.approval_for(change)
        waits = requirement is not None and requirement.needed
        operation = Operation(
            kind=OpKind.FD,
            state=OpState.AWAITING_APPROVAL if waits else OpState.STARTING,
            step="call",
            summary=change.describe()[:200],
            params=change.params.dump(),
            data=FdData(
                # A waiver (count 0) is kept too: the card shows it, and the audit names it.
                approval=requirement.to_state(now=now) if requirement is not None else None,
                before=PackageSummary.of(change.before) if change.before else None,
            ).dump(),
            requester=requester,
            channel=channel,
            idempotency_key=idempotency_key,
            next_poll_at=now,
            approval_expires_at=now + requirement.expires_after if requirement is not None and waits else None,
        )
        operation, created = await repo.insert_operation(self._db, operation=operation)
        return Outcome(change, operation=operation, created=created, notes=change.notes)

    async def get(self, ref: str) -> Operation:
        operation_id = repo.parse_ref(ref, kind=OpKind.FD)
        operation = await repo.get_operation(self._db, operation_id=operation_id) if operation_id else None
        if operation is None or operation.kind != OpKind.FD:
            raise NotFoundError(f"No FlexDeploy request `{ref[:20]}` (they look like `F12`).")
        return operation

    async def cancel(self, ref: str, *, user: str) -> Operation:
        """Withdraw a request that is still waiting for approval."""
        operation = await self.get(ref)
        assert operation.id is not None
        if operation.is_terminal:
            raise StateError(f"{operation.ref} already ended ({operation.state.replace('_', ' ')}); nothing to cancel.")
        if operation.state != OpState.AWAITING_APPROVAL:
            raise StateError(
                f"{operation.ref} was approved and is being sent to FlexDeploy; it can no longer be canceled."
            )
        data = FdData.read(operation.data).model_copy(update={"canceled_by": user})
        done = await repo.update_operation(
            self._db,
            operation_id=operation.id,
            expect_states=[OpState.AWAITING_APPROVAL],
            values={"state": OpState.CANCELED, "next_poll_at": datetime.now(UTC), "data": data.dump()},
        )
        if not done:
            raise StateError(f"{operation.ref} was decided a moment ago; it can no longer be canceled.")
        return await self.get(ref)
