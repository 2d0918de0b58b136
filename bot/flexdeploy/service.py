"""FlexDeploy packages (SPEC §7): show, create, add, replace, status, delete.

Every change is planned first: the package is read with a GET and the request is checked
against it (a COMPLETED package cannot be modified; USER_MANAGED packages take files, DYNAMIC
ones include/exclude expressions; sequence numbers stay unique), so a bad request is refused
before anything is written.

A planned change then either runs at once (most of them) or, when an approval rule applies —
by default to deleting (``fd_delete``) and completing (``fd_complete``) a package — becomes an
Operation of kind ``fd`` waiting for approval. The poller's ``advance`` performs its one call
after approval, recording the attempt first so that a bot killed mid-call checks what
FlexDeploy holds instead of calling twice:

    awaiting_approval → starting/call → succeeded | failed          (rejected, expired, canceled)

Approval rules for FlexDeploy: ``action`` is ``fd_<verb>`` (fd_create, fd_add, fd_replace,
fd_status, fd_complete, fd_delete), ``package`` matches the package name and ``org`` the
project id.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import aiohttp

from bot.clients.flexdeploy import FlexDeployClient, Package, PackageFile
from bot.clients.retry import RetryPolicy
from bot.core.approvals import ApprovalFacts, ApprovalRequirement, requirement_for
from bot.core.lifecycle import LeasedWrites
from bot.core.operations import Advance, OpEvent, OpFile
from bot.errors import (
    AmbiguousWriteError,
    ApiError,
    AuthError,
    NotFoundError,
    StateError,
    TransientError,
    UpstreamError,
    UsageError,
)
from bot.flexdeploy.commands import (
    FD_USAGE,
    FdDelete,
    FdStatus,
    FdWrite,
    FileSpec,
    PackageFields,
    check_sequence_numbers,
    check_type_rules,
)
from bot.redaction import csv_bytes, redact_text
from bot.settings import Settings
from bot.store import repo
from bot.store.db import Database
from bot.store.models import Operation, OpKind, OpState

log = logging.getLogger(__name__)

Action = Literal["create", "add", "replace", "status", "complete", "delete"]
METHOD: dict[str, str] = {
    "create": "POST",
    "add": "PATCH",
    "replace": "PUT",
    "status": "PATCH",
    "complete": "PATCH",
    "delete": "DELETE",
}
LONG_LIST = 25  # more files than this go into a file instead of the message
NOT_CONFIGURED = (
    "FlexDeploy is not configured for this bot: an admin sets `[flexdeploy] url` in the config and "
    "FLEXDEPLOY_USER / FLEXDEPLOY_PASSWORD in the environment."
)


@dataclass(frozen=True)
class Change:
    """A checked request, ready to send now or after approval."""

    action: Action
    project_id: int
    package: str
    body: dict[str, Any] | None  # the JSON sent (None for DELETE)
    before: Package | None  # as read before anything was written (None: it does not exist)
    notes: tuple[str, ...] = ()  # what the user should know (files already present, …)

    @property
    def method(self) -> str:
        return METHOD[self.action]

    @property
    def approval_action(self) -> str:
        return f"fd_{self.action}"

    def describe(self) -> str:
        name = f"`{self.package}` in project {self.project_id}"
        if self.action == "delete":
            return f"delete {name}"
        if self.action == "complete":
            return f"mark {name} COMPLETED"
        if self.action == "status":
            return f"set {name} to {(self.body or {}).get('packageStatus')}"
        return f"{self.action} {name}"


@dataclass(frozen=True)
class Applied:
    """A change FlexDeploy has made (``after`` is None for a delete)."""

    change: Change
    after: Package | None
    absent: bool = False  # delete of a package that was not there: nothing to do
    waiver: dict[str, Any] | None = None  # the approval data of a waiver that let it run unapproved


@dataclass(frozen=True)
class Pending:
    operation: Operation
    created: bool


@dataclass(frozen=True)
class Outcome:
    applied: Applied | None = None
    pending: Pending | None = None
    notes: tuple[str, ...] = field(default=())


class FlexDeployService:
    def __init__(self, *, db: Database, client: FlexDeployClient | None, settings: Settings) -> None:
        self._db = db
        self._client = client
        self._settings = settings
        self._writes = LeasedWrites(db)

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
        return await self._read(project_id, name)

    async def _read(self, project_id: int, name: str) -> Package:
        try:
            return await self.client.get_package(project_id, name)
        except ApiError as exc:
            if exc.status == 404:
                raise NotFoundError(_missing(project_id, name, exc)) from None
            raise

    async def _read_or_none(self, project_id: int, name: str) -> Package | None:
        try:
            return await self.client.get_package(project_id, name)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    # -- planning ------------------------------------------------------------------------------
    async def plan(self, command: FdWrite | FdStatus | FdDelete) -> Change:
        """Read the package and check the request against it; nothing is written here."""
        if isinstance(command, FdDelete):
            try:
                before = await self.client.get_package(command.project_id, command.package)
            except ApiError as exc:
                if exc.status != 404:
                    raise
                notes = (f"FlexDeploy: {_reason(exc)}",)
                return Change("delete", command.project_id, command.package, None, None, notes)
            return Change("delete", command.project_id, command.package, None, before)
        if isinstance(command, FdStatus):
            before = await self._read(command.project_id, command.package)
            _refuse_completed(before, command.project_id)
            if before.package_status == command.status:
                raise StateError(
                    f"`{before.name}` in project {command.project_id} is already {command.status}; nothing to change."
                )
            action: Action = "complete" if command.status == "COMPLETED" else "status"
            return Change(action, command.project_id, command.package, {"packageStatus": command.status}, before)
        if command.action == "create":
            existing = await self._read_or_none(command.project_id, command.package)
            if existing is not None:
                raise StateError(
                    f"Project {command.project_id} already has a package `{existing.name}` "
                    f"({existing.package_status}, {len(existing.files)} files). Use `/fd add` or `/fd replace` "
                    "to change it, or pick another name."
                )
            return Change("create", command.project_id, command.package, _create_body(command), None)
        before = await self._read(command.project_id, command.package)
        _refuse_completed(before, command.project_id)
        fields = command.fields
        target_type = fields.package_type or before.package_type
        check_type_rules(fields, package_type=target_type)
        if target_type == "DYNAMIC" and not (fields.include_path or before.include_path):
            raise UsageError(
                f"`{before.name}` would be DYNAMIC without an include expression; add `--include <regex,…>`.",
                usage=FD_USAGE,
            )
        if command.action == "replace":
            if target_type == "USER_MANAGED" and fields.files is None and fields.add_file_filter is None:
                raise UsageError(
                    "`replace` sets the package's files to exactly the ones you list: give `--files <list>` "
                    "(or `--files none` to empty it) or `--add-file-filter <text>`.",
                    usage=FD_USAGE,
                )
            return Change("replace", command.project_id, command.package, _replace_body(before, fields), before)
        body, added_notes = _add_body(before, fields)
        return Change("add", command.project_id, command.package, body, before, added_notes)

    def approval_for(self, change: Change) -> ApprovalRequirement | None:
        facts = ApprovalFacts(action=change.approval_action, org=str(change.project_id), package=change.package)
        return requirement_for(facts, self._settings.approval)

    # -- doing ---------------------------------------------------------------------------------
    async def submit(
        self, change: Change, *, requester: str, channel: str, idempotency_key: str, now: datetime | None = None
    ) -> Outcome:
        """Apply the change now, or record it to wait for approval."""
        if change.action == "delete" and change.before is None:
            # Nothing to delete, so nothing to approve. No DELETE is sent either: had the package
            # been created a moment ago, an unapproved DELETE would remove it.
            return Outcome(applied=Applied(change, None, absent=True), notes=change.notes)
        requirement = self.approval_for(change)
        if requirement is None or not requirement.needed:
            waiver = requirement.to_data(now=now or datetime.now(UTC)) if requirement and requirement.waiver else None
            try:
                after = await self._send(change)
            except AmbiguousWriteError as exc:
                raise AmbiguousWriteError(
                    f'{exc.message}. Check with `/fd show {change.project_id} "{change.package}"` before trying again.',
                    system=exc.system,
                    status=exc.status,
                ) from None
            return Outcome(applied=Applied(change, after, waiver=waiver), notes=change.notes)
        operation, created = await self._request(
            change,
            requirement,
            requester=requester,
            channel=channel,
            idempotency_key=idempotency_key,
            now=now or datetime.now(UTC),
        )
        return Outcome(pending=Pending(operation, created), notes=change.notes)

    async def _send(self, change: Change) -> Package | None:
        client = self.client
        try:
            if change.action == "create":
                return await client.create_package(change.project_id, change.body or {})
            if change.action == "replace":
                return await client.replace_package(change.project_id, change.package, change.body or {})
            if change.action == "delete":
                await client.delete_package(change.project_id, change.package)
                return None
            return await client.patch_package(change.project_id, change.package, change.body or {})
        except ApiError as exc:
            if exc.status == 404:
                raise NotFoundError(_missing(change.project_id, change.package, exc)) from None
            raise

    async def _request(
        self,
        change: Change,
        requirement: ApprovalRequirement,
        *,
        requester: str,
        channel: str,
        idempotency_key: str,
        now: datetime,
    ) -> tuple[Operation, bool]:
        operation = Operation(
            kind=OpKind.FD,
            state=OpState.AWAITING_APPROVAL,
            step="call",
            summary=change.describe()[:200],
            params={
                "action": change.action,
                "project_id": change.project_id,
                "package": change.package,
                "body": change.body,
            },
            data={"approval": requirement.to_data(now=now), "before": summary_of(change.before)},
            requester=requester,
            channel=channel,
            idempotency_key=idempotency_key,
            next_poll_at=now,
            approval_expires_at=now + requirement.expires_after,
        )
        return await repo.insert_operation(self._db, operation=operation)

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
        done = await repo.update_operation(
            self._db,
            operation_id=operation.id,
            expect_states=[OpState.AWAITING_APPROVAL],
            values={
                "state": OpState.CANCELED,
                "next_poll_at": datetime.now(UTC),
                "data": {**operation.data, "canceled_by": user},
            },
        )
        if not done:
            raise StateError(f"{operation.ref} was decided a moment ago; it can no longer be canceled.")
        return await self.get(ref)

    # -- the poller's side ---------------------------------------------------------------------
    async def advance(self, operations: Sequence[Operation], *, lease_token: str) -> dict[int, Advance]:
        results: dict[int, Advance] = {}
        for operation in operations:
            assert operation.id is not None
            try:
                if operation.state == OpState.AWAITING_APPROVAL:
                    results[operation.id] = await self._writes.check_expiry(operation, lease_token)
                elif operation.state == OpState.STARTING:
                    results[operation.id] = await self._perform(operation, lease_token)
                else:
                    results[operation.id] = Advance()
            except AuthError as exc:
                results[operation.id] = await self._writes.transient(operation, lease_token, exc, delay=300)
            except TransientError as exc:
                results[operation.id] = await self._writes.transient(operation, lease_token, exc)
        return results

    async def _perform(self, operation: Operation, lease_token: str) -> Advance:
        """The approved call, made once: the attempt is recorded first, and a repeat checks first."""
        params = operation.params
        change = Change(
            action=params["action"],
            project_id=int(params["project_id"]),
            package=str(params["package"]),
            body=params.get("body"),
            before=None,
        )
        if change.action != "delete":
            # Re-read: the package may have changed while the request waited for approval.
            try:
                current = await self._read_or_none(change.project_id, change.package)
            except ApiError as exc:
                return await self._finish(operation, lease_token, OpState.FAILED, error=f"FlexDeploy: {exc.message}")
            retried = bool(operation.data.get("attempted_at"))
            if (retried or change.action in {"status", "complete"}) and _already_done(change, current):
                return await self._finish(operation, lease_token, OpState.SUCCEEDED, after=current)
            problem = _stale(change, current)
            if problem:
                return await self._finish(operation, lease_token, OpState.FAILED, error=problem)
        attempted = {**operation.data, "attempted_at": datetime.now(UTC).isoformat()}
        if not await self._writes.save(operation, lease_token, data=attempted):
            return Advance()
        try:
            after = await self._send(change)
        except AmbiguousWriteError:
            raise  # transient: the next round reads the package and decides
        except (ApiError, NotFoundError, UsageError) as exc:
            await repo.audit(
                self._db,
                actor="bot",
                channel=operation.channel,
                operation_ref=operation.ref,
                action="call",
                detail=f"{change.method} project {change.project_id} package {change.package!r}",
                outcome=f"refused: {exc.message[:150]}",
            )
            return await self._finish(operation, lease_token, OpState.FAILED, error=f"FlexDeploy: {exc.message}")
        await repo.audit(
            self._db,
            actor="bot",
            channel=operation.channel,
            operation_ref=operation.ref,
            action="call",
            detail=f"{change.method} project {change.project_id} package {change.package!r}",
            outcome="ok",
        )
        return await self._finish(operation, lease_token, OpState.SUCCEEDED, after=after)

    async def _finish(
        self,
        operation: Operation,
        lease_token: str,
        state: OpState,
        *,
        after: Package | None = None,
        error: str | None = None,
    ) -> Advance:
        data = {key: value for key, value in operation.data.items() if key != "attempted_at"}
        if after is not None:
            data["after"] = summary_of(after)
            data["after_files"] = [_file_json(file) for file in after.files]
        if error:
            data["error"] = redact_text(error)[:500]
        if not await self._writes.save(operation, lease_token, state=state, step="", data=data):
            return Advance()
        return Advance(events=[OpEvent("completed" if state == OpState.SUCCEEDED else "error")])

    async def completion_files(self, operation: Operation) -> list[OpFile]:
        """The package's full file list when it is too long for the thread."""
        files = operation.data.get("after_files") or []
        if len(files) <= LONG_LIST:
            return []
        package = Package(name=str(operation.params.get("package")), files=tuple(_file_of(item) for item in files))
        return [files_csv(package, project_id=int(operation.params.get("project_id") or 0))]


# -- request bodies ---------------------------------------------------------------------------------


def _file_body(specs: Sequence[FileSpec]) -> list[dict[str, Any]]:
    return [
        PackageFile(file_path=spec.path, object_type=spec.object_type, sequence_number=spec.sequence).to_json()
        for spec in specs
    ]


def _attribute_body(fields: PackageFields) -> dict[str, Any]:
    """Every attribute that was given; PATCH treats the ones left out (null) as "unchanged"."""
    body: dict[str, Any] = {
        "description": fields.description,
        "packageType": fields.package_type,
        "packageStatus": fields.package_status,
        "includePath": fields.include_path,
        "excludePath": fields.exclude_path,
        "tests": fields.tests,
        "testLevel": fields.test_level,
        "versionSyntax": fields.version_syntax,
        "sortAll": fields.sort_all,
        "addFileFilter": fields.add_file_filter,
    }
    if fields.files is not None:
        body["files"] = _file_body(fields.files)
    return {key: value for key, value in body.items() if value is not None}


def _create_body(command: FdWrite) -> dict[str, Any]:
    return {"name": command.package, **_attribute_body(command.fields)}


def _replace_body(before: Package, fields: PackageFields) -> dict[str, Any]:
    """PUT is a complete update: carry over what the user did not mention, so that only the
    files (and the attributes they named) change — attributes left out would be reset."""
    target_type = fields.package_type or before.package_type
    body: dict[str, Any] = {
        "name": before.name,
        "description": before.description,
        "packageType": target_type,
        "packageStatus": before.package_status,
        "tests": before.tests,
        "testLevel": before.test_level,
        "versionSyntax": before.version_syntax,
    }
    if target_type == "DYNAMIC":
        body["includePath"] = before.include_path
        body["excludePath"] = before.exclude_path
    given = _attribute_body(fields)
    body.update(given)
    if target_type == "USER_MANAGED":
        body.setdefault("files", [])
    return {key: value for key, value in body.items() if value is not None}


def _add_body(before: Package, fields: PackageFields) -> tuple[dict[str, Any], tuple[str, ...]]:
    """PATCH appends the files that are new; say which were already there, refuse clashing numbers."""
    body = _attribute_body(fields)
    notes: list[str] = []
    if fields.files == ():
        raise UsageError(
            "`--files none` empties a package, which is `/fd replace`; `add` only appends.", usage=FD_USAGE
        )
    if fields.files:
        present = {file.file_path for file in before.files}
        already = [spec for spec in fields.files if spec.path in present]
        new = [spec for spec in fields.files if spec.path not in present]
        if already:
            shown = ", ".join(f"`{spec.path}`" for spec in already[:5]) + (" …" if len(already) > 5 else "")
            notes.append(f"{len(already)} file(s) were already in the package and stay as they are: {shown}")
        if not new and not (set(body) - {"files"}):
            raise StateError(
                f"All {len(already)} file(s) are already in `{before.name}`; nothing to add. "
                "`/fd replace` sets the exact list."
            )
        check_sequence_numbers(new)
        used = {file.sequence_number: file.file_path for file in before.files if file.sequence_number is not None}
        # The docs do not say what PATCH does with a number already taken; say it here, before any call.
        if not fields.sort_all:
            for spec in new:
                if spec.sequence is not None and spec.sequence in used:
                    raise UsageError(
                        f"Sequence number {spec.sequence} is already used by `{used[spec.sequence]}` in "
                        f"`{before.name}`. Leave the numbers out to append after the last file "
                        f"({max(used)}), or pick free numbers.",
                        usage=FD_USAGE,
                    )
        body["files"] = _file_body(new)
        if not new:
            del body["files"]
    return body, tuple(notes)


def _already_done(change: Change, current: Package | None) -> bool:
    """After an attempt whose outcome is unknown: does FlexDeploy already show the change?"""
    if current is None:
        return False
    body = change.body or {}
    if change.action in {"status", "complete"}:
        return current.package_status == body.get("packageStatus")
    if change.action == "create":
        return True  # it exists: our POST went through (the plan checked it did not exist)
    wanted = {str(item.get("filePath")) for item in body.get("files") or []}
    present = {file.file_path for file in current.files}
    if change.action == "add":
        return wanted <= present
    return change.action == "replace" and wanted == present


def _stale(change: Change, current: Package | None) -> str | None:
    """Why an approved change can no longer be sent as planned, or None."""
    if change.action == "create":
        return f"`{change.package}` was created by someone else meanwhile; nothing was sent." if current else None
    if current is None:
        return f"`{change.package}` no longer exists in project {change.project_id}; nothing was sent."
    if current.package_status == "COMPLETED":
        return (
            f"`{change.package}` became COMPLETED while this waited; completed packages can not be "
            "modified, so nothing was sent."
        )
    return None


def _refuse_completed(package: Package, project_id: int) -> None:
    if package.package_status == "COMPLETED":
        raise StateError(
            f"`{package.name}` in project {project_id} is COMPLETED, and FlexDeploy does not allow completed "
            "packages to be modified. Nothing was sent; create a new package for further changes."
        )


def _reason(exc: UpstreamError) -> str:
    """What FlexDeploy said, from the client's "… (HTTP 404): <reason>" message."""
    return exc.message.split(": ", 1)[1] if ": " in exc.message else "not found"


def _missing(project_id: int, name: str, exc: UpstreamError) -> str:
    return (
        f"FlexDeploy has no package `{name}` in project {project_id} ({_reason(exc)}). Package names are "
        "case-sensitive; check the project id too."
    )


# -- plain data for cards and files -----------------------------------------------------------------


def summary_of(package: Package | None) -> dict[str, Any] | None:
    if package is None:
        return None
    return {
        "name": package.name,
        "type": package.package_type,
        "status": package.package_status,
        "files": len(package.files),
        "description": package.description,
    }


def _file_json(file: PackageFile) -> dict[str, Any]:
    return {"filePath": file.file_path, "objectType": file.object_type, "sequenceNumber": file.sequence_number}


def _file_of(item: dict[str, Any]) -> PackageFile:
    sequence = item.get("sequenceNumber")
    return PackageFile(
        file_path=str(item.get("filePath") or ""),
        object_type=item.get("objectType"),
        sequence_number=int(sequence) if sequence is not None else None,
    )


def files_csv(package: Package, *, project_id: int) -> OpFile:
    content = csv_bytes(
        header=["sequenceNumber", "objectType", "filePath"],
        rows=([file.sequence_number, file.object_type, file.file_path] for file in package.files),
    )
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in package.name)[:60] or "package"
    return OpFile(
        name=f"fd-{project_id}-{slug}-files.csv",
        title=f"{package.name} (project {project_id}): {len(package.files)} files",
        content=content,
    )
