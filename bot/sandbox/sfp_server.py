"""A simulated sfp server (flxbl sfp-pro server) Tasks API, served over real HTTP on 127.0.0.1.

The bot's real client (bot/clients/sfp.py) talks to it exactly as it would to an sfp server:

    POST   /sfp/api/tasks                                  201 {operationId, type}
    GET    /sfp/api/tasks/{id}/status                      {status, progress, error{message, stack}}
    GET    /sfp/api/tasks/{id}/result                      the same plus result
    DELETE /sfp/api/tasks/{id}                             cancel a pending or active task
    POST   /sfp/api/tasks/{id}/stop-recurring              400 already stopped or completed;
                                                           404 not found or not recurring
    GET    /sfp/api/tasks/{id}/recurring-instances

Every request needs ``Authorization: Bearer <token>`` (401 otherwise). Errors use NestJS's
shape ``{"statusCode", "message", "error"}``.

Tasks move ``pending → active → completed | failed`` (``cancelled`` by DELETE), with progress
growing over the task's duration; a task with ``scheduledFor`` stays pending until then; a
failing attempt is retried ``retryConfig.maxRetries`` times, ``retryConfig.retryDelay`` apart
(pending in between, ``attemptsMade`` counting); a recurring task starts one instance every
``recurrenceConfig.every`` (from ``scheduledFor`` or submission) until it is stopped or its
``endDate`` passes. The parent of a recurring task reports the status of its latest run.

Nothing runs in the background: each request first brings every task up to the current
(wall-clock, or injected) time, so state is a pure function of the requests and the clock.

Knobs for tests and the sandbox (attributes, changeable while running; they apply to tasks
submitted afterwards unless said otherwise):

* ``task_seconds`` / ``durations[type]``: how long one attempt takes.
* ``queue_seconds``: how long an immediate task waits in the queue before it starts.
* ``time_speedup``: divides ``every`` and ``retryDelay`` (a sandbox runs "every 1m" every few
  seconds); task durations are set directly with ``task_seconds``.
* ``fail_types[type] = n``: the first n attempts of each task of that type fail (large n = always);
  ``fail_next = n``: the next n tasks (or recurring runs) submitted fail every attempt;
  ``data["simulateFailure"] = true`` in a task's own data does the same for that task.
* ``force(method, path_regex, status, times=1, after=False)``: answer the next matching request
  with that status (before, or with ``after=True`` after, doing the work); status 0 drops the
  connection instead of answering.
* ``latency``: seconds added to every answer. ``token``: the bearer token expected (changes apply at
  once). ``forget(id)``: the server loses a task (then 404).
* ``calls`` (method, path) and ``bodies`` (submitted JSON) record what the bot sent.

Where the sfp docs are silent (priority and scheduleType values, retryConfig and
recurrenceConfig fields, the recurring-instances shape, error messages) the choices are the
ones described in bot/clients/sfp.py, and the review-environment results follow the shape of
the sfp review-environment API (assignment, sandboxName, expiresAt, environmentDetails).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from bot.sandbox.served import close, serve

TASK_TYPES = (
    "fetchReviewEnvironment",
    "checkReviewEnvironment",
    "extendReviewEnvironment",
    "transitionReviewEnvironment",
    "unassignReviewEnvironment",
    "listAssignedReviewEnvironments",
)
PRIORITIES = ("low", "normal", "high", "critical")
SCHEDULE_TYPES = ("immediate", "scheduled", "recurring")
REVIEW_ENV_REQUIRED = ("pool", "branch")
# Fetching waits for an environment from the pool; a status transition waits on Salesforce.
DEFAULT_DURATIONS = {"fetchReviewEnvironment": 4.0, "transitionReviewEnvironment": 30.0}
ALWAYS = 1_000_000

JSON = dict[str, Any]


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _parse_iso(value: Any) -> float | None:
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


class HttpError(Exception):
    def __init__(self, status: int, message: str | list[str]) -> None:
        super().__init__(str(message))
        self.status = status
        self.message = message

    def response(self) -> web.Response:
        reason = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}.get(self.status, "Error")
        return web.json_response(
            {"statusCode": self.status, "message": self.message, "error": reason}, status=self.status
        )


@dataclass
class _Attempt:
    start: float
    end: float
    fails: bool


@dataclass
class SimTask:
    operation_id: str
    type: str
    data: JSON
    priority: str
    schedule_type: str
    submitted_at: float
    start_at: float
    duration: float
    max_retries: int
    retry_delay: float
    failing_attempts: int
    lock_duration_ms: int
    parent: str | None = None
    number: int | None = None
    # recurring parents
    every: float | None = None
    end_at: float | None = None
    stopped_at: float | None = None
    instances: list[str] = field(default_factory=list)
    # the timeline of attempts, fixed at submission; a cancel cuts it short
    attempts: list[_Attempt] = field(default_factory=list)
    cancelled_at: float | None = None

    @property
    def recurring(self) -> bool:
        return self.every is not None

    def plan(self) -> None:
        start = self.start_at
        for index in range(self.max_retries + 1):
            fails = index < self.failing_attempts
            # A failing attempt gives up half-way through.
            end = start + (self.duration * 0.5 if fails else self.duration)
            self.attempts.append(_Attempt(start=start, end=end, fails=fails))
            if not fails:
                break
            start = end + self.retry_delay

    @property
    def finished_at(self) -> float:
        return self.attempts[-1].end

    @property
    def final_failed(self) -> bool:
        return self.attempts[-1].fails

    def state(self, now: float) -> JSON:
        """Status, progress, attempts made and error, as of ``now``."""
        moment = now if self.cancelled_at is None else min(now, self.cancelled_at)
        made = 0
        status, progress = "pending", 0
        error: JSON | None = None
        for attempt in self.attempts:
            if moment < attempt.start:
                break
            if moment < attempt.end:
                status = "active"
                progress = min(99, int(100 * (moment - attempt.start) / max(self.duration, 1e-6)))
                break
            made += 1
            if attempt.fails:
                error = self.error_body(made)
                status, progress = "pending", 0
            else:
                status, progress, error = "completed", 100, None
        else:
            if self.final_failed:
                status, progress = "failed", 50
        if self.cancelled_at is not None and now >= self.cancelled_at and status in {"pending", "active"}:
            status = "cancelled"
        return {"status": status, "progress": progress, "attemptsMade": made, "error": error}

    def error_body(self, attempt: int) -> JSON:
        message = f"{self.type} failed: no environment available in pool {self.data.get('pool', 'default')}"
        if self.type != "fetchReviewEnvironment":
            message = f"{self.type} failed: the sfp worker exited with code 1 (attempt {attempt})"
        return {
            "message": message,
            "stack": f"Error: {message}\n    at TaskWorker.execute (/app/dist/tasks/{self.type}.js:42:13)\n"
            "    at async Worker.processJob (/app/node_modules/bullmq/dist/cjs/classes/worker.js:455:28)",
        }


class SfpServerSim:
    """The simulated server and its knobs; ``start()`` serves it on 127.0.0.1."""

    def __init__(
        self,
        *,
        token: str | None = None,
        task_seconds: float = 1.0,
        queue_seconds: float = 0.2,
        time_speedup: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.token = token or secrets.token_urlsafe(24)
        self.task_seconds = task_seconds
        self.queue_seconds = queue_seconds
        self.durations: dict[str, float] = dict(DEFAULT_DURATIONS)
        self.time_speedup = time_speedup
        self.fail_types: dict[str, int] = {}
        # Tests set what a task type answers (e.g. a result carrying credentials).
        self.results: dict[str, Any] = {}
        self.fail_next = 0
        self.latency = 0.0
        self.clock = clock
        self.tasks: dict[str, SimTask] = {}
        self.calls: list[tuple[str, str]] = []
        self.bodies: list[JSON] = []
        self._forced: list[tuple[str, re.Pattern[str], int, bool]] = []
        self._ids = itertools.count(1_000_000_001)
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.app = web.Application(middlewares=[self._middleware])
        base = "/sfp/api/tasks"
        self.app.router.add_post(base, self._submit)
        self.app.router.add_get(base + "/{id}/status", self._status)
        self.app.router.add_get(base + "/{id}/result", self._result)
        self.app.router.add_delete(base + "/{id}", self._cancel)
        self.app.router.add_post(base + "/{id}/stop-recurring", self._stop_recurring)
        self.app.router.add_get(base + "/{id}/recurring-instances", self._instances)

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner, self.url = await serve(self.app, host=host, port=port)
        return self.url

    async def stop(self) -> None:
        await close(self._runner)
        self._runner = None

    # -- knobs ------------------------------------------------------------------------------------
    def force(self, method: str, path_regex: str, status: int, *, times: int = 1, after: bool = False) -> None:
        for _ in range(times):
            self._forced.append((method.upper(), re.compile(path_regex), status, after))

    def forget(self, operation_id: str) -> None:
        self.tasks.pop(operation_id, None)

    def reset_calls(self) -> None:
        self.calls.clear()
        self.bodies.clear()

    def task(self, operation_id: str) -> SimTask:
        """A task as of now (recurring runs due by now are started first)."""
        self._materialize(self.clock())
        return self.tasks[operation_id]

    def status_of(self, operation_id: str) -> JSON:
        self._materialize(self.clock())
        return self._view(self.tasks[operation_id], self.clock())

    # -- plumbing ---------------------------------------------------------------------------------
    def _take_forced(self, request: web.Request, *, after: bool) -> int | None:
        for index, (method, pattern, status, when_after) in enumerate(self._forced):
            if method == request.method and when_after == after and pattern.search(request.path):
                del self._forced[index]
                return status
        return None

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        self.calls.append((request.method, request.path))
        if self.latency:
            await asyncio.sleep(self.latency)
        forced = self._take_forced(request, after=False)
        if forced is not None:
            return self._forced_answer(request, forced)
        if not self._authorized(request):
            return HttpError(401, "Unauthorized").response()
        try:
            self._materialize(self.clock())
            response: web.StreamResponse = await handler(request)
        except HttpError as error:
            return error.response()
        forced = self._take_forced(request, after=True)
        if forced is not None:
            return self._forced_answer(request, forced)
        return response

    def _forced_answer(self, request: web.Request, status: int) -> web.StreamResponse:
        if status == 0:
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)  # never reaches the client: the connection is gone
        headers = {"Retry-After": "0"} if status in (429, 503) else None
        return web.json_response(
            {"statusCode": status, "message": "simulated failure", "error": "Simulated"}, status=status, headers=headers
        )

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return False
        # Compare digests so the comparison takes the same time whatever was sent.
        return hmac.compare_digest(
            hashlib.sha256(presented.strip().encode()).digest(), hashlib.sha256(self.token.encode()).digest()
        )

    def _get(self, request: web.Request) -> SimTask:
        task = self.tasks.get(request.match_info["id"])
        if task is None:
            raise HttpError(404, f"Task {request.match_info['id'][:80]} not found")
        return task

    # -- the model --------------------------------------------------------------------------------
    def _duration(self, task_type: str) -> float:
        return float(self.durations.get(task_type, self.task_seconds))

    def _failing_attempts(self, task_type: str, data: JSON) -> int:
        if self.fail_next > 0:
            self.fail_next -= 1
            return ALWAYS
        if data.get("simulateFailure") in (True, "true", "yes", "1"):
            return ALWAYS
        return int(self.fail_types.get(task_type, 0))

    def _new_task(
        self,
        *,
        task_type: str,
        data: JSON,
        now: float,
        start_at: float,
        max_retries: int,
        retry_delay: float,
        priority: str = "low",
        schedule_type: str = "immediate",
        lock_duration_ms: int = 300000,
        parent: SimTask | None = None,
        number: int | None = None,
    ) -> SimTask:
        operation_id = f"{parent.operation_id}-{number}" if parent else str(next(self._ids))
        task = SimTask(
            operation_id=operation_id,
            type=task_type,
            data=dict(data),
            priority=priority,
            schedule_type=schedule_type,
            submitted_at=now,
            start_at=start_at,
            duration=self._duration(task_type),
            max_retries=max_retries,
            retry_delay=retry_delay,
            failing_attempts=self._failing_attempts(task_type, data),
            lock_duration_ms=lock_duration_ms,
            parent=parent.operation_id if parent else None,
            number=number,
        )
        task.plan()
        self.tasks[operation_id] = task
        return task

    def _materialize(self, now: float) -> None:
        """Start the recurring runs that are due by ``now`` (deterministic in the clock)."""
        for parent in [t for t in self.tasks.values() if t.recurring]:
            while (due := self._next_run(parent)) is not None and due <= now:
                instance = self._new_task(
                    task_type=parent.type,
                    data=parent.data,
                    now=due,
                    start_at=due,
                    max_retries=parent.max_retries,
                    retry_delay=parent.retry_delay,
                    priority=parent.priority,
                    parent=parent,
                    number=len(parent.instances) + 1,
                )
                parent.instances.append(instance.operation_id)

    def _next_run(self, parent: SimTask) -> float | None:
        """When the next run starts; None once stopped or past the end date."""
        assert parent.every is not None
        due = parent.start_at + len(parent.instances) * parent.every
        if parent.stopped_at is not None and due >= parent.stopped_at:
            return None
        if parent.end_at is not None and due > parent.end_at:
            return None
        return due

    def _ended(self, parent: SimTask) -> bool:
        return parent.stopped_at is None and self._next_run(parent) is None

    def _view(self, task: SimTask, now: float) -> JSON:
        if task.recurring:
            latest = self.tasks.get(task.instances[-1]) if task.instances else None
            if latest is None:
                status = "cancelled" if task.stopped_at is not None else "pending"
                return {"status": status, "progress": 0, "error": None, "result": None}
            return self._view(latest, now)
        view = task.state(now)
        view["result"] = self._result_of(task) if view["status"] == "completed" else None
        return view

    def _result_of(self, task: SimTask) -> Any:
        if task.type in self.results:
            return self.results[task.type]
        data, when = task.data, task.finished_at
        rng = int(hashlib.sha256(task.operation_id.encode()).hexdigest()[:8], 16)
        if task.type == "fetchReviewEnvironment":
            sandbox = f"rev{rng % 100000:05d}"
            secret = hashlib.sha256(b"refresh:" + task.operation_id.encode()).hexdigest()[:24]
            lease = float(data.get("leasefor", 3600))
            return {
                "status": "environment_assigned",
                "message": f"Review environment assigned from pool {data.get('pool')}",
                "assignment": {
                    "repositoryIdentifier": data.get("repoId"),
                    "poolTag": data.get("pool"),
                    "poolType": data.get("pooltype", "sandbox"),
                    "branch": data.get("branch"),
                    "issue": data.get("issue"),
                    "sandboxName": sandbox,
                    "status": "InUse",
                    "assignedAt": _iso(when),
                    "leaseExpiresAt": _iso(when + lease),
                    "expiresAt": _iso(when + 24 * 3600),
                },
                "environmentDetails": {
                    "instanceUrl": f"https://acme--{sandbox}.sandbox.my.salesforce.com",
                    "loginUrl": "https://test.salesforce.com",
                    # A credential, as the real answer carries one: the bot must not show it.
                    "sfdxAuthUrl": f"force://PlatformCLI::5Aep861{secret}@acme--{sandbox}.sandbox.my.salesforce.com",
                },
            }
        if task.type == "listAssignedReviewEnvironments":
            return {
                "environments": [
                    {
                        "sandboxName": f"rev{(rng + n) % 100000:05d}",
                        "poolTag": data.get("pool", "core"),
                        "issue": str(100 + n),
                        "branch": f"feature/ABC-{100 + n}",
                        "status": "InUse" if n % 3 else "Available",
                        "expiresAt": _iso(when + (n + 1) * 3600),
                    }
                    for n in range(40)
                ],
                "total": 40,
            }
        if task.type == "checkReviewEnvironment":
            return {"status": "InUse", "sandboxName": f"rev{rng % 100000:05d}", "expiresAt": _iso(when + 86400)}
        return {"message": f"{task.type} completed", "completedAt": _iso(when)}

    # -- handlers ---------------------------------------------------------------------------------
    async def _submit(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            raise HttpError(400, "Request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise HttpError(400, "Request body must be an object")
        self.bodies.append(body)
        now = self.clock()
        problems: list[str] = []
        if body.get("type") not in TASK_TYPES:
            problems.append(f"type must be one of the following values: {', '.join(TASK_TYPES)}")
        if not isinstance(body.get("data"), dict):
            problems.append("data must be an object")
        priority = body.setdefault("priority", "low")
        if priority not in PRIORITIES:
            problems.append(f"priority must be one of the following values: {', '.join(PRIORITIES)}")
        schedule_type = body.setdefault("scheduleType", "immediate")
        if schedule_type not in SCHEDULE_TYPES:
            problems.append(f"scheduleType must be one of the following values: {', '.join(SCHEDULE_TYPES)}")
        scheduled_for = _parse_iso(body["scheduledFor"]) if "scheduledFor" in body else None
        if "scheduledFor" in body and scheduled_for is None:
            problems.append("scheduledFor must be a valid ISO 8601 date string")
        if schedule_type == "scheduled" and scheduled_for is None:
            problems.append("scheduledFor is required when scheduleType is scheduled")
        lock = body.get("lockDuration", 300000)
        if not isinstance(lock, int) or lock < 1000:
            problems.append("lockDuration must not be less than 1000")
        retry = body.get("retryConfig")
        if retry is not None:
            if (
                not isinstance(retry, dict)
                or not isinstance(retry.get("maxRetries"), int)
                or not 0 <= retry["maxRetries"] <= 10
            ):
                problems.append("retryConfig.maxRetries must be an integer from 0 to 10")
        recurrence = body.get("recurrenceConfig")
        every = end_at = None
        if schedule_type == "recurring":
            if (
                not isinstance(recurrence, dict)
                or not isinstance(recurrence.get("every"), int)
                or recurrence["every"] < 60000
            ):
                problems.append("recurrenceConfig.every must be an integer of at least 60000 (ms)")
            else:
                every = recurrence["every"] / 1000.0 / max(self.time_speedup, 1e-6)
                if "endDate" in recurrence:
                    end_at = _parse_iso(recurrence["endDate"])
                    if end_at is None:
                        problems.append("recurrenceConfig.endDate must be a valid ISO 8601 date string")
        elif recurrence is not None:
            problems.append("recurrenceConfig is only allowed when scheduleType is recurring")
        if body.get("type") == "fetchReviewEnvironment" and isinstance(body.get("data"), dict):
            for name in REVIEW_ENV_REQUIRED:
                if not body["data"].get(name):
                    problems.append(f"data.{name} is required for fetchReviewEnvironment")
        if problems:
            raise HttpError(400, problems)
        start_at = max(scheduled_for if scheduled_for is not None else now + self.queue_seconds, now)
        max_retries = int((retry or {}).get("maxRetries", 0))
        retry_delay = float((retry or {}).get("retryDelay", 1000)) / 1000.0 / max(self.time_speedup, 1e-6)
        if schedule_type == "recurring":
            task = SimTask(
                operation_id=str(next(self._ids)),
                type=body["type"],
                data=dict(body["data"]),
                priority=priority,
                schedule_type="recurring",
                submitted_at=now,
                start_at=start_at,
                duration=self._duration(body["type"]),
                max_retries=max_retries,
                retry_delay=retry_delay,
                failing_attempts=0,
                lock_duration_ms=int(lock),
                every=every,
                end_at=end_at,
            )
            self.tasks[task.operation_id] = task
        else:
            task = self._new_task(
                task_type=body["type"],
                data=body["data"],
                now=now,
                start_at=start_at,
                max_retries=max_retries,
                retry_delay=retry_delay,
                priority=priority,
                schedule_type=schedule_type,
                lock_duration_ms=int(lock),
            )
        return web.json_response({"operationId": task.operation_id, "type": task.type}, status=201)

    async def _status(self, request: web.Request) -> web.Response:
        view = self._view(self._get(request), self.clock())
        view.pop("result", None)
        return web.json_response(view)

    async def _result(self, request: web.Request) -> web.Response:
        return web.json_response(self._view(self._get(request), self.clock()))

    async def _cancel(self, request: web.Request) -> web.Response:
        task = self._get(request)
        now = self.clock()
        if task.recurring:
            # Cancels the run in progress; future runs need stop-recurring (as documented).
            running = [
                self.tasks[i] for i in task.instances if self.tasks[i].state(now)["status"] in {"pending", "active"}
            ]
            if not running:
                raise HttpError(400, "Task has no execution in progress; use stop-recurring to stop future executions")
            for instance in running:
                instance.cancelled_at = now
            return web.json_response({"message": "Task cancelled successfully", "operationId": task.operation_id})
        status = task.state(now)["status"]
        if status not in {"pending", "active"}:
            raise HttpError(400, f"Task cannot be cancelled: it is already {status}")
        task.cancelled_at = now
        return web.json_response({"message": "Task cancelled successfully", "operationId": task.operation_id})

    async def _stop_recurring(self, request: web.Request) -> web.Response:
        task = self.tasks.get(request.match_info["id"])
        if task is None or not task.recurring:
            raise HttpError(404, "Task not found or is not a recurring task")
        now = self.clock()
        if task.stopped_at is not None:
            raise HttpError(400, "Recurring task is already stopped")
        if self._ended(task):
            raise HttpError(400, "Recurring task has already completed")
        task.stopped_at = now
        last = self.tasks[task.instances[-1]].start_at if task.instances else None
        return web.json_response(
            {
                "message": "Recurring task stopped successfully",
                "operationId": task.operation_id,
                "stoppedAt": _iso(now),
                "totalExecutions": len(task.instances),
                "lastExecutionAt": _iso(last),
                "originalEndDate": _iso(task.end_at),
            }
        )

    async def _instances(self, request: web.Request) -> web.Response:
        task = self.tasks.get(request.match_info["id"])
        if task is None or not task.recurring:
            raise HttpError(404, "Task not found or is not a recurring task")
        now = self.clock()
        instances = []
        for operation_id in task.instances:
            instance = self.tasks[operation_id]
            view = instance.state(now)
            finished = None
            if view["status"] in {"completed", "failed"}:
                finished = instance.finished_at
            elif view["status"] == "cancelled":
                finished = instance.cancelled_at
            instances.append(
                {
                    "operationId": operation_id,
                    "executionNumber": instance.number,
                    "status": view["status"],
                    "progress": view["progress"],
                    "scheduledFor": _iso(instance.start_at),
                    "startedAt": _iso(instance.attempts[0].start) if view["status"] != "pending" else None,
                    "finishedAt": _iso(finished),
                    "error": {"message": view["error"]["message"]} if view["error"] else None,
                }
            )
        next_run = self._next_run(task)
        return web.json_response(
            {
                "operationId": task.operation_id,
                "type": task.type,
                "isActive": next_run is not None,
                "nextExecutionAt": _iso(next_run),
                "endDate": _iso(task.end_at),
                "stoppedAt": _iso(task.stopped_at),
                "totalExecutions": len(task.instances),
                "instances": instances,
            }
        )
