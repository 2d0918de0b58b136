"""Planning a package change and making its one call: shared by the requests (``service``) and the
poller's steps (``steps``).

A change is planned against the package as FlexDeploy holds it (read first), so a bad request is
refused before anything is written; the call itself is made later by the poller, and a repeat
after an unknown outcome checks first whether FlexDeploy already shows the change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bot.clients.flexdeploy import FlexDeployClient, Package, PackageFile
from bot.core.operations import OpFile
from bot.errors import ApiError, NotFoundError, StateError, UpstreamError, UsageError
from bot.flexdeploy.payloads import Action, FdParams, FileEntry, PackageBody
from bot.flexdeploy.requests import FileSpec, PackageFields, check_sequence_numbers
from bot.redaction import csv_bytes

METHOD: dict[str, str] = {
    "create": "POST",
    "add": "PATCH",
    "replace": "PUT",
    "status": "PATCH",
    "complete": "PATCH",
    "delete": "DELETE",
}
LONG_LIST = 25  # more files than this go into a file instead of the message


@dataclass(frozen=True)
class Change:
    """A checked request, ready to be sent by the poller (at once, or after approval)."""

    action: Action
    project_id: int
    package: str
    body: PackageBody | None  # the JSON sent (None for DELETE)
    before: Package | None  # as read before anything was written (None: it does not exist)
    notes: tuple[str, ...] = ()  # what the user should know (files already present, …)

    @classmethod
    def of(cls, params: FdParams) -> Change:
        return cls(params.action, params.project_id, params.package, params.body, before=None)

    @property
    def params(self) -> FdParams:
        return FdParams(action=self.action, project_id=self.project_id, package=self.package, body=self.body)

    @property
    def method(self) -> str:
        return METHOD[self.action]

    @property
    def approval_action(self) -> str:
        return f"fd_{self.action}"

    @property
    def call(self) -> str:
        """The call as the audit trail names it."""
        return f"{self.method} project {self.project_id} package {self.package!r}"

    def describe(self) -> str:
        name = f"`{self.package}` in project {self.project_id}"
        if self.action == "delete":
            return f"delete {name}"
        if self.action == "complete":
            return f"mark {name} COMPLETED"
        if self.action == "status":
            return f"set {name} to {self.body.package_status if self.body else None}"
        return f"{self.action} {name}"


# -- reading and the one call -----------------------------------------------------------------------


async def read_package(client: FlexDeployClient, project_id: int, name: str) -> Package:
    try:
        return await client.get_package(project_id, name)
    except ApiError as exc:
        if exc.status == 404:
            raise NotFoundError(missing(project_id, name, exc)) from None
        raise


async def read_or_none(client: FlexDeployClient, project_id: int, name: str) -> Package | None:
    try:
        return await client.get_package(project_id, name)
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise


async def send(client: FlexDeployClient, change: Change) -> Package | None:
    body = change.body.dump() if change.body else {}
    try:
        if change.action == "create":
            return await client.create_package(change.project_id, body)
        if change.action == "replace":
            return await client.replace_package(change.project_id, change.package, body)
        if change.action == "delete":
            await client.delete_package(change.project_id, change.package)
            return None
        return await client.patch_package(change.project_id, change.package, body)
    except ApiError as exc:
        if exc.status == 404:
            raise NotFoundError(missing(change.project_id, change.package, exc)) from None
        raise


# -- request bodies ---------------------------------------------------------------------------------


def file_body(specs: Sequence[FileSpec]) -> list[FileEntry]:
    return [
        FileEntry(file_path=spec.path, object_type=spec.object_type, sequence_number=spec.sequence) for spec in specs
    ]


def attribute_body(fields: PackageFields) -> PackageBody:
    """Every attribute that was given; PATCH treats the ones left out (null) as "unchanged"."""
    return PackageBody(
        description=fields.description,
        package_type=fields.package_type,
        package_status=fields.package_status,
        include_path=fields.include_path,
        exclude_path=fields.exclude_path,
        tests=fields.tests,
        test_level=fields.test_level,
        version_syntax=fields.version_syntax,
        sort_all=fields.sort_all,
        add_file_filter=fields.add_file_filter,
        files=file_body(fields.files) if fields.files is not None else None,
    )


def create_body(package: str, fields: PackageFields) -> PackageBody:
    return attribute_body(fields).model_copy(update={"name": package})


def replace_body(before: Package, fields: PackageFields) -> PackageBody:
    """PUT is a complete update: carry over what the user did not mention, so that only the
    files (and the attributes they named) change — attributes left out would be reset."""
    target_type = fields.package_type or before.package_type
    dynamic = target_type == "DYNAMIC"
    carried = PackageBody(
        name=before.name,
        description=before.description,
        package_type=target_type,
        package_status=before.package_status,
        tests=before.tests,
        test_level=before.test_level,
        version_syntax=before.version_syntax,
        include_path=before.include_path if dynamic else None,
        exclude_path=before.exclude_path if dynamic else None,
    )
    given = attribute_body(fields)
    body = carried.model_copy(update=given.model_dump(exclude_none=True, exclude={"files"}))
    body.files = given.files
    if target_type == "USER_MANAGED" and body.files is None:
        body.files = []
    return body


def add_body(before: Package, fields: PackageFields) -> tuple[PackageBody, tuple[str, ...]]:
    """PATCH appends the files that are new; say which were already there, refuse clashing numbers."""
    body = attribute_body(fields)
    notes: list[str] = []
    if fields.files == ():
        raise UsageError("`--files none` empties a package, which is `/fd replace`; `add` only appends.")
    if fields.files:
        present = {file.file_path for file in before.files}
        already = [spec for spec in fields.files if spec.path in present]
        new = [spec for spec in fields.files if spec.path not in present]
        if already:
            shown = ", ".join(f"`{spec.path}`" for spec in already[:5]) + (" …" if len(already) > 5 else "")
            notes.append(f"{len(already)} file(s) were already in the package and stay as they are: {shown}")
        if not new and not body.model_dump(exclude_none=True, exclude={"files"}):
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
                        f"({max(used)}), or pick free numbers."
                    )
        body.files = file_body(new) or None
    return body, tuple(notes)


# -- checks against the package as FlexDeploy holds it ----------------------------------------------


def already_done(change: Change, current: Package | None) -> bool:
    """After an attempt whose outcome is unknown: does FlexDeploy already show the change?"""
    if current is None:
        return False
    body = change.body or PackageBody()
    if change.action in {"status", "complete"}:
        return current.package_status == body.package_status
    if change.action == "create":
        return True  # it exists: our POST went through (the plan checked it did not exist)
    wanted = {entry.file_path for entry in body.files or []}
    present = {file.file_path for file in current.files}
    if change.action == "add":
        return wanted <= present
    return change.action == "replace" and wanted == present


def stale(change: Change, current: Package | None) -> str | None:
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


def refuse_completed(package: Package, project_id: int) -> None:
    if package.package_status == "COMPLETED":
        raise StateError(
            f"`{package.name}` in project {project_id} is COMPLETED, and FlexDeploy does not allow completed "
            "packages to be modified. Nothing was sent; create a new package for further changes."
        )


def reason(exc: UpstreamError) -> str:
    """What FlexDeploy said, from the client's "… (HTTP 404): <reason>" message."""
    return exc.message.split(": ", 1)[1] if ": " in exc.message else "not found"


def missing(project_id: int, name: str, exc: UpstreamError) -> str:
    return (
        f"FlexDeploy has no package `{name}` in project {project_id} ({reason(exc)}). Package names are "
        "case-sensitive; check the project id too."
    )


def files_csv(package: Package, *, project_id: int) -> OpFile:
    """A package's whole file list as a file, for lists too long for a message."""
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


def file_entries(files: Sequence[PackageFile]) -> list[FileEntry]:
    return [FileEntry.of(file) for file in files]
