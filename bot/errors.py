"""The bot's one error tree.

    ChatOpsError
    ├── ConfigError               the configuration is wrong; the bot does not start (one line)
    ├── UserError                 the user can fix it; shown ephemerally with usage
    │   ├── UsageError            malformed command or option
    │   ├── NotFoundError         unknown ref, package, version, org …
    │   ├── NotAllowedError       access rules, approvals by the wrong person
    │   └── StateError            right command, wrong moment (cancel a running push …)
    └── UpstreamError             an external system failed us
        ├── TransientError        worth retrying: timeouts, 5xx, limits, dropped connections
        │   └── AmbiguousWriteError   a write may or may not have been applied; never resent,
        │                             the caller reconciles by reading the upstream state
        ├── AuthError             credentials refused (bad auth URL, expired refresh token)
        └── ApiError              a definite refusal with an error code (Salesforce errorCode …)
            └── TaskNotFoundError     the sfp server does not know the operation id (HTTP 404)

User errors become Slack messages in one place (handlers/errors.py). Upstream errors carry a
short, safe ``message`` — never a whole response body — so that they can be shown too.
"""

from __future__ import annotations


class ChatOpsError(Exception):
    """Root of every error the bot raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(ChatOpsError, ValueError):
    """A bad setting found at start-up. ``message`` is one line naming the file, table, key, bad
    value and allowed values, and never a secret's value; it is a ValueError too, so callers that
    catch ValueError around ``load_settings`` keep working."""


class UserError(ChatOpsError):
    """Something the requesting user can fix; ``usage`` is appended when given.

    ``markup``: the message is Slack mrkdwn the bot built itself from ids it holds (mentions such
    as ``<#C0123>``), with no user text in it, so it is shown as is instead of escaped.
    """

    def __init__(self, message: str, *, usage: str | None = None, markup: bool = False) -> None:
        super().__init__(message)
        self.usage = usage
        self.markup = markup


class UsageError(UserError):
    pass


class NotFoundError(UserError):
    pass


class NotAllowedError(UserError):
    pass


class StateError(UserError):
    pass


class UpstreamError(ChatOpsError):
    """An external system (Salesforce, Slack, sfp, FlexDeploy) failed or refused."""

    def __init__(self, message: str, *, system: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.system = system
        self.status = status


class TransientError(UpstreamError):
    """Retrying later may well succeed."""


class AmbiguousWriteError(TransientError):
    """A write may or may not have been applied: the connection dropped after sending, the answer
    was a 5xx, or an accepted request came back unreadable. Sending it again could apply it twice."""


class AuthError(UpstreamError):
    """Credentials were refused; a human has to fix the configuration."""


class ApiError(UpstreamError):
    """A definite answer with an error code, e.g. Salesforce ``FIELD_INTEGRITY_EXCEPTION``."""

    def __init__(self, message: str, *, system: str = "", status: int | None = None, code: str = "") -> None:
        super().__init__(message, system=system, status=status)
        self.code = code


class TaskNotFoundError(ApiError):
    """404 from the sfp server: it does not know this operation id (or, for stop/instances, the
    task is not recurring)."""
