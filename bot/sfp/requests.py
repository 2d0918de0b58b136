"""What a person asks of the sfp service and what comes back: plain data, no usage text or Slack.

The grammar (``commands.py``) produces these, the service takes them, and the messages render
the answers; keeping them here lets the service import no usage text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from bot.clients.sfp import Stopped
from bot.sfp.payloads import SfpParams, iso
from bot.store.models import Operation

# -- parsed commands ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SfpSubmit:
    task_type: str
    data: dict[str, Any] = field(default_factory=dict)
    priority: str = "low"
    at: str | None = None  # raw text; resolved in the requester's time zone later
    every: timedelta | None = None
    until: str | None = None
    retries: int | None = None
    shortcut: str | None = None  # "review-env fetch" when it came from a shortcut


@dataclass(frozen=True)
class SfpRef:
    action: str  # status | result | cancel | stop | runs
    ref: str | None = None  # "S12", "12" or the operationId of a task the bot submitted
    operation_id: str | None = None  # a task the bot did not submit (op:<id>)


@dataclass(frozen=True)
class SfpList:
    pass


@dataclass(frozen=True)
class SfpHelp:
    pass


SfpCommand = SfpSubmit | SfpRef | SfpList | SfpHelp


# -- what the service takes and gives ---------------------------------------------------------------------


@dataclass(frozen=True)
class TaskRequest:
    """A task as the user asked for it, with times already resolved."""

    task_type: str
    data: dict[str, Any]
    priority: str = "low"
    scheduled_for: datetime | None = None
    every: timedelta | None = None
    until: datetime | None = None
    retries: int | None = None
    shortcut: str | None = None

    @property
    def recurring(self) -> bool:
        return self.every is not None

    def to_params(self) -> SfpParams:
        return SfpParams(
            type=self.task_type,
            data=self.data,
            priority=self.priority,
            scheduled_for=iso(self.scheduled_for),
            every_seconds=int(self.every.total_seconds()) if self.every else None,
            until=iso(self.until),
            retries=self.retries,
            shortcut=self.shortcut,
        )


@dataclass(frozen=True)
class Target:
    """What a ``status|result|cancel|stop|runs`` names: one of ours, or a bare operation id."""

    operation: Operation | None
    operation_id: str | None

    @property
    def label(self) -> str:
        if self.operation is not None:
            return self.operation.ref
        return f"operation `{self.operation_id}`"


@dataclass(frozen=True)
class CancelOutcome:
    target: Target
    text: str  # what happened, in a sentence


@dataclass(frozen=True)
class StopOutcome:
    target: Target
    stopped: Stopped | None  # None when the answer was lost but the task is stopped
