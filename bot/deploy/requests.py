"""What a ``/deploy`` command asks for, parsed: the requests the deploy service takes.

Apart from the grammar (``bot.deploy.commands``) so that the service imports no usage text.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DeployFlags:
    """What the user asked for; ``None`` means "not said" (the service picks the default)."""

    test_level: str | None = None
    tests: tuple[str, ...] = ()
    ignore_warnings: bool = False
    rollback_on_error: bool | None = None
    purge_on_delete: bool = False
    allow_missing_files: bool = False
    auto_update_package: bool = False
    single_package: bool | None = None
    perform_retrieve: bool = False


@dataclass(frozen=True)
class DeployStart:
    check_only: bool  # validate = deploy with checkOnly
    org: str
    artifact: str
    flags: DeployFlags = field(default_factory=DeployFlags)
    at: str | None = None


@dataclass(frozen=True)
class DeployQuick:
    ref: str
    at: str | None = None


@dataclass(frozen=True)
class DeployRef:
    action: str  # status | cancel
    ref: str


@dataclass(frozen=True)
class DeployList:
    pass


@dataclass(frozen=True)
class DeployOrgs:
    pass


@dataclass(frozen=True)
class DeployHelp:
    pass


DeployCommand = DeployStart | DeployQuick | DeployRef | DeployList | DeployOrgs | DeployHelp
