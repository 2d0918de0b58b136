"""What a ``/push`` command asks for, once parsed: plain values the service takes.

Kept apart from the grammar (``bot.push.commands``) so the service never imports usage text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bot.core.grammar import Help


@dataclass(frozen=True)
class VersionSpec:
    version_id: str | None = None
    package_name: str | None = None
    number: tuple[int, int, int] | None = None

    def __str__(self) -> str:
        if self.version_id:
            return self.version_id
        assert self.number is not None
        return f"{self.package_name}@{'.'.join(map(str, self.number))}"


@dataclass(frozen=True)
class OrgSelection:
    scope: str = "all"  # all | production | sandbox | ids
    org_ids: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.scope if self.scope != "ids" else f"{len(self.org_ids)} listed org(s)"


@dataclass(frozen=True)
class PushCreate:
    version: VersionSpec
    orgs: OrgSelection = field(default_factory=OrgSelection)
    at: str | None = None  # raw text; resolved in the requester's time zone later
    dry_run: bool = False


@dataclass(frozen=True)
class PushRetry:
    ref: str
    at: str | None = None
    dry_run: bool = False


@dataclass(frozen=True)
class PushRef:
    action: str  # status | cancel
    ref: str


@dataclass(frozen=True)
class PushList:
    pass


PushCommand = PushCreate | PushRetry | PushRef | PushList | Help
