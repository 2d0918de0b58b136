"""What an sfp task keeps in ``Operation.params`` and ``Operation.data``, as typed models.

``SfpParams`` is the task as asked (fixed when it is recorded); ``SfpData`` is what happened
since: the submit attempt, the sfp server's progress and result for a one-off task, the runs of
a recurring one, and who cancelled or stopped it.

Version 1 is exactly the key layout release 2 wrote (tests/fixtures/operations_r2_sfp.json), so
rows written before payloads were typed load unchanged. These models dump *sparsely*: a key is
written when it was read or set (explicit nulls included) or differs from its default, so a row
read and written back keeps every key it had, and a one-off task never grows the recurring keys.

Stored results and errors were redacted before they were stored (``SfpData.keep_result``); times are
kept as the ISO strings release 2 wrote.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field

from bot.clients.sfp import TaskSpec
from bot.core.payloads import OperationState, Payload
from bot.redaction import redact
from bot.store.models import Operation

MAX_STORED_RESULT = 200_000  # characters of JSON kept in the database
INLINE_RESULT_CHARS = 1800  # longer results are attached as a file
INLINE_RESULT_LINES = 30
RETRY_DELAY_MS = 5000  # the docs give no default delay between attempts; 5 s lets a pool or org recover
_PROBLEM_KEYS = {"transient_failures", "last_problem"}


def _sparse(model: BaseModel) -> dict[str, Any]:
    """Keys read or set, and defaults changed in place (``runs.append``): nothing else."""
    out = model.model_dump(mode="json", exclude_unset=True)
    for name, field in type(model).model_fields.items():
        if name in out:
            continue
        value = getattr(model, name)
        if value != field.get_default(call_default_factory=True):
            out[name] = model.model_dump(mode="json", include={name})[name]
    return out


class _Part(BaseModel):
    """A nested part of a payload: no version of its own, unknown keys ignored."""

    model_config = ConfigDict(extra="ignore")

    def dump(self) -> dict[str, Any]:
        return _sparse(self)


class _SparsePayload(Payload):
    def dump(self) -> dict[str, Any]:
        return {**_sparse(self), "v": self.v}


def iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat() if moment else None


def parse_iso(value: str | None) -> datetime | None:
    if not value:
        return None
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# -- params -------------------------------------------------------------------------------------------


class SfpParams(_SparsePayload):
    """The task as the user asked for it; every key is written, unset ones as null (as in release 2)."""

    type: str
    data: dict[str, Any] = Field(default_factory=dict)
    priority: str = "low"
    scheduled_for: str | None = None
    every_seconds: int | None = None
    until: str | None = None
    retries: int | None = None
    shortcut: str | None = None  # "review-env fetch" when it came from a shortcut

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @property
    def recurring(self) -> bool:
        return bool(self.every_seconds)

    @property
    def every(self) -> timedelta | None:
        return timedelta(seconds=self.every_seconds) if self.every_seconds else None

    def spec(self) -> TaskSpec:
        """The request the sfp server's Tasks API takes."""
        return TaskSpec(
            type=self.type,
            data=dict(self.data),
            priority=self.priority or "low",
            scheduled_for=parse_iso(self.scheduled_for),
            every_ms=self.every_seconds * 1000 if self.every_seconds else None,
            end_date=parse_iso(self.until),
            max_retries=self.retries,
            retry_delay_ms=RETRY_DELAY_MS if self.retries else None,
        )


# -- data ---------------------------------------------------------------------------------------------


class SubmitAttempt(_Part):
    """The one POST of a task: recorded as ``sending`` before it is made (never resent after that)."""

    state: str  # sending | accepted | not_sent | uncertain | refused
    at: str | None = None
    status: int | None = None  # the HTTP status of a refusal


class TaskError(_Part):
    message: str = ""
    stack: str = ""


class RunRecord(_Part):
    """One finished run of a recurring task (also a thread reply and a row of the runs CSV)."""

    number: int
    status: str
    message: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    operation_id: str | None = None


class CurrentRun(_Part):
    number: int
    status: str
    progress: int = 0


class StopRecord(_Part):
    """Who stopped a recurring task, and what the sfp server answered (when its answer arrived)."""

    by: str
    at: str | None = None
    total_executions: int | None = None
    last_execution_at: str | None = None
    original_end_date: str | None = None
    stopped_at: str | None = None

    @property
    def when(self) -> datetime | None:
        return parse_iso(self.stopped_at or self.at)


class SfpData(OperationState, _SparsePayload):
    """Everything the bot learned about one task since it was recorded."""

    submit: SubmitAttempt | None = None
    error: str | None = None  # why the bot stopped following it (state ``error``)
    cancel_requested_by: str | None = None
    stop: StopRecord | None = None
    finished_at: str | None = None
    # a one-off task, as the sfp server reports it
    status: str | None = None  # pending | active | completed | failed | cancelled
    progress: int | None = None
    current_step: str | None = None
    attempts_made: int | None = None
    started_at: str | None = None
    result: Any = None
    result_text: str | None = None  # the result as text, cut to MAX_STORED_RESULT characters
    task_error: TaskError | None = None
    # a recurring task: runs reported so far (every number below ``reported_below``, and the extras)
    reported_below: int | None = None
    reported_extra: list[int] = Field(default_factory=list)
    run_counts: dict[str, int] | None = None  # None: its runs were never read
    runs: list[RunRecord] = Field(default_factory=list)
    current_run: CurrentRun | None = None
    total_runs: int | None = None
    next_run_at: str | None = None
    end_date: str | None = None
    stopped_at: str | None = None
    active: bool | None = None

    @classmethod
    def of(cls, operation: Operation) -> Self:
        return cls.read(operation.data)

    def progress_dump(self) -> dict[str, Any]:
        """What a save writes: the transient-problem note goes, since progress means it is over."""
        return {key: value for key, value in self.dump().items() if key not in _PROBLEM_KEYS}

    def keep_result(self, result: Any) -> None:
        """Keep ``result`` redacted (it is shown in Slack), or as text cut to ``MAX_STORED_RESULT``."""
        cleaned = redact(result)
        text = result_json(cleaned)
        if len(text) > MAX_STORED_RESULT:
            self.result_text = text[:MAX_STORED_RESULT] + "\n… (cut: the result is larger than the bot keeps)"
        else:
            self.result = cleaned

    @property
    def stored_result(self) -> Any:
        """The result as kept (possibly cut to ``MAX_STORED_RESULT`` characters)."""
        return self.result_text if self.result_text is not None else self.result

    @property
    def stopped(self) -> bool:
        return self.stop is not None or self.stopped_at is not None

    @property
    def ended_by(self) -> str | None:
        """Who cancelled or stopped it, if anyone."""
        return self.cancel_requested_by or (self.stop.by if self.stop else None)

    @property
    def total_done(self) -> int:
        return sum(int(n) for n in (self.run_counts or {}).values())


def params_of(operation: Operation) -> SfpParams:
    return SfpParams.read(operation.params)


def is_recurring(operation: Operation) -> bool:
    return params_of(operation).recurring


# -- results (redaction: bot.redaction) -----------------------------------------------------------------


def result_json(result: Any) -> str:
    if isinstance(result, str):
        return result
    return json.dumps(result, indent=2, ensure_ascii=False, default=str)


def is_long_result(result: Any) -> bool:
    text = result_json(result)
    return len(text) > INLINE_RESULT_CHARS or text.count("\n") >= INLINE_RESULT_LINES


def duration_text(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
