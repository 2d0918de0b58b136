"""Configuration: environment variables plus an optional TOML file (SPEC §3).

Settings are built by ``load_settings`` from ``__main__`` or a test fixture, never at import
time. Environment variables win over the TOML file; secrets (tokens, auth URLs, passwords)
are ``SecretStr`` so they never print.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from bot.config_tables import (
    ALIAS_RE,
    APPROVAL_ACTIONS,
    COMMANDS,
    MINIMUM_ACTIONS,
    AccessConfig,
    AccessRule,
    ApprovalRule,
    ArtifactsConfig,
    FlexDeployConfig,
    JwtAuthConfig,
    NotificationsConfig,
    OrgConfig,
    PollerConfig,
    SfpConfig,
    check_service_url,
    is_loopback_host,
    mask_url_password,
)
from bot.errors import ConfigError

# The TOML tables live in bot/config_tables.py; callers build settings from this module alone.
__all__ = [
    "ALIAS_RE",
    "APPROVAL_ACTIONS",
    "COMMANDS",
    "MINIMUM_ACTIONS",
    "PLACEHOLDER_SECRETS",
    "SECRET_FIELDS",
    "AccessConfig",
    "AccessRule",
    "ApprovalRule",
    "ArtifactsConfig",
    "FlexDeployConfig",
    "JwtAuthConfig",
    "NotificationsConfig",
    "OrgConfig",
    "PollerConfig",
    "Settings",
    "SfpConfig",
    "check_service_url",
    "config_error_line",
    "is_loopback_host",
    "load_settings",
    "mask_url_password",
]

PLACEHOLDER_SECRETS = {"changeme", "change-me", "changethis", "xoxb-your-token", "secret", "todo", "xxx"}
SECRET_FIELDS = (
    "slack_bot_token",
    "slack_signing_secret",
    "slack_app_token",
    "sfp_token",
    "flexdeploy_user",
    "flexdeploy_password",
)


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

    @field_validator(*SECRET_FIELDS)
    @classmethod
    def _no_placeholder(cls, value: SecretStr | None, info: Any) -> SecretStr | None:
        if value is None:
            return value
        text = value.get_secret_value().strip()
        if not text:
            # An empty signing secret would be "configured" yet verify nothing: every request fails.
            raise ValueError(f"{info.field_name.upper()} is empty; set the real secret or leave it unset")
        if text.lower() in PLACEHOLDER_SECRETS:
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

    @model_validator(mode="after")
    def _approval_rules_against_orgs(self) -> Settings:
        """Checks that need ``[orgs]``: a rule naming an org that does not exist matches nothing."""
        for index, rule in enumerate(self.approval, start=1):
            where = f"[[approval]] #{index} (action = {rule.action!r})"
            if rule.org is not None and not rule.action.startswith("fd_") and rule.org not in self.orgs:
                allowed = ", ".join(sorted(self.orgs)) or "none configured"
                raise ValueError(f"{where}, key org = {rule.org[:40]!r}: not an alias under [orgs]; allowed: {allowed}")
            if rule.org is not None and rule.action == "push" and self.orgs[rule.org].packaging is False:
                raise ValueError(
                    f"{where}, key org = {rule.org!r}: pushes run in the packaging org; "
                    f"allowed: {self.packaging_org or 'an org with packaging = true'}"
                )
            if rule.self_approval and rule.waiver is None and rule.may_touch_minimum(self.orgs):
                raise ValueError(
                    f"{where}, key self_approval = true: lowers the built-in minimum (someone other than the "
                    'requester approves); allowed only with waiver = "<why>" in the same rule'
                )
        return self

    def __repr_args__(self) -> Any:
        # DATABASE_URL may carry a password (postgresql+psycopg://user:pw@host/db): never in a repr.
        for name, value in super().__repr_args__():
            yield name, (mask_url_password(value) if name == "database_url" and isinstance(value, str) else value)

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
    """Build settings from the environment and the TOML file (``--config`` or CHATOPS_CONFIG).

    Raises ConfigError with one line naming the file, table, key, bad value and allowed values:
    pydantic's own report prints each bad input, and for a model-level error that is the whole
    input, secrets included.
    """
    path = config_path or os.environ.get("CHATOPS_CONFIG")
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")

    class _FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=str(path) if path else None)

    try:
        return _FromFile(**overrides)
    except ValidationError as exc:
        raise ConfigError(config_error_line(exc, path=path)) from None


# Where each TOML table's keys are defined, for "allowed: …" on an unknown key.
_TABLE_MODELS: dict[str, type[BaseModel]] = {
    "approval": ApprovalRule,
    "orgs": OrgConfig,
    "sfp": SfpConfig,
    "flexdeploy": FlexDeployConfig,
    "notifications": NotificationsConfig,
    "artifacts": ArtifactsConfig,
    "poller": PollerConfig,
}


def config_error_line(exc: ValidationError, *, path: Path | str | None) -> str:
    """The first problem of a ValidationError as one line that never shows a secret's value."""
    errors = exc.errors(include_url=False)
    first = _describe(errors[0]) if errors else str(exc.title)
    origin = f"configuration error in {Path(path).name}" if path else "configuration error"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return " ".join(f"{origin}: {first}{more}".split())


def _describe(error: Any) -> str:
    loc = tuple(error.get("loc") or ())
    kind = error.get("type", "")
    problem = str(error.get("msg", "")).removeprefix("Value error, ")
    if not loc:  # a model-level check: its message names table and key itself
        return problem
    table, key, model = _where(loc)
    if kind == "extra_forbidden":
        allowed = ", ".join(model.model_fields) if model is not None else ""
        name = f"[{table}.{key}]" if table == "access" and len(loc) == 2 else (f"{table}, key {key}" if table else key)
        if table == "access" and len(loc) == 2:
            allowed = "[access] admins, " + ", ".join(f"[access.{command}]" for command in COMMANDS)
            return f"{name}: not a command; allowed: {allowed}"
        if model is Settings:
            allowed = "[orgs.<alias>], [[approval]], [access], " + ", ".join(f"[{table}]" for table in _TABLE_MODELS)
            allowed = allowed.replace("[approval], ", "").replace("[orgs], ", "")
        return f"{name}: unknown {'table or key' if model is Settings else 'key'}; allowed: {allowed}"
    if key == "(table)":  # a check across the table's keys: its message names them
        return f"{table}: {problem}"
    shown = _shown_value(loc, error.get("input"))
    name = f"{table}, key {key}" if table else key
    if problem.startswith(f"{key} "):  # our own check of a secret already names the variable
        return problem
    if kind == "literal_error":
        expected = (error.get("ctx") or {}).get("expected", "")
        return f"{name} = {shown}: not allowed; allowed: {expected}"
    return f"{name} = {shown}: {problem}"


def _where(loc: tuple[Any, ...]) -> tuple[str, str, type[BaseModel] | None]:
    """(table as written in TOML or "" for a top-level setting, key, the model defining that table)."""
    head = str(loc[0])
    if head == "approval" and len(loc) >= 2:
        return f"[[approval]] #{int(loc[1]) + 1}", ".".join(map(str, loc[2:])) or "(table)", ApprovalRule
    if head == "orgs" and len(loc) >= 2:
        model: type[BaseModel] = JwtAuthConfig if "jwt" in loc[2:-1] else OrgConfig
        return f"[orgs.{loc[1]}]", ".".join(map(str, loc[2:])) or "(table)", model
    if head == "access":
        if len(loc) == 2:
            return "access", str(loc[1]), AccessConfig
        return f"[access.{loc[1]}]", ".".join(map(str, loc[2:])), AccessRule
    if head in _TABLE_MODELS and len(loc) >= 2:
        return f"[{head}]", ".".join(map(str, loc[1:])), _TABLE_MODELS[head]
    if head in Settings.model_fields and head not in _TABLE_MODELS:
        return "", head.upper(), Settings  # an environment variable (or a top-level key)
    return "", f"[{head}]" if len(loc) == 1 else ".".join(map(str, loc)), Settings


def _shown_value(loc: tuple[Any, ...], value: Any) -> str:
    """The bad value as the user wrote it, unless it is (or may contain) a secret."""
    if any(str(part) in SECRET_FIELDS or str(part) == "auth_url" for part in loc):
        return "(secret, not shown)"
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    if isinstance(value, str):
        text = mask_url_password(value)
        return json.dumps(text if len(text) <= 60 else text[:57] + "…", ensure_ascii=False)
    if isinstance(value, list) and all(isinstance(item, str | int | float) for item in value) and len(value) <= 5:
        return json.dumps(value, ensure_ascii=False)[:80]
    return "(a table)" if isinstance(value, dict) else "(a value of the wrong type)"
