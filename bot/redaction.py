"""The one redaction routine for everything the bot writes out, and the one CSV writer.

Logs, Slack messages and files, CSV files, audit rows and stored sfp results all pass through
``redact_text`` (text) or ``redact`` (JSON-like data), so that a credential some upstream system
put in a result or an error message, or that a user typed into a command, is masked the same way
wherever it would have surfaced. The shapes live in one list; a new one covers every output.

Ordinary identifiers stay readable: an org id ``00D…`` is only a session id when ``!`` and a token
follow it, and operation refs, job ids and URLs without credentials are untouched.

CSV files are opened by people in spreadsheets, where a cell that starts with ``=``, ``+``, ``-``,
``@``, a tab or a carriage return is read as a formula; org names, reject reasons and file paths
come from people outside the bot, so every text cell is neutralised with a leading ``'`` (OWASP).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

REDACTED = "[redacted]"

# Key names whose values are credentials, matched on the key lower-cased without ``_``/``-``/``.``.
_SECRET_KEY_PARTS = (
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "apikey",
    "privatekey",
    "authorization",
    "authurl",
    "credential",
    "sessionid",
    "assertion",
)
_SECRET_KEYS_EXACT = {"sid", "auth"}
_KEY_WORD = (
    r"[\w.-]*(?:password|passwd|pwd|secret|token|api[_-]?key|private[_-]?key|authorization|credential"
    r"|session[_-]?id|assertion)[\w-]*"
)


def _keep(name: str) -> Callable[[re.Match[str]], str]:
    """Replace a match by its named group ``name`` (what stays readable) followed by the mask."""
    return lambda match: (match.group(name) or "") + REDACTED


def _key_value(match: re.Match[str]) -> str:
    quote = '"' if match.group("dq") is not None else "'" if match.group("sq") is not None else ""
    return f"{match.group('key')}{quote}{REDACTED}{quote}"


# Secret shapes, applied in order (a PEM block first: its body would otherwise be cut piecemeal).
_PATTERNS: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (
        re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----(?:.*?-----END [A-Z0-9 ]*-----|.*)", re.DOTALL),
        lambda _: REDACTED,
    ),
    # Slack: bot, user, app-level, refresh, legacy and rotated (xoxe.xoxp-…) tokens.
    (re.compile(r"\b(?:xox[abeposr](?:\.xox[abeposr])?|xapp)-[A-Za-z0-9-]+"), lambda _: REDACTED),
    # sfdx auth URLs carry a refresh token: the whole URL goes.
    (re.compile(r"force://[^\s'\"<>|`]+"), lambda _: REDACTED),
    # A Salesforce session id: the org id, then ``!`` (or its URL encoding), then the token.
    (re.compile(r"(?P<org>\b00D[A-Za-z0-9]{12}(?:[A-Za-z0-9]{3})?)(?:!|%21)[A-Za-z0-9._]+"), _keep("org")),
    # ``frontdoor.jsp?sid=…`` and any other ``sid`` query parameter.
    (re.compile(r"(?i)(?P<key>\bsid=)[^&\s'\"<>|`]+"), _keep("key")),
    # ``scheme://user:password@host``: the user and host stay, the password goes.
    (re.compile(r"(?i)(?P<head>\b[a-z][a-z0-9+.-]*://[^/\s:@<>|`]+:)[^/\s@<>|`]+(?=@)"), _keep("head")),
    (re.compile(r"(?i)(?P<head>\bbearer\s+)[A-Za-z0-9!._~+/=-]{8,}"), _keep("head")),
    # ``password=…``, ``"token": "…"``, ``client_secret: …``, ``pwd:=…`` in free text.
    (
        re.compile(
            rf"(?i)(?P<key>[\"']?\b{_KEY_WORD}[\"']?\s*(?::=|[:=])\s*)"
            r"(?:\"(?P<dq>[^\"]*)\"|'(?P<sq>[^']*)'|(?P<bare>[^\s\"'&,;}<>|`\]]+))"
        ),
        _key_value,
    ),
]


def is_secret_key(key: str) -> bool:
    name = re.sub(r"[_.\-\s]", "", key.lower())
    return name in _SECRET_KEYS_EXACT or any(part in name for part in _SECRET_KEY_PARTS)


def redact_text(text: str, *, known: Sequence[str] = ()) -> str:
    """``text`` with every known secret value and every secret-shaped string masked."""
    for secret in known:
        text = text.replace(secret, REDACTED)
    for pattern, replace in _PATTERNS:
        text = pattern.sub(replace, text)
    return text


def redact(value: Any, *, depth: int = 0) -> Any:
    """JSON-like data with credential-named keys masked (at any depth) and every string redacted."""
    if depth > 20:
        return "…"
    if isinstance(value, dict):
        return {
            str(key): (
                REDACTED if is_secret_key(str(key)) and item not in (None, "") else redact(item, depth=depth + 1)
            )
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item, depth=depth + 1) for item in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


# -- CSV ----------------------------------------------------------------------------------------------

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A cell as written to a CSV file: redacted, and text that a spreadsheet would run is quoted.

    Numbers stay numbers (``-3`` is a value, not a formula); ``None`` is an empty cell.
    """
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, int | float):
        text = redact_text(str(value))
        return "'" + text if text.startswith(_FORMULA_START) else text
    return value


def write_csv(stream: io.TextIOBase | Any, *, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Every CSV the bot produces is written here."""
    writer = csv.writer(stream)
    writer.writerow([csv_cell(name) for name in header])
    for row in rows:
        writer.writerow([csv_cell(cell) for cell in row])


def csv_bytes(*, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> bytes:
    buffer = io.StringIO()
    write_csv(buffer, header=header, rows=rows)
    return buffer.getvalue().encode()
