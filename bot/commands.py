"""Slash-command grammars: text in, typed request out, ``UsageError`` (with usage) on anything off.

Pure functions with no Slack or database types, so handlers stay thin and tests are direct.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from bot.clients.sfp import OPERATION_ID_RE
from bot.errors import UsageError

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
REF_RE = re.compile(r"^(?P<letter>[A-Za-z]?)(?P<number>\d{1,10})$")
ORG_SCOPES = ("all", "production", "sandbox")


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


@dataclass(frozen=True)
class Help:
    pass


PushCommand = PushCreate | PushRetry | PushRef | PushList | Help


def tokenize(text: str, *, usage: str) -> list[str]:
    try:
        return shlex.split(
            text.replace("\u201c", '"')
            .replace("\u201d", '"')
            .replace("\u2018", "'")
            .replace("\u2019", "'")
            .replace("\u2014", "--")
        )
    except ValueError as exc:
        raise UsageError(f"I couldn't read that: {exc}.", usage=usage) from None


def split_options(
    tokens: list[str], *, flags: set[str], valued: set[str], multiword: set[str], usage: str
) -> tuple[list[str], dict[str, str | bool]]:
    """Positional words up to the first option, then ``--flag`` / ``--opt value`` pairs.

    ``multiword`` options take every word up to the next option (``--at tomorrow 09:00``).
    """
    positional: list[str] = []
    options: dict[str, str | bool] = {}
    index = 0
    while index < len(tokens) and not tokens[index].startswith("--"):
        positional.append(tokens[index])
        index += 1
    while index < len(tokens):
        token = tokens[index]
        name, _, inline = token.partition("=")
        if name in options:
            raise UsageError(f"`{name}` is given twice.", usage=usage)
        if name in flags and not inline:
            options[name] = True
            index += 1
            continue
        if name not in valued:
            known = ", ".join(f"`{option}`" for option in sorted(flags | valued))
            raise UsageError(f"Unknown option `{name[:40]}`. Options here: {known}.", usage=usage)
        words = [inline] if inline else []
        index += 1
        while index < len(tokens) and not tokens[index].startswith("--") and (name in multiword or not words):
            words.append(tokens[index])
            index += 1
        if not words:
            raise UsageError(f"`{name}` needs a value.", usage=usage)
        options[name] = " ".join(words)
    return positional, options


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


@dataclass(frozen=True)
class RefKind:
    """What one command accepts as a reference (SPEC §15 "Refs")."""

    letter: str  # the bot's short refs: P12, D3, S4, F2
    wrong_letter: str  # "`X12` is not …" when another command's short ref is given
    id_prefix: str | None = None  # Salesforce key prefix of the record the operation follows
    id_hint: str = ""  # how that id is named in hints
    operation_ids: bool = False  # sfp operationIds

    def salesforce_id(self, word: str) -> bool:
        # Key prefixes are case-sensitive; the id is 15 (case-sensitive) or 18 characters.
        return (
            bool(self.id_prefix)
            and re.fullmatch(rf"{self.id_prefix}[a-zA-Z0-9]{{12}}(?:[a-zA-Z0-9]{{3}})?", word) is not None
        )

    @property
    def example(self) -> str:
        return f"`{self.letter}12`" + (f" or {self.id_hint}" if self.id_hint else "")


PUSH_REFS = RefKind(
    letter="P", wrong_letter="a push", id_prefix="0DV", id_hint="the push request id (`0DV…`, 15 or 18 characters)"
)
DEPLOY_REFS = RefKind(
    letter="D",
    wrong_letter="a deployment reference",
    id_prefix="0Af",
    id_hint="the deployment id (`0Af…`, 15 or 18 characters)",
)
SFP_REFS = RefKind(letter="S", wrong_letter="an sfp task", id_hint="the task's operationId", operation_ids=True)
FD_REFS = RefKind(letter="F", wrong_letter="a FlexDeploy request")


def parse_ref(words: list[str], *, usage: str, action: str, refs: RefKind = PUSH_REFS) -> str:
    """The bot's short ref (``P12``, or ``12``), or the id the external system gave the operation.

    A short ref comes back as ``P12``; an id comes back exactly as typed (Salesforce ids are
    case-sensitive) and only once its shape is checked, so nothing else ever reaches a lookup.
    """
    if len(words) != 1:
        raise UsageError(f"`{action}` takes one reference, such as {refs.example}.", usage=usage)
    word = words[0]
    short = REF_RE.match(word)
    if short:
        letter = short.group("letter").upper()
        if letter and letter != refs.letter:
            raise UsageError(
                f"`{word}` is not {refs.wrong_letter}; here references look like {refs.example}.", usage=usage
            )
        if not letter and refs.operation_ids:
            return word  # bare digits: the task S<n> or an operationId made of digits; the service tries both
        return f"{refs.letter}{int(short.group('number'))}"
    if refs.salesforce_id(word) or (refs.operation_ids and OPERATION_ID_RE.match(word)):
        return word
    raise UsageError(f"`{word[:30]}` is not a reference (they look like {refs.example}).", usage=usage)


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
