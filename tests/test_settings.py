"""The configuration contract of SPEC §3: variable names, TOML layout, refusals that name the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from bot.settings import load_settings

AUTH_URL = "force://PlatformCLI::5Aep861abc@https://acme.my.salesforce.com"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "chatops.toml"
    path.write_text(text)
    return path


def test_defaults_and_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-1-real")
    monkeypatch.setenv("SLACK_SIGNING_SECRET", "abc123def456")
    monkeypatch.setenv("SLACK_API_URL", "http://127.0.0.1:9999/api")
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://u@db/x")
    monkeypatch.setenv("PORT", "8080")
    settings = load_settings()
    assert settings.slack_bot_token is not None and settings.slack_bot_token.get_secret_value() == "xoxb-1-real"
    assert settings.slack_api_url == "http://127.0.0.1:9999/api/"
    assert settings.database_url == "postgresql+psycopg://u@db/x" and settings.port == 8080
    assert "xoxb-1-real" not in repr(settings)


def test_toml_layout_with_env_auth_url_and_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SF_AUTH_URL_PKG", AUTH_URL)
    monkeypatch.setenv("SFP_TOKEN", "sfp-token-value")
    monkeypatch.setenv("FLEXDEPLOY_USER", "fd-user")
    monkeypatch.setenv("FLEXDEPLOY_PASSWORD", "fd-password")
    path = write(
        tmp_path,
        """
[orgs.pkg]
kind = "production"
packaging = true

[orgs.uat]
kind = "sandbox"
jwt = { login_url = "https://test.salesforce.com", client_id = "3MVG", username = "ci@acme.com", key_file = "k.pem" }

[sfp]
url = "https://sfp.acme.com"

[flexdeploy]
url = "https://fd.acme.com"

[notifications]
channel = "C0NOTIFY"

[[approval]]
action = "push"
org_kind = "production"
approvers = ["U1", "S2"]
count = 2
expires = "4h"

[access.push]
users = ["U1"]
channels = ["C1"]

[artifacts]
dir = "/srv/artifacts"
allowed_url_prefixes = ["https://ci.acme.com/"]
""",
    )
    settings = load_settings(path)
    assert settings.packaging_org == "pkg"
    assert settings.orgs["pkg"].auth_url is not None and settings.orgs["pkg"].auth_url.get_secret_value() == AUTH_URL
    assert settings.orgs["uat"].jwt is not None and settings.orgs["uat"].jwt.username == "ci@acme.com"
    assert settings.approval[0].count == 2 and settings.approval[0].expires_after.total_seconds() == 4 * 3600
    assert (
        settings.access.push is not None
        and settings.access.push.channels == ["C1"]
        and settings.notifications.channel == "C0NOTIFY"
    )


def test_chatops_config_variable_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATOPS_CONFIG", str(write(tmp_path, '[notifications]\nchannel = "C9"\n')))
    assert load_settings().notifications.channel == "C9"


@pytest.mark.parametrize(
    ("toml", "env", "fragment"),
    [
        ('[orgs.a]\nkind = "production"\n', {}, "configure exactly one auth method"),
        (
            f'[orgs.a]\nkind = "production"\nauth_url = "{AUTH_URL}"\n'
            'jwt = { client_id = "x", username = "u", key_file = "k" }\n',
            {},
            "exactly one auth method",
        ),
        ('[orgs.a]\nkind = "galaxy"\nauth_url = "x"\n', {}, "kind"),
        (
            '[orgs.a]\nkind = "sandbox"\njwt = { login_url = "http://login.example.com", client_id = "x", '
            'username = "u", key_file = "k" }\n',
            {},
            "https://",
        ),
        ('[sfp]\nurl = "https://sfp"\n', {}, "SFP_TOKEN is not set"),
        ('[flexdeploy]\nurl = "https://fd"\n', {"FLEXDEPLOY_USER": "u"}, "FLEXDEPLOY_PASSWORD is not set"),
        ("", {"SLACK_SIGNING_SECRET": "changeme"}, "SLACK_SIGNING_SECRET is a placeholder"),
        (
            '[orgs.a]\nkind = "sandbox"\nauth_url = "x"\npackaging = true\n[orgs.b]\nkind = "sandbox"\n'
            'auth_url = "y"\npackaging = true\n',
            {},
            "only one org may have packaging",
        ),
        ("[unknown]\nx = 1\n", {}, "unknown"),
    ],
)
def test_bad_configuration_is_refused_naming_the_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str, env: dict[str, str], fragment: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as caught:
        load_settings(write(tmp_path, toml))
    assert fragment in str(caught.value)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config file not found"):
        load_settings(tmp_path / "nope.toml")


@pytest.mark.parametrize("version", ["29.0", "8.0", "61", "61.5", "v61.0", "sixty"])
def test_salesforce_api_version_before_30_or_malformed_is_refused_at_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], version: str
) -> None:
    """Issue 13 item 3: before 30.0 checkDeployStatus has no done/status, so a deployment would be
    polled forever. The bot refuses to start, naming the setting and what it accepts."""
    from bot.cli import main

    monkeypatch.setenv("SALESFORCE_API_VERSION", version)
    assert main(["serve"]) == 2
    error = capsys.readouterr().err
    assert "SALESFORCE_API_VERSION" in error and "30.0 or later" in error and "NN.0" in error
    monkeypatch.delenv("SALESFORCE_API_VERSION")
    with pytest.raises(ValidationError, match=r"30\.0 or later"):
        load_settings(write(tmp_path, f'salesforce_api_version = "{version}"\n'))


def test_salesforce_api_version_30_and_later_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().salesforce_api_version == "61.0"
    for version in ("30.0", "44.0", "62.0", "100.0"):
        monkeypatch.setenv("SALESFORCE_API_VERSION", version)
        assert load_settings().salesforce_api_version == version
