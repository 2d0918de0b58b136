"""The configuration contract of SPEC §3: variable names, TOML layout, refusals that name the problem."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bot.cli import main
from bot.errors import ConfigError
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
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, toml))
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


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
    with pytest.raises(ConfigError, match=r"30\.0 or later"):
        load_settings(write(tmp_path, f'salesforce_api_version = "{version}"\n'))


def test_salesforce_api_version_30_and_later_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().salesforce_api_version == "61.0"
    for version in ("30.0", "44.0", "62.0", "100.0"):
        monkeypatch.setenv("SALESFORCE_API_VERSION", version)
        assert load_settings().salesforce_api_version == version


# -- issue 12: a bad configuration stops the bot with one line, and never shows a secret ----------

BOT_TOKEN = "xoxb-111-222-abc"
SIGNING_SECRET = "8f14e45fceea167a5a36dedd4bea2543"
ORGS = f"""
[orgs.pkg]
kind = "production"
packaging = true
auth_url = "{AUTH_URL}"

[orgs.prod]
kind = "production"
auth_url = "{AUTH_URL}"

[orgs.uat]
kind = "sandbox"
auth_url = "{AUTH_URL}"
"""


def run_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], toml: str
) -> tuple[int, str]:
    """``python -m bot --config FILE audit`` in process: (exit code, everything it printed)."""
    monkeypatch.setenv("SLACK_BOT_TOKEN", BOT_TOKEN)
    monkeypatch.setenv("SLACK_SIGNING_SECRET", SIGNING_SECRET)
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'audit.db'}")
    code = main(["--config", str(write(tmp_path, toml)), "audit", "--format", "json"])
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def assert_one_line_error(code: int, printed: str, *fragments: str) -> None:
    assert code == 2, printed
    lines = printed.strip().splitlines()
    assert len(lines) == 1, printed
    assert lines[0].startswith("configuration error in chatops.toml: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert BOT_TOKEN[5:] not in printed and SIGNING_SECRET[:8] not in printed


@pytest.mark.parametrize(
    ("rule", "fragments"),
    [
        (
            'action = "deploy"\norg_kind = "Production"\napprovers = ["U0BOB"]',
            ["[[approval]] #1", 'org_kind = "Production"', "'production', 'sandbox' or 'scratch'"],
        ),
        (
            'action = "deploy"\norg = "prd"\napprovers = ["U0BOB"]',
            ["[[approval]] #1", "org = 'prd'", "not an alias under [orgs]", "allowed: pkg, prod, uat"],
        ),
        (
            'action = "deploys"\napprovers = ["U0BOB"]',
            ['action = "deploys"', "'quick_deploy'", "'fd_delete'"],
        ),
        ('action = "deploy"\napprovers = ["bob"]', ["approvers", "'bob'", "U…, W…", "S…"]),
        ('action = "deploy"\napprover = ["U0BOB"]', ["[[approval]] #1, key approver", "unknown key", "approvers"]),
        ('action = "fd_delete"\ncount = 0', ["count = 0", 'waiver = "<why>"']),
        ('action = "fd_delete"\nself_approval = true', ["self_approval = true", 'waiver = "<why>"']),
        ('action = "fd_delete"\nwaiver = "no reason"', ["waiver given but the rule lowers nothing"]),
        ('action = "fd_delete"\norg = "prod"', ["FlexDeploy project id"]),
        ('action = "sfp"\norg_kind = "production"', ["org_kind never matches action 'sfp'", "task_type"]),
    ],
)
def test_finding_1_approval_rule_values_are_checked_at_startup(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    rule: str,
    fragments: list[str],
) -> None:
    """A typo in a rule used to switch approvals off silently; now the bot does not start."""
    code, printed = run_cli(tmp_path, monkeypatch, capsys, f"{ORGS}\n[[approval]]\n{rule}\n")
    assert_one_line_error(code, printed, *fragments)


def test_finding_7_access_table_for_a_name_that_is_not_a_command_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, printed = run_cli(tmp_path, monkeypatch, capsys, '[access.deploys]\nusers = ["U0ALICE"]\n')
    assert_one_line_error(
        code, printed, "[access.deploys]", "not a command", "[access.push], [access.deploy], [access.sfp], [access.fd]"
    )


def test_finding_9a_configuration_errors_never_print_secret_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A check across the whole configuration used to print the whole input, secrets included."""
    second = '[orgs.pkg2]\nkind = "sandbox"\npackaging = true\nauth_url = "force://a:b:refresh-SECRET@https://x.my.salesforce.com"\n'
    code, printed = run_cli(tmp_path, monkeypatch, capsys, ORGS + second)
    assert_one_line_error(code, printed, "only one org may have packaging = true")
    assert "refresh-SECRET" not in printed and "5Aep861abc" not in printed


def test_finding_9a_a_bad_secret_is_named_but_not_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SFP_TOKEN", "  ")
    code, printed = run_cli(tmp_path, monkeypatch, capsys, '[sfp]\nurl = "https://sfp.acme.com"\n')
    assert_one_line_error(code, printed, "SFP_TOKEN is empty")


def test_finding_9b_repr_of_settings_masks_the_database_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://chatops:Db-Pa55word@db.internal:5432/chatops")
    settings = load_settings()
    assert settings.database_url.endswith("chatops:Db-Pa55word@db.internal:5432/chatops")  # still usable
    for shown in (repr(settings), str(settings)):
        assert "Db-Pa55word" not in shown and "chatops:***@db.internal" in shown


@pytest.mark.parametrize(
    "variable",
    [
        "SLACK_SIGNING_SECRET",
        "SLACK_BOT_TOKEN",
        "SLACK_APP_TOKEN",
        "SFP_TOKEN",
        "FLEXDEPLOY_USER",
        "FLEXDEPLOY_PASSWORD",
    ],
)
@pytest.mark.parametrize("value", ["", "   "])
def test_finding_10_empty_secrets_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    assert main(["migrate"]) == 2
    printed = capsys.readouterr()
    assert printed.out == ""
    assert printed.err.strip() == f"configuration error: {variable} is empty; set the real secret or leave it unset"


def readme_approvals_example() -> str:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Approvals and access", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```toml\n(.*?)```", section, re.S)
    assert found is not None, "the Approvals and access section has no TOML example"
    return found.group(1)


def test_readme_approvals_example_is_a_valid_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example users copy must load: every rule value in it passes the start-up checks."""
    for alias in ("PKG", "PROD", "UAT"):
        monkeypatch.setenv(f"SF_AUTH_URL_{alias}", AUTH_URL)
    monkeypatch.setenv("FLEXDEPLOY_USER", "fd-user")
    monkeypatch.setenv("FLEXDEPLOY_PASSWORD", "fd-password-value")
    monkeypatch.setenv("SFP_TOKEN", "sfp-token-value")
    settings = load_settings(write(tmp_path, readme_approvals_example()))
    assert {rule.action for rule in settings.approval} >= {"push", "deploy", "quick_deploy", "fd_delete"}
    assert any(rule.waiver for rule in settings.approval)
