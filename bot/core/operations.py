"""What a service tells the poller after advancing an operation: plain data, no Slack types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from bot.store.models import Operation


@dataclass(frozen=True)
class OpEvent:
    """A state change worth a thread reply (rendered by bot.slack.cards)."""

    name: str  # approved | rejected | expired | jobs_created | scheduled | started | in_progress | completed | …
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OpFile:
    name: str
    title: str
    content: bytes


@dataclass(frozen=True)
class Advance:
    events: list[OpEvent] = field(default_factory=list)
    next_poll_in: float | None = None  # seconds; None → the poller's default for the state


class Advancer(Protocol):
    """One per operation kind; advances a batch of leased operations of that kind."""

    async def advance(self, operations: list[Operation], *, lease_token: str) -> dict[int, Advance]: ...

    async def completion_files(self, operation: Operation) -> list[OpFile]: ...
