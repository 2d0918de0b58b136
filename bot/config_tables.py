"""The TOML tables of the configuration (``[orgs.*]``, ``[[approval]]``, ``[access]``, ``[sfp]`` …).

Each table is a strict model, so an unknown key or a bad value is refused at start-up; the
values they check (URLs, durations, ids, action names) are defined here once. ``bot.settings``
assembles them with the environment into ``Settings``.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import timedelta
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from bot.core.when import parse_duration

COMMANDS = ("push", "deploy", "sfp", "fd")
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,39}$")
# Every action a service asks ``requirement_for`` about.
ApprovalAction = Literal[
    "push",
    "deploy",
    "validate",
    "quick_deploy",
    "sfp",
    "sfp_recurring",
    "fd_create",
    "fd_add",
    "fd_replace",
    "fd_status",
    "fd_complete",
    "fd_delete",
]
APPROVAL_ACTIONS: tuple[str, ...] = ApprovalAction.__args__  # type: ignore[attr-defined]
# Actions whose built-in minimum (one approval by someone other than the requester) always holds
# where it applies; see bot/core/approvals.py.
MINIMUM_ACTIONS = frozenset({"push", "deploy", "quick_deploy", "fd_delete", "fd_complete"})
# Which matchers each action's facts carry: a matcher the action never sets would make its rule
# silently match nothing.
RULE_MATCHERS: dict[str, frozenset[str]] = {
    **{action: frozenset({"org_kind", "org"}) for action in ("deploy", "validate", "quick_deploy")},
    "push": frozenset({"org_kind", "org", "package"}),
    "sfp": frozenset({"task_type"}),
    "sfp_recurring": frozenset({"task_type"}),
    **{action: frozenset({"org", "package"}) for action in APPROVAL_ACTIONS if action.startswith("fd_")},
}
SLACK_APPROVER_RE = re.compile(r"^[UWS][A-Z0-9]+$")


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_service_url(url: str, *, what: str) -> str:
    """Salesforce and server URLs must be https, except http to a loopback address."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url.rstrip("/")
    if parts.scheme == "http" and is_loopback_host(parts.hostname):
        return url.rstrip("/")
    raise ValueError(f"{what} must be an https:// URL (http:// only to a loopback address), got {parts.scheme}://…")


def mask_url_password(url: str) -> str:
    """``scheme://user:secret@host/…`` → ``scheme://user:***@host/…``; anything else unchanged."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):[^@/\s]*@", r"\1:***@", url)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JwtAuthConfig(_Strict):
    login_url: str = "https://login.salesforce.com"
    client_id: str
    username: str
    key_file: Path

    @field_validator("login_url")
    @classmethod
    def _login_url(cls, value: str) -> str:
        return check_service_url(value, what="jwt.login_url")


class OrgConfig(_Strict):
    kind: Literal["production", "sandbox", "scratch"]
    packaging: bool = False
    auth_url: SecretStr | None = None
    jwt: JwtAuthConfig | None = None
    label: str | None = None


class ApprovalRule(_Strict):
    """One ``[[approval]]`` table. It can only add to the built-in minimum unless it carries a
    ``waiver`` saying why it lowers it (``count = 0``, or ``self_approval = true`` where the
    minimum applies)."""

    action: ApprovalAction
    org_kind: Literal["production", "sandbox", "scratch"] | None = None
    org: str | None = None
    package: str | None = None
    task_type: str | None = None
    approvers: list[str] = Field(default_factory=list)
    count: int = Field(default=1, ge=0, le=10)
    self_approval: bool = False
    expires: str = "24h"
    waiver: str | None = None

    @field_validator("expires")
    @classmethod
    def _expires(cls, value: str) -> str:
        parse_duration(value)
        return value

    @field_validator("approvers")
    @classmethod
    def _approvers(cls, value: list[str]) -> list[str]:
        for entry in value:
            if not SLACK_APPROVER_RE.match(entry):
                raise ValueError(
                    f"{entry[:40]!r} is not a Slack id; allowed: user ids (U…, W…) and user-group ids (S…)"
                )
        return value

    @field_validator("waiver")
    @classmethod
    def _waiver(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError('an empty waiver explains nothing; allowed: a reason, e.g. waiver = "scratch packages"')
        return value.strip() if value else value

    @model_validator(mode="after")
    def _matchers_and_waiver(self) -> ApprovalRule:
        unused = [
            name
            for name in ("org_kind", "org", "package", "task_type")
            if getattr(self, name) is not None and name not in RULE_MATCHERS[self.action]
        ]
        if unused:
            allowed = ", ".join(sorted(RULE_MATCHERS[self.action]))
            raise ValueError(f"{unused[0]} never matches action {self.action!r}; allowed matchers: {allowed}")
        if self.action.startswith("fd_") and self.org is not None and not self.org.isdigit():
            raise ValueError(f'org = {self.org[:40]!r} is not a FlexDeploy project id; allowed: digits, e.g. "101"')
        if self.count == 0 and self.waiver is None:
            raise ValueError('count = 0 turns approvals off; allowed only with waiver = "<why>" in the same rule')
        if self.waiver is not None and self.count > 0 and not self.self_approval:
            raise ValueError(
                "waiver given but the rule lowers nothing; allowed only with count = 0 or self_approval = true"
            )
        return self

    def may_touch_minimum(self, orgs: dict[str, OrgConfig]) -> bool:
        """Whether this rule can match an operation that the built-in minimum covers."""
        if self.action not in MINIMUM_ACTIONS:
            return False
        if self.action.startswith("fd_"):
            return True
        if self.org_kind not in (None, "production"):
            return False
        if self.action != "push" and self.org is not None and self.org in orgs:
            return orgs[self.org].kind == "production"
        return True

    @property
    def expires_after(self) -> timedelta:
        return parse_duration(self.expires)


class AccessRule(_Strict):
    """Who may run one command; an empty list means "no restriction on that axis"."""

    users: list[str] = Field(default_factory=list)
    usergroups: list[str] = Field(default_factory=list)
    channels: list[str] = Field(default_factory=list)


class AccessConfig(_Strict):
    """``[access]``: admins, and one optional table per command (``[access.push]`` …).

    A table for anything but a command is refused at start-up, so a typo such as
    ``[access.deploys]`` cannot silently restrict nothing.
    """

    admins: list[str] = Field(default_factory=list)  # may cancel any operation (SPEC §13)
    push: AccessRule | None = None
    deploy: AccessRule | None = None
    sfp: AccessRule | None = None
    fd: AccessRule | None = None

    def rule_for(self, command: str) -> AccessRule | None:
        value = getattr(self, command.lstrip("/"), None) if command.lstrip("/") in COMMANDS else None
        return value if isinstance(value, AccessRule) else None


class SfpConfig(_Strict):
    url: str
    # Which task types `/sfp submit` may send; ["*"] allows every type. Unset: none, since with
    # the server's token any type would otherwise run (refused with a message naming this key).
    task_types: list[str] | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_service_url(value, what="sfp.url")

    @field_validator("task_types")
    @classmethod
    def _task_types(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError('sfp.task_types is empty: list the task types to allow, or ["*"] for every type')
        for entry in value:
            if not entry.strip() or entry != entry.strip() or any(ch.isspace() for ch in entry):
                raise ValueError(f"sfp.task_types: {entry!r} is not a task type (a non-empty name without spaces)")
        if "*" in value and len(value) > 1:
            raise ValueError('sfp.task_types: "*" allows every type; list it alone or list types without it')
        return value

    def allows(self, task_type: str) -> bool:
        return self.task_types is not None and (self.task_types == ["*"] or task_type in self.task_types)


class FlexDeployConfig(_Strict):
    url: str

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_service_url(value, what="flexdeploy.url")


class NotificationsConfig(_Strict):
    channel: str | None = None


class ArtifactsConfig(_Strict):
    dir: Path | None = None
    allowed_url_prefixes: list[str] = Field(default_factory=list)


class PollerConfig(_Strict):
    interval_seconds: float = Field(default=2.0, gt=0)
    lease_seconds: float = Field(default=60.0, gt=0)
    batch_size: int = Field(default=200, ge=1)
