"""Configuration: environment variables plus an optional TOML file (SPEC §3).

Settings are built by ``load_settings`` from ``__main__`` or a test fixture, never at import
time. Environment variables win over the TOML file; secrets (tokens, auth URLs, passwords)
are ``SecretStr`` so they never print.
"""

from __future__ import annotations

import ipaddress
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

PLACEHOLDER_SECRETS = {"changeme", "change-me", "changethis", "xoxb-your-token", "secret", "todo", "xxx"}
COMMANDS = ("push", "deploy", "sfp", "fd")
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,39}$")


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


def parse_duration(text: str) -> timedelta:
    """'90s', '15m', '24h', '7d', '1h30m' → timedelta."""
    match = re.fullmatch(r"\s*(?:(\d+)d)?\s*(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s)?\s*", text)
    if not match or not any(match.groups()):
        raise ValueError(f"not a duration: {text!r} (use e.g. 30m, 24h, 7d)")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


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
    action: str
    org_kind: str | None = None
    org: str | None = None
    package: str | None = None
    task_type: str | None = None
    approvers: list[str] = Field(default_factory=list)
    count: int = Field(default=1, ge=1, le=10)
    self_approval: bool = False
    expires: str = "24h"

    @field_validator("expires")
    @classmethod
    def _expires(cls, value: str) -> str:
        parse_duration(value)
        return value

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


class Settings(BaseSettings):
    """Everything the bot reads at start-up. Field names double as environment variables."""

    model_config = SettingsConfigDict(extra="forbid", case_sensitive=False, env_nested_delimiter=None)

    slack_bot_token: SecretStr | None = None
    slack_signing_secret: SecretStr | None = None
    slack_app_token: SecretStr | None = None
    slack_api_url: str = "https://slack.com/api/"
    database_url: str = "sqlite:///chatops.db"
    port: int = 3000

    orgs: dict[str, OrgConfig] = Field(default_factory=dict)
    sfp: SfpConfig | None = None
    sfp_token: SecretStr | None = None
    flexdeploy: FlexDeployConfig | None = None
    flexdeploy_user: SecretStr | None = None
    flexdeploy_password: SecretStr | None = None
    notifications: NotificationsConfig = Field(default_factory=NotificationsConfig)
    approval: list[ApprovalRule] = Field(default_factory=list)
    access: AccessConfig = Field(default_factory=AccessConfig)
    artifacts: ArtifactsConfig = Field(default_factory=ArtifactsConfig)
    poller: PollerConfig = Field(default_factory=PollerConfig)
    salesforce_api_version: str = "61.0"
    http_timeout_seconds: float = Field(default=60.0, gt=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls), file_secret_settings)

    @field_validator("slack_bot_token", "slack_signing_secret", "slack_app_token", "sfp_token", "flexdeploy_password")
    @classmethod
    def _no_placeholder(cls, value: SecretStr | None, info: Any) -> SecretStr | None:
        if value is not None and value.get_secret_value().strip().lower() in PLACEHOLDER_SECRETS:
            raise ValueError(f"{info.field_name.upper()} is a placeholder; set the real secret")
        return value

    @field_validator("salesforce_api_version")
    @classmethod
    def _salesforce_api_version(cls, value: str) -> str:
        # Before 30.0 checkDeployStatus has no done/status to read (the bot would poll forever),
        # and cancelDeploy does not exist.
        match = re.fullmatch(r"(\d{2,3})\.0", value.strip())
        if match is None or int(match.group(1)) < 30:
            raise ValueError(
                f"SALESFORCE_API_VERSION {value[:20]!r} is not supported: use a version of the form NN.0, "
                "30.0 or later (e.g. 61.0)"
            )
        return value.strip()

    @field_validator("slack_api_url")
    @classmethod
    def _slack_api_url(cls, value: str) -> str:
        check_service_url(value, what="SLACK_API_URL")
        return value if value.endswith("/") else value + "/"

    @model_validator(mode="after")
    def _orgs_complete(self) -> Settings:
        for alias, org in self.orgs.items():
            if not ALIAS_RE.match(alias):
                raise ValueError(f"org alias {alias!r} must be letters, digits, '-' or '_' (max 40)")
            env_url = os.environ.get(f"SF_AUTH_URL_{alias.upper().replace('-', '_')}")
            if env_url:
                org.auth_url = SecretStr(env_url)
            if (org.auth_url is None) == (org.jwt is None):
                raise ValueError(
                    f"orgs.{alias}: configure exactly one auth method: auth_url "
                    f"(or env SF_AUTH_URL_{alias.upper()}) or jwt = {{...}}"
                )
        if sum(1 for org in self.orgs.values() if org.packaging) > 1:
            raise ValueError("only one org may have packaging = true")
        if self.sfp is not None and self.sfp_token is None:
            raise ValueError("[sfp] is configured but SFP_TOKEN is not set")
        if self.flexdeploy is not None and (self.flexdeploy_user is None or self.flexdeploy_password is None):
            raise ValueError("[flexdeploy] is configured but FLEXDEPLOY_USER or FLEXDEPLOY_PASSWORD is not set")
        return self

    @property
    def slack_configured(self) -> bool:
        return self.slack_signing_secret is not None or self.slack_app_token is not None

    @property
    def packaging_org(self) -> str | None:
        return next((alias for alias, org in self.orgs.items() if org.packaging), None)

    def require_slack(self) -> None:
        """HTTP mode needs the bot token and signing secret; Socket Mode the app token."""
        if self.slack_bot_token is None:
            raise ValueError("SLACK_BOT_TOKEN is not set")
        if self.slack_signing_secret is None and self.slack_app_token is None:
            raise ValueError("set SLACK_SIGNING_SECRET (HTTP mode) or SLACK_APP_TOKEN (Socket Mode)")


def load_settings(config_path: Path | str | None = None, **overrides: Any) -> Settings:
    """Build settings from the environment and the TOML file (``--config`` or CHATOPS_CONFIG)."""
    path = config_path or os.environ.get("CHATOPS_CONFIG")
    if path is not None and not Path(path).is_file():
        raise ValueError(f"config file not found: {path}")

    class _FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=str(path) if path else None)

    return _FromFile(**overrides)
