"""What ``/fd`` asks for, parsed: the requests the FlexDeploy service takes.

Kept apart from the grammar (``commands``) so that the service reads no usage text: the checks
here raise ``UsageError`` without it, and the handler adds ``/fd``'s usage (``guarded``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bot.errors import UsageError


@dataclass(frozen=True)
class FileSpec:
    path: str
    sequence: int | None = None
    object_type: str | None = None


@dataclass(frozen=True)
class PackageFields:
    """Attributes given as flags; ``None`` means "not given"."""

    description: str | None = None
    package_type: str | None = None
    files: tuple[FileSpec, ...] | None = None
    sort_all: bool | None = None
    add_file_filter: str | None = None
    include_path: str | None = None
    exclude_path: str | None = None
    tests: str | None = None
    test_level: str | None = None
    version_syntax: str | None = None
    package_status: str | None = None

    @property
    def empty(self) -> bool:
        return self == PackageFields()


@dataclass(frozen=True)
class FdShow:
    project_id: int
    package: str


@dataclass(frozen=True)
class FdWrite:
    action: Literal["create", "add", "replace"]
    project_id: int
    package: str
    fields: PackageFields


@dataclass(frozen=True)
class FdStatus:
    project_id: int
    package: str
    status: str


@dataclass(frozen=True)
class FdDelete:
    project_id: int
    package: str


@dataclass(frozen=True)
class FdCancel:
    ref: str


@dataclass(frozen=True)
class FdHelp:
    pass


FdCommand = FdShow | FdWrite | FdStatus | FdDelete | FdCancel | FdHelp


def check_sequence_numbers(specs: list[FileSpec] | tuple[FileSpec, ...]) -> None:
    """FlexDeploy: sequence numbers are given for all files in a request or for none."""
    numbered = [spec for spec in specs if spec.sequence is not None]
    if numbered and len(numbered) != len(specs):
        missing = [spec.path for spec in specs if spec.sequence is None]
        shown = ", ".join(f"`{path[:60]}`" for path in missing[:3]) + (" …" if len(missing) > 3 else "")
        raise UsageError(
            f"Sequence numbers are given for all files or for none: {len(numbered)} of {len(specs)} files have one "
            f"(missing on {shown}). Write each file as `<seq>:<path>`, or drop the numbers."
        )
    counts: dict[int, int] = {}
    for spec in numbered:
        assert spec.sequence is not None
        counts[spec.sequence] = counts.get(spec.sequence, 0) + 1
    twice = sorted(number for number, count in counts.items() if count > 1)
    if twice:
        raise UsageError(f"Sequence number {twice[0]} is given to more than one file.")


def check_type_rules(fields: PackageFields, *, package_type: str | None) -> None:
    """USER_MANAGED packages take files; DYNAMIC ones take include/exclude expressions."""
    if package_type == "USER_MANAGED" and (fields.include_path is not None or fields.exclude_path is not None):
        which = " and ".join(
            name for name, value in (("--include", fields.include_path), ("--exclude", fields.exclude_path)) if value
        )
        raise UsageError(
            f"{which} only apply to DYNAMIC packages, and this one is USER_MANAGED. "
            "Add `--type DYNAMIC` to make it dynamic, or list its files with `--files`."
        )
    if package_type == "DYNAMIC" and (fields.files or fields.add_file_filter or fields.sort_all):
        raise UsageError(
            "A DYNAMIC package's files come from its `--include`/`--exclude` expressions; "
            "`--files`, `--add-file-filter` and `--sort-all` are for USER_MANAGED packages."
        )
