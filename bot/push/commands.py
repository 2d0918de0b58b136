"""Slash-command grammars: text in, typed request out, ``UsageError`` (with usage) on anything off.

Pure functions with no Slack or database types, so handlers stay thin and tests are direct.
"""

from __future__ import annotations

import re

from bot.core.grammar import Help, parse_ref, split_options, tokenize
from bot.errors import UsageError
from bot.push.requests import OrgSelection, PushCommand, PushCreate, PushList, PushRef, PushRetry, VersionSpec

__all__ = [
    "PUSH_USAGE",
    "OrgSelection",
    "PushCommand",
    "PushCreate",
    "PushList",
    "PushRef",
    "PushRetry",
    "VersionSpec",
    "parse_org_selection",
    "parse_push",
    "parse_version_spec",
]

PUSH_USAGE = """*`/push` — push upgrades to subscriber orgs*
• `/push create <version> [--orgs all|production|sandbox|<orgId,…>] [--at <when>] [--dry-run]`
   `<version>` is a `04t…` id or `<Package Name>@<major>.<minor>.<patch>`
• `/push retry <ref> [--at <when>] [--dry-run]` — push again to the orgs that failed and can be fixed by retrying
• `/push status <ref>` · `/push list` · `/push cancel <ref>` (only while Created or Pending)
• `--at` takes `18:30`, `tomorrow 09:00`, `2026-12-01 18:30`, `+2h` (your Slack time zone)"""

VERSION_ID_RE = re.compile(r"^04t[a-zA-Z0-9]{12}(?:[a-zA-Z0-9]{3})?$")
ORG_ID_RE = re.compile(r"^00D[a-zA-Z0-9]{12}(?:[a-zA-Z0-9]{3})?$")
PACKAGE_VERSION_RE = re.compile(r"^(?P<name>[^@]{1,80})@(?P<major>\d{1,4})\.(?P<minor>\d{1,4})\.(?P<patch>\d{1,4})$")
PACKAGE_NAME_RE = re.compile(r"^[\w .&'()+,:-]{1,80}$")
ORG_SCOPES = ("all", "production", "sandbox")


def parse_version_spec(text: str) -> VersionSpec:
    text = " ".join(text.split())
    if not text:
        raise UsageError("Which version? Give a `04t…` id or `<Package Name>@<x.y.z>`.", usage=PUSH_USAGE)
    if text.startswith("04t"):
        if not VERSION_ID_RE.match(text):
            raise UsageError(
                f"`{text[:40]}` is not a package version id (15 or 18 characters starting `04t`).", usage=PUSH_USAGE
            )
        return VersionSpec(version_id=text)
    match = PACKAGE_VERSION_RE.match(text)
    if not match:
        raise UsageError(
            f"`{text[:80]}` is not a version. Use a `04t…` id or `<Package Name>@<major>.<minor>.<patch>`"
            " such as `Acme Billing@1.4.0`.",
            usage=PUSH_USAGE,
        )
    name = match.group("name").strip()
    if not PACKAGE_NAME_RE.match(name):
        raise UsageError(
            f"`{name[:80]}` is not a package name I can look up (letters, digits, spaces and . & ' ( ) + , : - only).",
            usage=PUSH_USAGE,
        )
    return VersionSpec(
        package_name=name, number=(int(match.group("major")), int(match.group("minor")), int(match.group("patch")))
    )


def parse_org_selection(text: str) -> OrgSelection:
    value = text.strip()
    if value.lower() in ORG_SCOPES:
        return OrgSelection(scope=value.lower())
    ids = [part.strip() for part in value.replace(" ", ",").split(",") if part.strip()]
    bad = [org_id for org_id in ids if not ORG_ID_RE.match(org_id)]
    if bad or not ids:
        shown = ", ".join(f"`{org_id[:24]}`" for org_id in bad[:5]) or "`(empty)`"
        raise UsageError(
            f"`--orgs` takes all, production, sandbox or org ids (15/18 characters starting `00D`); "
            f"not valid: {shown}.",
            usage=PUSH_USAGE,
        )
    if len(ids) > 50_000:
        raise UsageError("`--orgs` lists more than 50,000 org ids.", usage=PUSH_USAGE)
    unique = tuple(dict.fromkeys(org_id[:15] for org_id in ids))
    return OrgSelection(scope="ids", org_ids=unique)


def parse_push(text: str) -> PushCommand:
    tokens = tokenize(text, usage=PUSH_USAGE)
    if not tokens or tokens[0].lower() in {"help", "-h", "--help"}:
        return Help()
    sub, rest = tokens[0].lower(), tokens[1:]
    if sub == "create":
        words, options = split_options(
            rest, flags={"--dry-run"}, valued={"--orgs", "--at"}, multiword={"--at"}, usage=PUSH_USAGE
        )
        return PushCreate(
            version=parse_version_spec(" ".join(words)),
            orgs=parse_org_selection(str(options["--orgs"])) if "--orgs" in options else OrgSelection(),
            at=str(options["--at"]) if "--at" in options else None,
            dry_run=bool(options.get("--dry-run", False)),
        )
    if sub == "retry":
        words, options = split_options(rest, flags={"--dry-run"}, valued={"--at"}, multiword={"--at"}, usage=PUSH_USAGE)
        return PushRetry(
            ref=parse_ref(words, usage=PUSH_USAGE, action="retry"),
            at=str(options["--at"]) if "--at" in options else None,
            dry_run=bool(options.get("--dry-run", False)),
        )
    if sub in {"status", "cancel"}:
        words, _ = split_options(rest, flags=set(), valued=set(), multiword=set(), usage=PUSH_USAGE)
        return PushRef(action=sub, ref=parse_ref(words, usage=PUSH_USAGE, action=sub))
    if sub == "list":
        if rest:
            raise UsageError("`list` takes no arguments.", usage=PUSH_USAGE)
        return PushList()
    raise UsageError(f"Unknown subcommand `{sub[:30]}`.", usage=PUSH_USAGE)
