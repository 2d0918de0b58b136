"""The sfp server Tasks API (flxbl sfp-pro server) over one aiohttp session.

    POST   /sfp/api/tasks                                      submit → 201 {operationId, type}
    GET    /sfp/api/tasks/{operationId}/status                 {status, progress, error{message, stack}}
    GET    /sfp/api/tasks/{operationId}/result                 the same plus ``result``
    DELETE /sfp/api/tasks/{operationId}                        cancel a pending or active task
    POST   /sfp/api/tasks/{operationId}/stop-recurring         {message, operationId, stoppedAt,
                                                                totalExecutions, lastExecutionAt,
                                                                originalEndDate}; 400 already stopped or
                                                                completed, 404 not found or not recurring
    GET    /sfp/api/tasks/{operationId}/recurring-instances

Authentication is ``Authorization: Bearer <token>`` (docs.flxbl.io → sfp server → API reference →
Tasks). ``SfpClient._send`` is the only place that adds the token; it sends through the shared
``Transport`` and ``_SfpAnswers`` interprets the HTTP answers. The token is never logged and
never part of an error message.

Where the published docs are silent, the choices made here (and mirrored by the sandbox
simulator, bot/sandbox/sfp_server.py) are:

* ``priority`` values: the docs give only the default ``low``; we send ``low``, ``normal``,
  ``high`` or ``critical`` (the server's own queue names are critical / normal / batch).
* ``scheduleType`` values: the docs give the default ``immediate`` and describe one-time
  delayed and recurring tasks; we send ``scheduled`` (with ``scheduledFor``) and ``recurring``.
* ``retryConfig`` fields: ``{"maxRetries": n, "retryDelay": ms}``.
* ``recurrenceConfig`` fields: ``{"every": ms, "endDate": ISO-8601}`` (``originalEndDate`` in
  the stop-recurring answer is this ``endDate``).
* The recurring-instances answer: either a JSON list of instances or an object with an
  ``instances`` list plus ``isActive``, ``nextExecutionAt``, ``endDate``, ``stoppedAt``,
  ``totalExecutions``; each instance has ``operationId``, ``status``, ``progress`` and, where
  known, ``executionNumber``, ``scheduledFor``, ``startedAt``, ``finishedAt``, ``error``.
* Error answers use NestJS's shape ``{"statusCode", "message" (string or list), "error"}``.
* The status answer may carry ``attemptsMade`` and ``currentStep`` (the docs mention the current
  step and retries without naming the fields); both are optional here.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
from pydantic import SecretStr

from bot.clients.retry import RetryPolicy, parse_retry_after
from bot.clients.transport import OK, Ambiguous, Fail, Request, Response, Retry, Transport, Verdict, json_request
from bot.errors import AmbiguousWriteError, ApiError, AuthError, TaskNotFoundError, TransientError

log = logging.getLogger(__name__)

SYSTEM = "sfp"
TASKS_PATH = "/sfp/api/tasks"
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
PRIORITIES = ("low", "normal", "high", "critical")
# Operation ids are opaque; this keeps anything odd (slashes, spaces, '..') out of the URL path.
OPERATION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_MESSAGE_MAX = 300


def check_operation_id(operation_id: str) -> str:
    if not OPERATION_ID_RE.match(operation_id):
        raise ValueError(f"not an sfp operation id: {operation_id[:40]!r}")
    return operation_id


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_time(value: Any) -> datetime | None:
    """ISO-8601 (``Z`` or offset) or epoch milliseconds, as the server may send either."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value / 1000.0, tz=UTC)
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# -- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """One ``POST /sfp/api/tasks`` body, as plain data (stored in Operation.params)."""

    type: str
    data: dict[str, Any]
    priority: str = "low"
    scheduled_for: datetime | None = None
    every_ms: int | None = None  # recurring when set
    end_date: datetime | None = None
    max_retries: int | None = None
    retry_delay_ms: int | None = None
    lock_duration_ms: int | None = None

    @property
    def schedule_type(self) -> str:
        if self.every_ms is not None:
            return "recurring"
        return "scheduled" if self.scheduled_for is not None else "immediate"

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.type,
            "data": self.data,
            "priority": self.priority,
            "scheduleType": self.schedule_type,
        }
        if self.scheduled_for is not None:
            body["scheduledFor"] = iso(self.scheduled_for)
        if self.lock_duration_ms is not None:
            body["lockDuration"] = self.lock_duration_ms
        if self.max_retries is not None:
            retry: dict[str, Any] = {"maxRetries": self.max_retries}
            if self.retry_delay_ms is not None:
                retry["retryDelay"] = self.retry_delay_ms
            body["retryConfig"] = retry
        if self.every_ms is not None:
            recurrence: dict[str, Any] = {"every": self.every_ms}
            if self.end_date is not None:
                recurrence["endDate"] = iso(self.end_date)
            body["recurrenceConfig"] = recurrence
        return body


# -- answers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submitted:
    operation_id: str
    type: str


@dataclass(frozen=True)
class TaskError:
    message: str
    stack: str = ""


@dataclass(frozen=True)
class TaskStatus:
    """``GET …/status`` (``has_result`` False) or ``GET …/result`` (``has_result`` True)."""

    status: str
    progress: int
    error: TaskError | None = None
    result: Any = None
    has_result: bool = False
    attempts_made: int | None = None
    current_step: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


@dataclass(frozen=True)
class Cancelled:
    message: str


@dataclass(frozen=True)
class Stopped:
    message: str
    operation_id: str
    stopped_at: datetime | None
    total_executions: int
    last_execution_at: datetime | None
    original_end_date: datetime | None


@dataclass(frozen=True)
class Instance:
    operation_id: str
    number: int
    status: str
    progress: int = 0
    scheduled_for: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: TaskError | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


@dataclass(frozen=True)
class Recurrence:
    """``GET …/recurring-instances``; the summary fields are None when the server left them out."""

    instances: list[Instance] = field(default_factory=list)
    active: bool | None = None
    next_execution_at: datetime | None = None
    end_date: datetime | None = None
    stopped_at: datetime | None = None
    total_executions: int | None = None


def _status_word(value: Any) -> str:
    word = str(value or "").strip().lower()
    return "cancelled" if word == "canceled" else word


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return default


def _error(value: Any) -> TaskError | None:
    if not value:
        return None
    if isinstance(value, str):
        return TaskError(message=value[:2000])
    if isinstance(value, Mapping):
        message = str(value.get("message") or "")
        stack = str(value.get("stack") or "")
        if not message and not stack:
            return None
        return TaskError(message=message[:2000], stack=stack[:20000])
    return TaskError(message=str(value)[:2000])


def _task_status(payload: Any, *, with_result: bool) -> TaskStatus:
    if not isinstance(payload, Mapping) or not payload.get("status"):
        raise ApiError("the sfp server sent a task status without a status", system=SYSTEM, code="BAD_ANSWER")
    attempts = payload.get("attemptsMade")
    step = payload.get("currentStep")
    return TaskStatus(
        status=_status_word(payload.get("status")),
        progress=max(0, min(100, _int(payload.get("progress")))),
        error=_error(payload.get("error")),
        result=payload.get("result") if with_result else None,
        has_result=with_result and payload.get("result") is not None,
        attempts_made=_int(attempts) if attempts is not None else None,
        current_step=str(step)[:200] if step else None,
    )


def _recurrence(payload: Any) -> Recurrence:
    summary: Mapping[str, Any] = payload if isinstance(payload, Mapping) else {}
    raw = payload if isinstance(payload, list) else summary.get("instances")
    if not isinstance(raw, list):
        raise ApiError("the sfp server sent recurring instances in an unknown shape", system=SYSTEM, code="BAD_ANSWER")
    instances: list[Instance] = []
    for position, item in enumerate(raw, start=1):
        if not isinstance(item, Mapping):
            continue
        instances.append(
            Instance(
                operation_id=str(item.get("operationId") or item.get("id") or ""),
                number=_int(item.get("executionNumber"), position),
                status=_status_word(item.get("status")),
                progress=max(0, min(100, _int(item.get("progress")))),
                scheduled_for=parse_time(item.get("scheduledFor")),
                started_at=parse_time(item.get("startedAt")),
                finished_at=parse_time(item.get("finishedAt")),
                error=_error(item.get("error")),
            )
        )
    active = summary.get("isActive")
    total = summary.get("totalExecutions")
    return Recurrence(
        instances=sorted(instances, key=lambda instance: instance.number),
        active=bool(active) if active is not None else None,
        next_execution_at=parse_time(summary.get("nextExecutionAt")),
        end_date=parse_time(summary.get("endDate")),
        stopped_at=parse_time(summary.get("stoppedAt")),
        total_executions=_int(total) if total is not None else None,
    )


def _server_message(body: bytes) -> str:
    """The ``message`` of a NestJS error answer, clipped; never the body itself."""
    try:
        payload = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(payload, Mapping):
        return ""
    message = payload.get("message")
    if isinstance(message, list):
        text = "; ".join(str(part) for part in message[:5])
    else:
        text = str(message or payload.get("error") or "")
    return " ".join(text.split())[:_MESSAGE_MAX]


# -- the client ---------------------------------------------------------------------------------


class SfpClient:
    """One sfp server. ``session`` is shared with the other clients and owned by the caller."""

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        base_url: str,
        token: SecretStr,
        timeout: aiohttp.ClientTimeout | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._host = urlsplit(self._base).netloc
        self._token = token
        self._timeout = timeout or aiohttp.ClientTimeout(total=30, connect=10)
        self._transport = Transport(
            session=session, classifier=_SfpAnswers(self._host), timeout=self._timeout, retry=retry
        )

    def __repr__(self) -> str:
        return f"SfpClient({self._base!r})"

    # -- the one request path ----------------------------------------------------------------
    async def _send(self, method: str, path: str, *, json_body: Any = None, idempotent: bool) -> Any:
        headers = {"Authorization": f"Bearer {self._token.get_secret_value()}", "Accept": "application/json"}
        request = json_request(method, self._base + path, json_body, idempotent=idempotent, headers=headers)
        return _json((await self._transport.send(request)).body)

    def _task_path(self, operation_id: str, suffix: str = "") -> str:
        return f"{TASKS_PATH}/{quote(check_operation_id(operation_id), safe='')}{suffix}"

    # -- the Tasks API -------------------------------------------------------------------------
    async def submit(self, spec: TaskSpec) -> Submitted:
        """Never repeated after a request may have gone through: raises AmbiguousWriteError instead."""
        try:
            payload = await self._send("POST", TASKS_PATH, json_body=spec.body(), idempotent=False)
        except ApiError as exc:
            if exc.code == "BAD_ANSWER":  # a 2xx we cannot read: the task may well exist
                raise AmbiguousWriteError(
                    "the sfp server accepted the task with an unreadable answer", system=SYSTEM
                ) from None
            raise
        if not isinstance(payload, Mapping) or not payload.get("operationId"):
            raise AmbiguousWriteError("the sfp server accepted the task but sent no operationId", system=SYSTEM)
        operation_id = str(payload["operationId"])
        if not OPERATION_ID_RE.match(operation_id):
            raise AmbiguousWriteError("the sfp server sent an operationId the bot cannot use", system=SYSTEM)
        return Submitted(operation_id=operation_id, type=str(payload.get("type") or spec.type))

    async def status(self, operation_id: str) -> TaskStatus:
        payload = await self._send("GET", self._task_path(operation_id, "/status"), idempotent=True)
        return _task_status(payload, with_result=False)

    async def result(self, operation_id: str) -> TaskStatus:
        payload = await self._send("GET", self._task_path(operation_id, "/result"), idempotent=True)
        return _task_status(payload, with_result=True)

    async def cancel(self, operation_id: str) -> Cancelled:
        # A repeated DELETE after a lost answer would be refused as "not cancellable"; the caller
        # reconciles through the status instead, so this is sent once.
        payload = await self._send("DELETE", self._task_path(operation_id), idempotent=False)
        message = str(payload.get("message") or "") if isinstance(payload, Mapping) else ""
        return Cancelled(message=message[:_MESSAGE_MAX] or "Task cancelled")

    async def stop_recurring(self, operation_id: str) -> Stopped:
        payload = await self._send("POST", self._task_path(operation_id, "/stop-recurring"), idempotent=False)
        if not isinstance(payload, Mapping):
            payload = {}
        return Stopped(
            message=str(payload.get("message") or "Recurring task stopped")[:_MESSAGE_MAX],
            operation_id=str(payload.get("operationId") or operation_id),
            stopped_at=parse_time(payload.get("stoppedAt")),
            total_executions=_int(payload.get("totalExecutions")),
            last_execution_at=parse_time(payload.get("lastExecutionAt")),
            original_end_date=parse_time(payload.get("originalEndDate")),
        )

    async def recurring_instances(self, operation_id: str) -> Recurrence:
        payload = await self._send("GET", self._task_path(operation_id, "/recurring-instances"), idempotent=True)
        return _recurrence(payload)


class _SfpAnswers:
    """The sfp server answers with plain HTTP codes and NestJS error bodies."""

    system = SYSTEM
    name = "the sfp server"

    def __init__(self, host: str) -> None:
        self._host = host

    def answer(self, request: Request, response: Response) -> Verdict:
        status = response.status
        if status < 300:
            return OK
        if status == 401:
            return Fail(
                AuthError(
                    "it refused the bot's token (HTTP 401). Check `SFP_TOKEN` and `[sfp] url` in the bot's "
                    "configuration.",
                    system=SYSTEM,
                    status=401,
                )
            )
        if status == 403:
            return Fail(
                AuthError(
                    "the bot's token is not allowed to do that (HTTP 403). Give the token the needed role on "
                    "the sfp server, or configure another `SFP_TOKEN`.",
                    system=SYSTEM,
                    status=403,
                )
            )
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if status in (429, 503):
            # Refused before any work was done: safe to repeat, even for a submit.
            return Retry(
                TransientError(f"the sfp server is busy (HTTP {status})", system=SYSTEM, status=status), retry_after
            )
        if status >= 500:
            message = f"the sfp server answered HTTP {status}"
            if not request.idempotent:
                return Ambiguous(AmbiguousWriteError(message, system=SYSTEM, status=status))
            return Retry(TransientError(message, system=SYSTEM, status=status), retry_after)
        message = _server_message(response.body) or f"HTTP {status}"
        kind = TaskNotFoundError if status == 404 else ApiError
        return Fail(kind(message, system=SYSTEM, status=status, code=f"HTTP_{status}"))

    def lost(self, request: Request, error: Exception, *, sent: bool) -> Retry | Ambiguous:
        name = type(error).__name__
        if not sent:
            return Retry(TransientError(f"cannot connect to the sfp server at {self._host} ({name})", system=SYSTEM))
        message = f"the connection to the sfp server failed mid-request ({name})"
        if not request.idempotent:
            return Ambiguous(AmbiguousWriteError(message, system=SYSTEM))
        return Retry(TransientError(message, system=SYSTEM))


def _json(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError("the sfp server sent an answer that is not JSON", system=SYSTEM, code="BAD_ANSWER") from None
