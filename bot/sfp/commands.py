"""The ``/sfp`` grammar: text in, typed request out, ``UsageError`` (with usage) on anything off.

Pure functions with no Slack, database or HTTP: everything a user typed is checked here, so
bad ``key=value`` input is refused before any call to the sfp server.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any

from bot.clients.sfp import OPERATION_ID_RE, PRIORITIES
from bot.core.grammar import SFP_REFS, parse_ref, split_options, tokenize
from bot.core.when import parse_duration
from bot.errors import UsageError
from bot.sfp.requests import SfpCommand, SfpHelp, SfpList, SfpRef, SfpSubmit

SFP_USAGE = "\n".join(
    [
        "*`/sfp` — tasks on the sfp server*",
        "• `/sfp submit <type> [key=value …] [--priority low|normal|high|critical] [--at <when>]"
        " [--every <interval>] [--until <when>] [--retries <n>]`",
        "   `key=value` sends text; `key:=<json>` sends a number, true/false, a list or an object (`wait:=300`)",
        "• `/sfp review-env fetch --repo <owner/repo> --pool <pool> --branch <branch> [--issue <n>] [--lease 1h]"
        " [--pool-type sandbox|scratchorg]`",
        "• `/sfp status|result|cancel|stop|runs <ref>` — `<ref>` is `S12`, or `op:<operationId>` for a task"
        " the bot did not submit",
        "• `/sfp list` — recent tasks",
        "• `--at`/`--until` take `18:30`, `tomorrow 09:00`, `2026-12-01 18:30`, `+2h` (your Slack time zone);"
        " `--every` takes `15m`, `1h`, `1d`",
    ]
)

TASK_TYPE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
DATA_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
REPO_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100}(?:/[A-Za-z0-9_.-]{1,100})?$")
POOL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ISSUE_RE = re.compile(r"^#?[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# git check-ref-format, in short: no spaces or control characters, no `..`, `~^:?*[\`, no `@{`,
# no leading `-` or `/`, no trailing `/` or `.lock`.
BRANCH_RE = re.compile(
    r"^(?!-)(?!/)(?!.*\.\.)(?!.*@\{)(?!.*//)[^\s~^:?*\[\\\x00-\x1f\x7f]{1,250}(?<!/)(?<!\.lock)(?<!\.)$"
)
POOL_TYPES = ("sandbox", "scratchorg")
MAX_PAIRS = 50
MAX_VALUE = 2000
MAX_DATA_JSON = 16_000
MIN_EVERY = timedelta(minutes=1)
MAX_EVERY = timedelta(days=31)
MAX_RETRIES = 10
MIN_LEASE = timedelta(minutes=5)
MAX_LEASE = timedelta(hours=24)  # a review environment stays assigned 24 h at most (sfp docs)
DEFAULT_LEASE = timedelta(hours=1)


REF_ACTIONS = ("status", "result", "cancel", "stop", "runs")


def parse_data(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` (text) and ``key:=json`` pairs into the task's ``data`` object."""
    if len(pairs) > MAX_PAIRS:
        raise UsageError(f"At most {MAX_PAIRS} `key=value` pairs.", usage=SFP_USAGE)
    data: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(
                f"`{pair[:40]}` is not `key=value`. Data is given as `key=value` (text) or `key:=<json>`.",
                usage=SFP_USAGE,
            )
        raw_json = key.endswith(":")
        key = key[:-1] if raw_json else key
        if not DATA_KEY_RE.match(key):
            raise UsageError(
                f"`{key[:40] or '(empty)'}` is not a data key "
                "(letters, digits, `_ . -`, starting with a letter or `_`).",
                usage=SFP_USAGE,
            )
        if key in data:
            raise UsageError(f"`{key}` is given twice.", usage=SFP_USAGE)
        if len(value) > MAX_VALUE:
            raise UsageError(f"The value of `{key}` is longer than {MAX_VALUE:,} characters.", usage=SFP_USAGE)
        if raw_json:
            try:
                data[key] = json.loads(value)
            except ValueError:
                raise UsageError(
                    f'`{key}:=` needs a JSON value (a number, true/false, null, "text", [list] or {{object}}); '
                    f"`{value[:40]}` is not one.",
                    usage=SFP_USAGE,
                ) from None
        else:
            data[key] = value
    if len(json.dumps(data)) > MAX_DATA_JSON:
        raise UsageError(f"The task data is larger than {MAX_DATA_JSON:,} characters.", usage=SFP_USAGE)
    return data


def parse_every(text: str) -> timedelta:
    try:
        every = parse_duration(text)
    except ValueError:
        raise UsageError(
            f"`--every {text[:30]}` is not an interval; use e.g. `15m`, `1h`, `1d`.", usage=SFP_USAGE
        ) from None
    if every < MIN_EVERY:
        raise UsageError("`--every` must be at least 1 minute.", usage=SFP_USAGE)
    if every > MAX_EVERY:
        raise UsageError("`--every` can be at most 31 days.", usage=SFP_USAGE)
    return every


def parse_retries(text: str) -> int:
    if not text.isdigit() or int(text) > MAX_RETRIES:
        raise UsageError(f"`--retries` takes a whole number from 0 to {MAX_RETRIES}.", usage=SFP_USAGE)
    return int(text)


def parse_priority(text: str) -> str:
    value = text.strip().lower()
    if value not in PRIORITIES:
        raise UsageError(f"`--priority` is one of {', '.join(PRIORITIES)}.", usage=SFP_USAGE)
    return value


def parse_lease(text: str) -> timedelta:
    try:
        lease = parse_duration(text)
    except ValueError:
        raise UsageError(f"`--lease {text[:30]}` is not a duration; use e.g. `30m`, `1h`.", usage=SFP_USAGE) from None
    if not MIN_LEASE <= lease <= MAX_LEASE:
        raise UsageError("`--lease` is between 5 minutes and 24 hours.", usage=SFP_USAGE)
    return lease


def parse_task_ref(words: list[str], *, action: str) -> SfpRef:
    if len(words) == 1 and words[0].lower().startswith("op:"):
        operation_id = words[0][3:]
        if not OPERATION_ID_RE.match(operation_id):
            raise UsageError(
                f"`{operation_id[:40] or '(empty)'}` is not an sfp operation id (letters, digits, `_ . : -`).",
                usage=SFP_USAGE,
            )
        return SfpRef(action=action, operation_id=operation_id)
    # A short ref (S12, 12) or the operationId the sfp server gave the task; the service finds it.
    return SfpRef(action=action, ref=parse_ref(words, usage=SFP_USAGE, action=action, refs=SFP_REFS))


def _submit_options(rest: list[str]) -> tuple[list[str], dict[str, str | bool]]:
    return split_options(
        rest,
        flags=set(),
        valued={"--priority", "--at", "--every", "--until", "--retries"},
        multiword={"--at", "--until"},
        usage=SFP_USAGE,
    )


def _schedule(options: dict[str, str | bool]) -> dict[str, Any]:
    every = parse_every(str(options["--every"])) if "--every" in options else None
    if "--until" in options and every is None:
        raise UsageError("`--until` only goes with `--every` (it ends a recurring task).", usage=SFP_USAGE)
    return {
        "priority": parse_priority(str(options["--priority"])) if "--priority" in options else "low",
        "at": str(options["--at"]) if "--at" in options else None,
        "every": every,
        "until": str(options["--until"]) if "--until" in options else None,
        "retries": parse_retries(str(options["--retries"])) if "--retries" in options else None,
    }


def parse_review_env(rest: list[str]) -> SfpSubmit:
    """``review-env fetch``: the docs' ``fetchReviewEnvironment`` example data, from named options."""
    if not rest or rest[0].lower() != "fetch":
        raise UsageError(
            "`review-env` supports `fetch` (`/sfp review-env fetch --repo … --pool … --branch …`).", usage=SFP_USAGE
        )
    words, options = split_options(
        rest[1:],
        flags=set(),
        valued={"--repo", "--pool", "--branch", "--issue", "--lease", "--pool-type", "--priority"},
        multiword=set(),
        usage=SFP_USAGE,
    )
    if words:
        raise UsageError(f"`review-env fetch` takes options only; `{words[0][:30]}` is not one.", usage=SFP_USAGE)
    missing = [name for name in ("--repo", "--pool", "--branch") if name not in options]
    if missing:
        raise UsageError(f"`review-env fetch` needs {', '.join(f'`{m}`' for m in missing)}.", usage=SFP_USAGE)
    repo, pool, branch = str(options["--repo"]), str(options["--pool"]), str(options["--branch"])
    if not REPO_RE.match(repo):
        raise UsageError(f"`--repo {repo[:60]}` is not a repository (`owner/repo`).", usage=SFP_USAGE)
    if not POOL_RE.match(pool):
        raise UsageError(f"`--pool {pool[:60]}` is not a pool name (letters, digits, `_ . -`).", usage=SFP_USAGE)
    if not BRANCH_RE.match(branch):
        raise UsageError(f"`--branch {branch[:60]}` is not a valid git branch name.", usage=SFP_USAGE)
    pool_type = str(options.get("--pool-type", "sandbox")).lower()
    if pool_type not in POOL_TYPES:
        raise UsageError("`--pool-type` is `sandbox` or `scratchorg`.", usage=SFP_USAGE)
    lease = parse_lease(str(options["--lease"])) if "--lease" in options else DEFAULT_LEASE
    # Field names and units as in the sfp docs' example: {"repoId", "pool", "pooltype", "branch",
    # "issue", "leasefor": 3600, ...}; leasefor is in seconds there (3600 next to wait: 300).
    data: dict[str, Any] = {"repoId": repo, "pool": pool, "pooltype": pool_type, "branch": branch}
    if "--issue" in options:
        issue = str(options["--issue"])
        if not ISSUE_RE.match(issue):
            raise UsageError(f"`--issue {issue[:40]}` is not an issue or pull request number.", usage=SFP_USAGE)
        data["issue"] = issue.lstrip("#")
    data["leasefor"] = int(lease.total_seconds())
    return SfpSubmit(
        task_type="fetchReviewEnvironment",
        data=data,
        priority=parse_priority(str(options["--priority"])) if "--priority" in options else "low",
        shortcut="review-env fetch",
    )


def parse_sfp(text: str) -> SfpCommand:
    tokens = tokenize(text, usage=SFP_USAGE)
    if not tokens or tokens[0].lower() in {"help", "-h", "--help"}:
        return SfpHelp()
    sub, rest = tokens[0].lower(), tokens[1:]
    if sub == "submit":
        words, options = _submit_options(rest)
        if not words:
            raise UsageError("Which task type? `/sfp submit <type> [key=value …]`.", usage=SFP_USAGE)
        task_type = words[0]
        if not TASK_TYPE_RE.match(task_type):
            raise UsageError(
                f"`{task_type[:40]}` is not a task type (letters, digits, `_ . -`, starting with a letter).",
                usage=SFP_USAGE,
            )
        return SfpSubmit(task_type=task_type, data=parse_data(words[1:]), **_schedule(options))
    if sub in {"review-env", "reviewenv"}:
        return parse_review_env(rest)
    if sub in REF_ACTIONS:
        words, _ = split_options(rest, flags=set(), valued=set(), multiword=set(), usage=SFP_USAGE)
        return parse_task_ref(words, action=sub)
    if sub == "list":
        if rest:
            raise UsageError("`list` takes no arguments.", usage=SFP_USAGE)
        return SfpList()
    raise UsageError(f"Unknown subcommand `{sub[:30]}`.", usage=SFP_USAGE)


__all__ = ["SFP_USAGE", "SfpCommand", "SfpHelp", "SfpList", "SfpRef", "SfpSubmit", "parse_sfp"]
