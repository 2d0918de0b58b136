"""The ``/deploy`` grammar: text in, typed request out, ``UsageError`` (with usage) on anything off.

Pure functions with no Slack or database types. Org and artifact are only checked for shape
here; whether they exist (and the production rules) is the deploy service's business.
"""

from __future__ import annotations

import re

from bot.clients.salesforce.metadata import TEST_LEVELS
from bot.core.grammar import DEPLOY_REFS, parse_ref, tokenize
from bot.core.grammar import split_options as _split
from bot.deploy.requests import (
    DeployCommand,
    DeployFlags,
    DeployHelp,
    DeployList,
    DeployOrgs,
    DeployQuick,
    DeployRef,
    DeployStart,
)
from bot.errors import UsageError
from bot.settings import ALIAS_RE

# The parsed requests live in bot.deploy.requests (the service takes them without this module's usage text).
__all__ = [
    "DEPLOY_USAGE",
    "DeployCommand",
    "DeployFlags",
    "DeployHelp",
    "DeployList",
    "DeployOrgs",
    "DeployQuick",
    "DeployRef",
    "DeployStart",
    "parse_deploy",
]

DEPLOY_USAGE = """*`/deploy` — deploy metadata to an org (Metadata API)*
• `/deploy start <org> <artifact> [options]` — deploy
• `/deploy validate <org> <artifact> [options]` — check only, nothing is saved
   `<artifact>`: a `.zip` or a folder (with `package.xml`) in the artifacts directory,
   or an https URL under an allowed prefix
• `/deploy quick <ref> [--at <when>]` — quick-deploy a validation that ran tests (within 10 days)
• `/deploy status <ref>` · `/deploy cancel <ref>` · `/deploy list` · `/deploy orgs`
Options (Metadata API `DeployOptions`):
   `--test-level NoTestRun|RunSpecifiedTests|RunLocalTests|RunAllTestsInOrg`
   `--tests A,B` (implies RunSpecifiedTests) · `--ignore-warnings`
   `--rollback-on-error` / `--no-rollback-on-error` · `--purge-on-delete` · `--allow-missing-files`
   `--auto-update-package` · `--single-package` · `--perform-retrieve`
   `--at <when>`: `18:30`, `tomorrow 09:00`, `2026-12-01 18:30`, `+2h` (your Slack time zone)
Production orgs: rollbackOnError always on; never NoTestRun, purge-on-delete, allow-missing-files,
auto-update-package."""

# An Apex class, optionally namespaced (ns__Class) and optionally one method (Class.method).
TEST_NAME_RE = re.compile(
    r"^(?:[A-Za-z][A-Za-z0-9]{0,14}__)?[A-Za-z][A-Za-z0-9_]{0,39}(?:\.[A-Za-z][A-Za-z0-9_]{0,39})?$"
)
MAX_TESTS = 200
FLAGS = {
    "--ignore-warnings",
    "--rollback-on-error",
    "--no-rollback-on-error",
    "--purge-on-delete",
    "--allow-missing-files",
    "--auto-update-package",
    "--single-package",
    "--perform-retrieve",
}
VALUED = {"--test-level", "--tests", "--at"}


def parse_deploy_ref(words: list[str], *, action: str) -> str:
    return parse_ref(words, usage=DEPLOY_USAGE, action=action, refs=DEPLOY_REFS)


def parse_test_level(text: str) -> str:
    for level in TEST_LEVELS:
        if text.strip().lower() == level.lower():
            return level
    raise UsageError(
        f"`{text[:40]}` is not a test level. Use one of: {', '.join(f'`{level}`' for level in TEST_LEVELS)}.",
        usage=DEPLOY_USAGE,
    )


def parse_tests(text: str) -> tuple[str, ...]:
    names = [name.strip() for name in text.replace(" ", ",").split(",") if name.strip()]
    if not names:
        raise UsageError(
            "`--tests` needs Apex test class names, such as `--tests InvoiceTest,TaxTest`.", usage=DEPLOY_USAGE
        )
    bad = [name for name in names if not TEST_NAME_RE.match(name)]
    if bad:
        shown = ", ".join(f"`{name[:60]}`" for name in bad[:5])
        raise UsageError(
            f"Not an Apex test class name: {shown} "
            "(letters, digits and `_`, optionally `ns__Class` or `Class.method`).",
            usage=DEPLOY_USAGE,
        )
    if len(names) > MAX_TESTS:
        raise UsageError(f"`--tests` lists {len(names)} classes; at most {MAX_TESTS}.", usage=DEPLOY_USAGE)
    return tuple(dict.fromkeys(names))


def parse_flags(options: dict[str, str | bool]) -> DeployFlags:
    if "--rollback-on-error" in options and "--no-rollback-on-error" in options:
        raise UsageError("Give `--rollback-on-error` or `--no-rollback-on-error`, not both.", usage=DEPLOY_USAGE)
    level = parse_test_level(str(options["--test-level"])) if "--test-level" in options else None
    tests = parse_tests(str(options["--tests"])) if "--tests" in options else ()
    if tests and level is None:
        level = "RunSpecifiedTests"  # --tests implies RunSpecifiedTests
    if tests and level != "RunSpecifiedTests":
        raise UsageError(
            f"`--tests` only goes with `--test-level RunSpecifiedTests` (you gave `{level}`).", usage=DEPLOY_USAGE
        )
    if level == "RunSpecifiedTests" and not tests:
        raise UsageError("`--test-level RunSpecifiedTests` needs `--tests A,B`.", usage=DEPLOY_USAGE)
    rollback = None
    if "--rollback-on-error" in options:
        rollback = True
    elif "--no-rollback-on-error" in options:
        rollback = False
    return DeployFlags(
        test_level=level,
        tests=tests,
        ignore_warnings="--ignore-warnings" in options,
        rollback_on_error=rollback,
        purge_on_delete="--purge-on-delete" in options,
        allow_missing_files="--allow-missing-files" in options,
        auto_update_package="--auto-update-package" in options,
        single_package=True if "--single-package" in options else None,
        perform_retrieve="--perform-retrieve" in options,
    )


def parse_deploy(text: str) -> DeployCommand:
    tokens = tokenize(text, usage=DEPLOY_USAGE)
    if not tokens or tokens[0].lower() in {"help", "-h", "--help"}:
        return DeployHelp()
    sub, rest = tokens[0].lower(), tokens[1:]
    if sub in {"start", "validate"}:
        words, options = _split(rest, flags=FLAGS, valued=VALUED, multiword={"--at", "--tests"}, usage=DEPLOY_USAGE)
        if len(words) != 2:
            raise UsageError(
                f"`{sub}` takes an org and an artifact: `/deploy {sub} <org> <artifact> [options]`.",
                usage=DEPLOY_USAGE,
            )
        org, artifact = words
        if not ALIAS_RE.match(org):
            raise UsageError(f"`{org[:40]}` is not an org alias (see `/deploy orgs`).", usage=DEPLOY_USAGE)
        if len(artifact) > 500:
            raise UsageError("That artifact name is too long (500 characters at most).", usage=DEPLOY_USAGE)
        return DeployStart(
            check_only=sub == "validate",
            org=org,
            artifact=artifact,
            flags=parse_flags(options),
            at=str(options["--at"]) if "--at" in options else None,
        )
    if sub == "quick":
        words, options = _split(rest, flags=set(), valued={"--at"}, multiword={"--at"}, usage=DEPLOY_USAGE)
        return DeployQuick(
            ref=parse_deploy_ref(words, action="quick"), at=str(options["--at"]) if "--at" in options else None
        )
    if sub in {"status", "cancel"}:
        words, _ = _split(rest, flags=set(), valued=set(), multiword=set(), usage=DEPLOY_USAGE)
        return DeployRef(action=sub, ref=parse_deploy_ref(words, action=sub))
    if sub in {"list", "orgs"}:
        if rest:
            raise UsageError(f"`{sub}` takes no arguments.", usage=DEPLOY_USAGE)
        return DeployList() if sub == "list" else DeployOrgs()
    raise UsageError(f"Unknown subcommand `{sub[:30]}`.", usage=DEPLOY_USAGE)
