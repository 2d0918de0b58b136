"""The /push grammar: what users type, what they get back when it is wrong."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from bot.core.grammar import Help
from bot.core.when import parse_when
from bot.deploy.commands import DeployQuick, DeployRef, parse_deploy
from bot.errors import UsageError
from bot.flexdeploy.commands import parse_fd
from bot.push.commands import PushCreate, PushList, PushRef, PushRetry, parse_push
from bot.sfp.commands import SfpRef, parse_sfp

NOW = datetime(2026, 11, 23, 15, 0, tzinfo=UTC)


def test_create_with_spaces_in_package_name_and_all_options() -> None:
    parsed = parse_push("create Acme Billing@1.4.0 --orgs production --at tomorrow 09:00 --dry-run")
    assert isinstance(parsed, PushCreate)
    assert parsed.version.package_name == "Acme Billing" and parsed.version.number == (1, 4, 0)
    assert parsed.orgs.scope == "production" and parsed.at == "tomorrow 09:00" and parsed.dry_run


def test_create_with_version_id_and_org_ids_dedupes_18_to_15() -> None:
    parsed = parse_push("create 04t000000000001AAA --orgs 00D000000000001AAA,00D000000000001,00D000000000002")
    assert isinstance(parsed, PushCreate)
    assert parsed.version.version_id == "04t000000000001AAA"
    assert parsed.orgs.org_ids == ("00D000000000001", "00D000000000002")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("frobnicate", "Unknown subcommand `frobnicate`"),
        ("create Acme Billing@1.4", "is not a version"),
        ("create 04tSHORT", "is not a package version id"),
        ("create Acme@1.0.0 --orgs 00Dnotanid", "not valid: `00Dnotanid`"),
        ("create Acme@1.0.0 --orgs", "`--orgs` needs a value"),
        ("create Acme@1.0.0 --colour blue", "Unknown option `--colour`"),
        ("create Acme@1.0.0 --dry-run --dry-run", "given twice"),
        ('create "Acme\'); DROP@1.0.0"', "not a package name"),
        ("cancel", "takes one reference"),
        ("status P1 P2", "takes one reference"),
        ("cancel robert'); --", "I couldn't read that"),
        ("list everything", "takes no arguments"),
    ],
)
def test_bad_input_gets_a_specific_message_with_usage(text: str, fragment: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_push(text)
    assert fragment in caught.value.message
    assert caught.value.usage and "/push create" in caught.value.usage


def test_other_subcommands() -> None:
    assert isinstance(parse_push(""), Help)
    assert isinstance(parse_push("list"), PushList)
    assert parse_push("status p7") == PushRef(action="status", ref="P7")
    retry = parse_push("retry P3 --at +1h")
    assert isinstance(retry, PushRetry) and retry.ref == "P3" and retry.at == "+1h"


def test_when_uses_the_requesters_time_zone() -> None:
    # 09:00 in New York on 24 Nov is 14:00 UTC.
    assert parse_when("tomorrow 09:00", tz_name="America/New_York", now=NOW) == datetime(
        2026, 11, 24, 14, 0, tzinfo=UTC
    )
    assert parse_when("2026-12-01 18:30", tz_name="Europe/Berlin", now=NOW) == datetime(2026, 12, 1, 17, 30, tzinfo=UTC)
    assert parse_when("+2h", tz_name=None, now=NOW) == datetime(2026, 11, 23, 17, 0, tzinfo=UTC)
    # A clock time already past today means tomorrow.
    assert parse_when("09:00", tz_name="UTC", now=NOW) == datetime(2026, 11, 24, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("2020-01-01 10:00", "is in the past"),
        ("yesterday", "can't read"),
        ("25:00", "not a valid time of day"),
        ("+400d", "more than 90 days ahead"),
    ],
)
def test_when_refuses_past_and_nonsense(text: str, fragment: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_when(text, tz_name="UTC", now=NOW)
    assert fragment in caught.value.message


# -- refs people paste (SPEC §15 "Refs") -------------------------------------------------------------


def test_finding_5_salesforce_ids_of_either_length_are_accepted_as_push_refs() -> None:
    assert parse_push("status 0DV5f0000000001") == PushRef(action="status", ref="0DV5f0000000001")
    assert parse_push("cancel 0DV5f0000000001AAA") == PushRef(action="cancel", ref="0DV5f0000000001AAA")
    retry = parse_push("retry 0DV5f0000000001AAA --dry-run")
    assert isinstance(retry, PushRetry) and retry.ref == "0DV5f0000000001AAA"
    assert parse_push("status p07") == PushRef(action="status", ref="P7")


@pytest.mark.parametrize(
    ("parse", "text", "hint", "not_hint"),
    [
        (parse_push, "status 0DV5f00000000", "`P12`", "`D12`"),  # too short for an id
        (parse_push, "status 0Af5f0000000001AAA", "`P12`", "`D12`"),  # a deployment id under /push
        (parse_push, "status 0DV5f0000000001AA$", "`P12`", "`S12`"),
        (parse_deploy, "status 0DV5f0000000001AAA", "`D12`", "`P12`"),
        (parse_deploy, "quick 0Af5f000000", "`D12`", "`P12`"),
        (parse_sfp, "status bad!id", "`S12`", "`P12`"),
        (parse_sfp, "result", "`S12`", "`P12`"),
        (parse_fd, "cancel 0DV5f0000000001AAA", "`F12`", "`P12`"),
    ],
)
def test_finding_5_usage_hint_shows_the_prefix_of_the_command_at_hand(
    parse: Callable[[str], object], text: str, hint: str, not_hint: str
) -> None:
    with pytest.raises(UsageError) as caught:
        parse(text)
    assert hint in caught.value.message and not_hint not in caught.value.message


def test_finding_5_deploy_and_sfp_refs_take_their_ids() -> None:
    assert parse_deploy("status 0Af5f0000000001") == DeployRef(action="status", ref="0Af5f0000000001")
    assert parse_deploy("quick 0Af5f0000000001AAA") == DeployQuick(ref="0Af5f0000000001AAA")
    assert parse_deploy("cancel d12") == DeployRef(action="cancel", ref="D12")
    assert parse_sfp("status 1000000001") == SfpRef(action="status", ref="1000000001")
    assert parse_sfp("runs 7f3c1d2e-9b4a-4c1e-8f00-12ab34cd56ef") == SfpRef(
        action="runs", ref="7f3c1d2e-9b4a-4c1e-8f00-12ab34cd56ef"
    )
    assert parse_sfp("status s4") == SfpRef(action="status", ref="S4")
