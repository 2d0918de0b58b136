"""What an ``fd`` operation row keeps: ``FdParams`` (the change asked for) and ``FdData`` (what happened).

Version 1 is the key layout the release before typed payloads wrote, so its rows load unchanged
(``tests/fixtures/operations_r2_flexdeploy.json``). The request body and the file entries keep
FlexDeploy's own camelCase keys, because the body is sent to FlexDeploy exactly as stored; the
models read them under snake_case names through aliases. ``PackageSummary`` gained optional
attributes (include/exclude expressions, tests, test level, version syntax) so that a change made
without approval can be described from the row alone; rows without them read as "not known".
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bot.clients.flexdeploy import Package, PackageFile
from bot.core.payloads import OperationState, Payload

Action = Literal["create", "add", "replace", "status", "complete", "delete"]


def _key(key: str, default: Any = None) -> Any:
    """A field stored under ``key`` (FlexDeploy's camelCase) and set in code by its Python name."""
    return Field(default=default, validation_alias=key, serialization_alias=key)


class _Part(BaseModel):
    """A nested part: no version of its own (its payload has one), FlexDeploy's keys on the wire."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True, by_alias=True)


class FileEntry(_Part):
    """One file of a package, as FlexDeploy writes it (in a request body or read back after a change)."""

    file_path: str = _key("filePath", "")
    object_type: str | None = _key("objectType")
    sequence_number: int | None = _key("sequenceNumber")

    @classmethod
    def of(cls, file: PackageFile) -> FileEntry:
        return cls(file_path=file.file_path, object_type=file.object_type, sequence_number=file.sequence_number)

    def to_file(self) -> PackageFile:
        return PackageFile(file_path=self.file_path, object_type=self.object_type, sequence_number=self.sequence_number)


class PackageBody(_Part):
    """The JSON sent to FlexDeploy (POST, PUT or PATCH); attributes left out mean "unchanged"."""

    name: str | None = None
    description: str | None = None
    package_type: str | None = _key("packageType")
    package_status: str | None = _key("packageStatus")
    include_path: str | None = _key("includePath")
    exclude_path: str | None = _key("excludePath")
    tests: str | None = None
    test_level: str | None = _key("testLevel")
    version_syntax: str | None = _key("versionSyntax")
    sort_all: bool | None = _key("sortAll")
    add_file_filter: str | None = _key("addFileFilter")
    files: list[FileEntry] | None = None


class PackageSummary(_Part):
    """A package as it was before or after the change, for the card (not its files)."""

    name: str = ""
    package_type: str = _key("type", "USER_MANAGED")
    package_status: str = _key("status", "ACTIVE")
    files: int = 0
    description: str | None = None
    include_path: str | None = _key("include")
    exclude_path: str | None = _key("exclude")
    tests: str | None = None
    test_level: str | None = None
    version_syntax: str | None = None

    @classmethod
    def of(cls, package: Package) -> PackageSummary:
        return cls(
            name=package.name,
            package_type=package.package_type,
            package_status=package.package_status,
            files=len(package.files),
            description=package.description,
            include_path=package.include_path,
            exclude_path=package.exclude_path,
            tests=package.tests,
            test_level=package.test_level,
            version_syntax=package.version_syntax,
        )

    def to_package(self, files: list[FileEntry] | None = None) -> Package:
        return Package(
            name=self.name,
            description=self.description,
            files=tuple(entry.to_file() for entry in files or []),
            package_type=self.package_type,
            package_status=self.package_status,
            include_path=self.include_path,
            exclude_path=self.exclude_path,
            tests=self.tests,
            test_level=self.test_level,
            version_syntax=self.version_syntax,
        )

    def dump(self) -> dict[str, Any]:
        return {**super().dump(), "description": self.description}  # always written, even when empty


class FdParams(Payload):
    """What was asked: one call to FlexDeploy, fixed when the operation is created."""

    action: Action
    project_id: int
    package: str
    body: PackageBody | None = None  # None for DELETE

    def dump(self) -> dict[str, Any]:
        return {
            **self.model_dump(mode="json", exclude_none=True, by_alias=True),
            "body": self.body.dump() if self.body else None,
        }


class FdData(OperationState):
    """What happened: the package before, the attempt, and the package after (or the error)."""

    before: PackageSummary | None = None  # None: the package did not exist (a create)
    attempted_at: str | None = None  # set just before the call; a repeat checks FlexDeploy first
    after: PackageSummary | None = None
    after_files: list[FileEntry] | None = None
    error: str | None = None
    canceled_by: str | None = None

    def dump(self) -> dict[str, Any]:
        out = self.model_dump(mode="json", exclude_none=True, by_alias=True)
        out["before"] = self.before.dump() if self.before else None
        if self.after is not None:
            out["after"] = self.after.dump()
        return out

    @property
    def waited_for_approval(self) -> bool:
        """Whether someone had to approve: the package may have changed in the meantime."""
        return self.approval is not None and self.approval.count > 0

    def after_package(self) -> Package | None:
        return self.after.to_package(self.after_files) if self.after else None
