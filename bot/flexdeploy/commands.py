"""The ``/fd`` grammar: text in, typed request out, ``UsageError`` (with usage) on anything off.

Pure functions with no Slack, HTTP or database types (like ``bot.push.commands`` for ``/push``,
whose ``tokenize``/``split_options`` it reuses). Checks that need the package as FlexDeploy
has it (its type, status, files) are made by the service after a GET.
"""

from __future__ import annotations

import re
from dataclasses import replace

from bot.clients.salesforce.metadata import TEST_LEVELS
from bot.core.grammar import FD_REFS, parse_ref, split_options, tokenize
from bot.errors import UsageError
from bot.flexdeploy.requests import (
    FdCancel,
    FdCommand,
    FdDelete,
    FdHelp,
    FdShow,
    FdStatus,
    FdWrite,
    FileSpec,
    PackageFields,
    check_sequence_numbers,
    check_type_rules,
)

FD_USAGE = """*`/fd` — FlexDeploy packages*
`<projectId>` is the project's number; package names are case-sensitive (quote names with spaces).
• `/fd show <projectId> <packageName>` — type, status and files in sequence order
• `/fd create <projectId> <packageName> [attributes]`
• `/fd add <projectId> <packageName> [attributes]` — appends files; attributes you leave out stay as they are
• `/fd replace <projectId> <packageName> --files <list>|none [attributes]` — exactly these files
• `/fd status <projectId> <packageName> ACTIVE|INACTIVE|COMPLETED` — COMPLETED needs approval and is final
• `/fd delete <projectId> <packageName>` — needs approval · `/fd cancel <ref>` withdraws a request
Attributes: `--files "[<seq>:]<path>[=<objectType>], …"` (sequence numbers for all files or none)
  `--sort-all` · `--add-file-filter <text>` · `--type USER_MANAGED|DYNAMIC` · `--description <text>`
  `--include <regex,…>` · `--exclude <regex,…>` (DYNAMIC only) · `--status ACTIVE|INACTIVE`
  `--tests A,B` · `--test-level NoTestRun|RunSpecifiedTests|RunLocalTests|RunAllTestsInOrg` · `--version-syntax <text>`
Example: `/fd add 101 "Release 42" --files "/src/classes/TaxService.cls, /src/classes/TaxServiceTest.cls"`"""

PACKAGE_TYPES = ("USER_MANAGED", "DYNAMIC")
PACKAGE_STATUSES = ("ACTIVE", "INACTIVE", "COMPLETED")
PROJECT_ID_RE = re.compile(r"^\d{1,18}$")
TEST_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,79}(?:\.[A-Za-z][A-Za-z0-9_]{0,79})?$")
OBJECT_TYPE_RE = re.compile(r"^[\w .()/-]{1,80}$")
SEQUENCE_RE = re.compile(r"^(\d{1,6}):(.*)$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_NAME = 255  # FlexDeploy's docs give no limit; a generous one keeps URLs and cards sane
MAX_TEXT = 2000
MAX_PATH = 1000
MAX_FILES = 2000
NO_FILES = "none"  # `replace --files none` empties a package

WRITE_FLAGS = {"--sort-all"}
WRITE_OPTIONS = {
    "--files",
    "--add-file-filter",
    "--type",
    "--include",
    "--exclude",
    "--description",
    "--tests",
    "--test-level",
    "--version-syntax",
    "--status",
}
MULTIWORD = {"--files", "--add-file-filter", "--include", "--exclude", "--description", "--tests", "--version-syntax"}


def keep_backslashes(text: str) -> str:
    """Make ``tokenize`` (shlex) keep every backslash, quoted or not.

    Regular expressions are full of them (``.*\\.cls``), and shlex would silently drop an
    unquoted one, turning ``\\.`` ("a dot") into ``.`` ("any character"). Backslashes are
    doubled outside single quotes, where shlex treats them as escapes; inside single quotes it
    keeps them as they are. Slack's curly quotes count as quotes, as in ``tokenize``.
    """
    out: list[str] = []
    quote: str | None = None
    for char in text:
        if quote is None and char in "'\u2018\u2019":
            quote = "'"
        elif quote is None and char in '"\u201c\u201d':
            quote = '"'
        elif quote == "'" and char in "'\u2018\u2019":
            quote = None
        elif quote == '"' and char in '"\u201c\u201d':
            quote = None
        elif quote != "'" and char == "\\":
            out.append("\\")
        out.append(char)
    return "".join(out)


def parse_fd(text: str) -> FdCommand:
    try:
        return _parse(text)
    except UsageError as error:
        # The checks shared with the service (``bot.flexdeploy.requests``) carry no usage text.
        error.usage = error.usage or FD_USAGE
        raise


def _parse(text: str) -> FdCommand:
    # Slack sends &, < and > in command text as HTML entities; names and regexes need the characters.
    text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    tokens = tokenize(keep_backslashes(text), usage=FD_USAGE)
    if not tokens or tokens[0].lower() in {"help", "-h", "--help"}:
        return FdHelp()
    sub, rest = tokens[0].lower(), tokens[1:]
    if sub == "cancel":
        words, _ = split_options(rest, flags=set(), valued=set(), multiword=set(), usage=FD_USAGE)
        return FdCancel(ref=parse_ref(words, usage=FD_USAGE, action="cancel", refs=FD_REFS))
    if sub in {"show", "delete"}:
        words, _ = split_options(rest, flags=set(), valued=set(), multiword=set(), usage=FD_USAGE)
        project_id, name = _target(words, action=sub)
        return FdShow(project_id, name) if sub == "show" else FdDelete(project_id, name)
    if sub == "status":
        words, _ = split_options(rest, flags=set(), valued=set(), multiword=set(), usage=FD_USAGE)
        if len(words) < 3:
            raise UsageError(
                "`status` takes a project id, a package name and the new status (ACTIVE, INACTIVE or COMPLETED).",
                usage=FD_USAGE,
            )
        project_id, name = _target(words[:-1], action=sub)
        return FdStatus(project_id, name, parse_status(words[-1]))
    if sub in {"create", "add", "replace"}:
        words, options = split_options(
            rest, flags=WRITE_FLAGS, valued=WRITE_OPTIONS, multiword=MULTIWORD, usage=FD_USAGE
        )
        project_id, name = _target(words, action=sub)
        fields = parse_fields(options)
        return FdWrite(action=sub, project_id=project_id, package=name, fields=check_write(sub, fields))  # type: ignore[arg-type]
    raise UsageError(f"Unknown subcommand `{sub[:30]}`.", usage=FD_USAGE)


def _target(words: list[str], *, action: str) -> tuple[int, str]:
    if len(words) < 2:
        raise UsageError(
            f'`{action}` needs a project id and a package name, e.g. `/fd {action} 101 "Release 42"`.', usage=FD_USAGE
        )
    return parse_project_id(words[0]), parse_package_name(" ".join(words[1:]))


def parse_project_id(text: str) -> int:
    if not PROJECT_ID_RE.match(text):
        raise UsageError(
            f"`{text[:30]}` is not a FlexDeploy project id; it is the project's number (e.g. `101`).", usage=FD_USAGE
        )
    return int(text)


def parse_package_name(text: str) -> str:
    """Any name FlexDeploy could hold: spaces, slashes and unicode are fine (they are URL-encoded)."""
    if not text:
        raise UsageError("Which package? Give its name after the project id.", usage=FD_USAGE)
    if _CONTROL.search(text):
        raise UsageError("A package name cannot contain control characters.", usage=FD_USAGE)
    if len(text) > MAX_NAME:
        raise UsageError(f"A package name can be at most {MAX_NAME} characters.", usage=FD_USAGE)
    if text in {".", ".."}:
        # As a URL path segment these mean "this" and "parent" directory; no server would see the name.
        raise UsageError(f"`{text}` cannot be used as a package name.", usage=FD_USAGE)
    return text


def parse_status(text: str) -> str:
    value = text.strip().upper()
    if value not in PACKAGE_STATUSES:
        raise UsageError(f"`{text[:30]}` is not a package status; use ACTIVE, INACTIVE or COMPLETED.", usage=FD_USAGE)
    return value


def parse_type(text: str) -> str:
    value = text.strip().upper().replace("-", "_").replace(" ", "_")
    if value not in PACKAGE_TYPES:
        raise UsageError(f"`{text[:30]}` is not a package type; use USER_MANAGED or DYNAMIC.", usage=FD_USAGE)
    return value


def parse_test_level(text: str) -> str:
    for level in TEST_LEVELS:
        if text.strip().lower() == level.lower():
            return level
    raise UsageError(f"`{text[:40]}` is not a test level; use {', '.join(TEST_LEVELS)}.", usage=FD_USAGE)


def parse_files(text: str) -> tuple[FileSpec, ...]:
    """``[<seq>:]<path>[=<objectType>]`` items separated by commas; ``none`` for no files."""
    if text.strip().lower() == NO_FILES:
        return ()
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise UsageError("`--files` lists no files.", usage=FD_USAGE)
    if any(not item for item in items):
        raise UsageError("`--files` has an empty entry (two commas in a row, or a trailing comma).", usage=FD_USAGE)
    if len(items) > MAX_FILES:
        raise UsageError(f"`--files` lists more than {MAX_FILES:,} files.", usage=FD_USAGE)
    specs: list[FileSpec] = []
    for item in items:
        sequence: int | None = None
        if match := SEQUENCE_RE.match(item):
            sequence, item = int(match.group(1)), match.group(2).strip()
            if sequence < 1:
                raise UsageError(f"Sequence numbers start at 1 (`{sequence}:{item[:60]}`).", usage=FD_USAGE)
        path, _, object_type = item.partition("=")
        path, object_type = path.strip(), object_type.strip()
        if not path:
            raise UsageError("A file in `--files` has no path.", usage=FD_USAGE)
        if _CONTROL.search(path) or len(path) > MAX_PATH:
            raise UsageError(f"`{path[:60]}` is not a file path I can send.", usage=FD_USAGE)
        if object_type and not OBJECT_TYPE_RE.match(object_type):
            raise UsageError(
                f"`{object_type[:40]}` is not an object type (letters, digits, spaces and . ( ) / - _).", usage=FD_USAGE
            )
        if "=" in item and not object_type:
            raise UsageError(f"`{item[:60]}` has `=` but no object type after it.", usage=FD_USAGE)
        specs.append(FileSpec(path=path, sequence=sequence, object_type=object_type or None))
    check_sequence_numbers(specs)
    seen: set[str] = set()
    for spec in specs:
        if spec.path in seen:
            raise UsageError(f"`{spec.path[:80]}` is listed twice in `--files`.", usage=FD_USAGE)
        seen.add(spec.path)
    return tuple(specs)


def parse_regex_list(text: str, *, option: str) -> str:
    """A comma-separated list of regular expressions, each checked to compile.

    FlexDeploy splits includePath/excludePath on commas, so a comma inside ``{1,3}``, ``[,]``
    or ``(a,b)`` would cut an expression in two; that is refused rather than sent. The check
    compiles with Python's ``re``; FlexDeploy (Java) agrees on everything but exotic syntax.
    """
    depth = 0
    escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(0, depth - 1)
        elif char == "," and depth:
            raise UsageError(
                f"`{option}` is a comma-separated list, so the comma inside a group, class or `{{m,n}}` of "
                f"`{text[:80]}` would split an expression in two. Write it without that comma "
                "(e.g. `(a|b)` instead of a class with a comma).",
                usage=FD_USAGE,
            )
    parts = [part.strip() for part in text.split(",")]
    if not any(parts) or any(not part for part in parts):
        raise UsageError(
            f"`{option}` has an empty expression (two commas in a row, or a trailing comma).", usage=FD_USAGE
        )
    for part in parts:
        try:
            re.compile(part)
        except re.error as exc:
            raise UsageError(
                f"`{option}`: `{part[:80]}` is not a valid regular expression ({exc}).", usage=FD_USAGE
            ) from None
    return ",".join(parts)


def parse_tests(text: str) -> str:
    names = [name.strip() for name in text.replace(" ", ",").split(",") if name.strip()]
    bad = [name for name in names if not TEST_NAME_RE.match(name)]
    if not names or bad:
        shown = ", ".join(f"`{name[:40]}`" for name in bad[:3]) or "`(empty)`"
        raise UsageError(
            f"`--tests` takes Apex test class names separated by commas; not valid: {shown}.", usage=FD_USAGE
        )
    return ",".join(dict.fromkeys(names))


def _text(value: str, *, option: str) -> str:
    if _CONTROL.search(value.replace("\n", " ")) or len(value) > MAX_TEXT:
        raise UsageError(f"`{option}` must be plain text of at most {MAX_TEXT} characters.", usage=FD_USAGE)
    return value


def parse_fields(options: dict[str, str | bool]) -> PackageFields:
    def text(name: str) -> str | None:
        value = options.get(name)
        return None if value is None else str(value)

    fields = PackageFields(
        description=_text(text("--description") or "", option="--description") if "--description" in options else None,
        package_type=parse_type(text("--type") or "") if "--type" in options else None,
        files=parse_files(text("--files") or "") if "--files" in options else None,
        sort_all=True if options.get("--sort-all") else None,
        add_file_filter=_text(text("--add-file-filter") or "", option="--add-file-filter")
        if "--add-file-filter" in options
        else None,
        include_path=parse_regex_list(text("--include") or "", option="--include") if "--include" in options else None,
        exclude_path=parse_regex_list(text("--exclude") or "", option="--exclude") if "--exclude" in options else None,
        tests=parse_tests(text("--tests") or "") if "--tests" in options else None,
        test_level=parse_test_level(text("--test-level") or "") if "--test-level" in options else None,
        version_syntax=_text(text("--version-syntax") or "", option="--version-syntax")
        if "--version-syntax" in options
        else None,
        package_status=parse_status(text("--status") or "") if "--status" in options else None,
    )
    if fields.tests is not None:
        if fields.test_level is None:
            # As for deployments (SPEC §5): naming tests means running the specified tests.
            fields = replace(fields, test_level="RunSpecifiedTests")
        elif fields.test_level != "RunSpecifiedTests":
            raise UsageError(
                f"`--tests` only goes with `--test-level RunSpecifiedTests`, not {fields.test_level}.", usage=FD_USAGE
            )
    if fields.sort_all and fields.files and any(spec.sequence is not None for spec in fields.files):
        raise UsageError(
            "`--sort-all` orders the files by object type and FlexDeploy then ignores sequence numbers; "
            "give sequence numbers or `--sort-all`, not both.",
            usage=FD_USAGE,
        )
    return fields


def check_write(action: str, fields: PackageFields) -> PackageFields:
    """What can be said from the command alone; the service re-checks against the package."""
    if fields.package_status == "COMPLETED":
        raise UsageError(
            "Completing a package is its own step, because a COMPLETED package can never be modified again: "
            "use `/fd status <projectId> <packageName> COMPLETED` (it needs approval).",
            usage=FD_USAGE,
        )
    check_type_rules(fields, package_type=fields.package_type or ("USER_MANAGED" if action == "create" else None))
    if action == "create" and fields.package_type == "DYNAMIC" and not fields.include_path:
        raise UsageError(
            "A DYNAMIC package needs `--include <regex,…>`: its files are the project files that match.",
            usage=FD_USAGE,
        )
    if action == "add" and fields.empty:
        raise UsageError(
            "Nothing to add: give `--files`, `--add-file-filter` or an attribute to change.", usage=FD_USAGE
        )
    return fields
