"""A simulated Salesforce org served over real HTTP on 127.0.0.1.

The bot's real Salesforce client talks to this server exactly as it would to Salesforce, so the
wire formats follow the Salesforce docs: OAuth 2.0 token endpoint (refresh token and JWT bearer
grants), REST query with paging and relationship/aggregate results, sObject create / retrieve /
update, sObject Collections create, and Bulk API 2.0 ingest. A packaging org is seeded with
packages, versions and a few thousand subscribers (``org_data``) and runs push upgrades:

    PackagePushRequest  Created -> Pending -> In Progress -> Succeeded | Failed
                        Created | Pending -> Canceled
    PackagePushJob      Created -> Pending -> In Progress -> Succeeded | Failed
                        Created | Pending -> Canceled (or "Cancelled", see cancelled_spelling)

Nothing runs in the background: every HTTP request first advances pushes and bulk jobs to the
current (wall-clock, or injected) time, so state is a pure function of the requests made and
the clock. Push jobs run in parallel lanes (50 by default), each taking ``job_seconds``.

Where the docs are silent (error codes of refused push jobs, the request status when only some
jobs fail, ...), the choice made is written next to the code that makes it.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import hmac
import io
import json
import math
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jwt
from aiohttp import web

from bot.sandbox import org_data
from bot.sandbox.metadata_api import MetadataApiSim
from bot.sandbox.org_data import PUSH_ERROR_KINDS, IdFactory, PushErrorKind, format_sf_datetime
from bot.sandbox.served import close, serve
from bot.sandbox.soql import SoqlError, Table, id15, parse_sf_datetime, run_query

Row = dict[str, Any]

LANES = 50  # push jobs Salesforce runs at once for one request, in this simulation
QUERY_BATCH_SIZE = 2000  # REST query page size (Sforce-Query-Options batchSize may lower it)
COLLECTION_LIMIT = 200  # records per sObject Collections call
BULK_SECONDS_PER_10K = 0.3  # simulated Bulk API 2.0 processing speed
BULK_CHUNK = 200  # Bulk API commits records in chunks of this size
MAX_LOCATORS = 256  # open query cursors kept; older ones answer INVALID_QUERY_LOCATOR
FIRST_API_VERSION = 31

REQUEST_STATUSES = ("Created", "Pending", "In Progress", "Succeeded", "Failed", "Canceled")
BULK_DELIMITERS = {"COMMA": ",", "TAB": "\t", "PIPE": "|", "SEMICOLON": ";", "CARET": "^", "BACKQUOTE": "`"}
INSERTABLE = ("PackagePushRequest", "PackagePushJob")
_ID_RE = re.compile(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?")
_ORG_KEY_RE = re.compile(r"00D[A-Za-z0-9]{12}(?:[A-Za-z0-9]{3})?")

MAINTENANCE_PAGE = """<!DOCTYPE html>
<html><head><title>Salesforce - Down For Maintenance</title></head>
<body><h1>Down For Maintenance</h1>
<p>This instance is currently undergoing scheduled maintenance. Please try again later.</p>
</body></html>
"""
GATEWAY_PAGE = "<html><head><title>{status} Gateway Error</title></head><body>{status}</body></html>\n"


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answer in Salesforce's REST shape: a JSON list of {message, errorCode[, fields]}."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        fields: list[str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: list[Row] = [error_body(code, message, fields)]
        self.headers = dict(headers or {})


class RecordError(Exception):
    """One record refused by a create or update (a SaveResult error)."""

    def __init__(self, code: str, message: str, fields: list[str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields = fields or []

    def as_api_error(self) -> ApiError:
        return ApiError(400, self.code, self.message, fields=self.fields)

    def as_save_error(self) -> Row:
        return {"statusCode": self.code, "message": self.message, "fields": self.fields}

    def as_bulk_error(self) -> str:
        """Bulk API 2.0 sf__Error text: CODE:message:fields -- (or CODE:message:-- with no fields)."""
        return (
            f"{self.code}:{self.message}:{','.join(self.fields)} --"
            if self.fields
            else f"{self.code}:{self.message}:--"
        )


def error_body(code: str, message: str, fields: list[str] | None = None) -> Row:
    body: Row = {"message": message, "errorCode": code}
    if fields is not None:
        body["fields"] = fields
    return body


def not_found() -> ApiError:
    return ApiError(404, "NOT_FOUND", "The requested resource does not exist")


def parse_datetime_input(value: Any, field_name: str) -> str | None:
    """A dateTime from a JSON body, stored in Salesforce's output format; GMT when no zone."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise RecordError(
            "JSON_PARSER_ERROR",
            f"Cannot deserialize instance of datetime from VALUE_STRING value {value} or request may "
            f"be missing a required field",
            [field_name],
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return format_sf_datetime(moment)


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from the parts, for seeded choices without shared state."""
    digest = hashlib.sha256("|".join(str(part) for part in parts).encode()).hexdigest()
    return int(digest[:13], 16) / 16**13


# --------------------------------------------------------------------------- push state


def _error_id(*parts: object) -> str:
    """A Salesforce support ErrorId ("1934261182-77421 (-1093283713)"): different for every failure."""
    first, second, third = (int(_unit(*parts, n) * 10**k) for n, k in ((1, 10), (2, 5), (3, 10)))
    return f"{first}-{second} (-{third})"


@dataclass
class _PushRun:
    """Runtime of one push request once it is Pending."""

    start_at: float
    job_ids: list[str] = field(default_factory=list)
    started_at: float | None = None  # when it went In Progress
    started: int = 0  # jobs moved to In Progress so far (in creation order)
    finished: int = 0  # jobs finished so far
    failed: int = 0


@dataclass(frozen=True)
class _JobPlan:
    attempt: int
    error: PushErrorKind | None
    text_index: int


class PackagingState:
    """Records of the org and the rules that change them; knows nothing about HTTP."""

    def __init__(
        self,
        *,
        ids: IdFactory,
        tables: dict[str, Table],
        refuse_org_keys: dict[str, str],
        user_id: str,
        clock: Callable[[], float],
        seed: int,
        failure_rate: float,
        job_seconds: float,
        lanes: int,
        cancelled_spelling: bool,
    ) -> None:
        self.ids = ids
        self.tables = tables
        self.refuse_org_keys = refuse_org_keys
        self.user_id = user_id
        self.clock = clock
        self.seed = seed
        self.failure_rate = failure_rate
        self.job_seconds = job_seconds
        self.lanes = lanes
        self.job_canceled = "Cancelled" if cancelled_spelling else "Canceled"
        self._runs: dict[str, _PushRun] = {}  # request id15 -> run, while Pending / In Progress
        self._request_orgs: dict[str, dict[str, str]] = {}  # request id15 -> org id15 -> job id
        self._plans: dict[str, _JobPlan] = {}  # job id15 -> outcome decided when the push starts
        self._attempts: dict[tuple[str, str], int] = {}  # (org id15, version id15) -> attempts run

    # ---- lookups

    def table(self, sobject: str) -> Table:
        return self.tables[sobject]

    def _now_text(self) -> str:
        return format_sf_datetime(self.clock())

    def _version_label(self, version: Row) -> str:
        return f"{version['MajorVersion']}.{version['MinorVersion']}.{version['PatchVersion']}"

    def _version_tuple(self, version: Row | None) -> tuple[int, int, int]:
        if version is None:
            return (0, 0, 0)
        return (version["MajorVersion"], version["MinorVersion"], version["PatchVersion"])

    def subscriber(self, org_key: str, package_id: str) -> Row | None:
        for row in self.table("PackageSubscriber").lookup("OrgKey", [id15(org_key)]):
            if id15(row["MetadataPackageId"]) == id15(package_id):
                return row
        return None

    def jobs_of(self, request_id: str) -> list[Row]:
        return self.table("PackagePushJob").lookup("PackagePushRequestId", [request_id])

    # ---- create

    def prepare(self, sobject: str, fields: Mapping[str, Any], batch: set[tuple[str, str]]) -> Row:
        """Validate a new record and return its row (without Id); RecordError if refused.

        batch holds (request, org) pairs already accepted earlier in the same call, so that
        duplicates inside one sObject Collections call are caught before anything is saved.
        """
        if sobject == "PackagePushRequest":
            return self._prepare_request(fields)
        if sobject == "PackagePushJob":
            return self._prepare_job(fields, batch)
        raise RecordError("INVALID_TYPE_FOR_OPERATION", f"entity type cannot be inserted: {sobject}")

    def commit(self, sobject: str, row: Row) -> str:
        row = {"Id": self.ids.new(sobject), **row}
        self.table(sobject).insert(row)
        if sobject == "PackagePushJob":
            orgs = self._request_orgs.setdefault(id15(row["PackagePushRequestId"]), {})
            orgs[id15(row["SubscriberOrganizationKey"])] = row["Id"]
        return str(row["Id"])

    def create(self, sobject: str, fields: Mapping[str, Any]) -> str:
        return self.commit(sobject, self.prepare(sobject, fields, set()))

    def _check_fields(self, sobject: str, fields: Mapping[str, Any], writable: set[str]) -> dict[str, Any]:
        """Canonical field names; unknown fields are INVALID_FIELD, read-only ones refused."""
        schema = self.table(sobject).schema
        canonical: dict[str, Any] = {}
        for name, value in fields.items():
            if name == "attributes":
                continue
            known = schema.field_named(name)
            if known is None:
                raise RecordError("INVALID_FIELD", f"No such column '{name}' on sobject of type {sobject}")
            if known not in writable:
                raise RecordError(
                    "INVALID_FIELD_FOR_INSERT_UPDATE",
                    f"Unable to create/update fields: {known}. Please check the security settings of "
                    "this field and verify that it is read/write for your profile or permission set.",
                    [known],
                )
            canonical[known] = None if value == "" else value
        return canonical

    def _require(self, fields: Mapping[str, Any], *names: str) -> None:
        missing = [name for name in names if fields.get(name) in (None, "")]
        if missing:
            raise RecordError("REQUIRED_FIELD_MISSING", f"Required fields are missing: [{', '.join(missing)}]", missing)

    def _check_initial_status(self, fields: Mapping[str, Any]) -> None:
        """The docs say not to set Status on create; only the default Created is accepted."""
        if fields.get("Status") not in (None, "Created"):
            raise RecordError(
                "FIELD_INTEGRITY_EXCEPTION", "Status must be Created when the record is created", ["Status"]
            )

    def _prepare_request(self, fields: Mapping[str, Any]) -> Row:
        values = self._check_fields("PackagePushRequest", fields, {"PackageVersionId", "ScheduledStartTime", "Status"})
        self._require(values, "PackageVersionId")
        self._check_initial_status(values)
        version = self._pushable_version(str(values["PackageVersionId"]))
        now = self._now_text()
        return {
            "PackageVersionId": version["Id"],
            "Status": "Created",
            "ScheduledStartTime": parse_datetime_input(values.get("ScheduledStartTime"), "ScheduledStartTime"),
            "StartTime": None,
            "EndTime": None,
            "DurationSeconds": None,
            "CreatedDate": now,
            "CreatedById": self.user_id,
            "SystemModstamp": now,
        }

    def _pushable_version(self, version_id: str) -> Row:
        """Docs: 'the non-beta, non-deprecated package version that the package is being upgraded to'.
        The errorCode for a version that is not one is not documented: FIELD_INTEGRITY_EXCEPTION."""
        version = self.table("MetadataPackageVersion").get(version_id) if _ID_RE.fullmatch(version_id) else None
        fields = ["PackageVersionId"]
        if version is None:
            raise RecordError(
                "FIELD_INTEGRITY_EXCEPTION", f"Package version {version_id} does not exist in this organization", fields
            )
        label = self._version_label(version)
        if version["ReleaseState"] != "Released":
            raise RecordError(
                "FIELD_INTEGRITY_EXCEPTION",
                f"Package version {label} is a {version['ReleaseState']} version; only released versions can be pushed",
                fields,
            )
        if version["IsDeprecated"]:
            raise RecordError(
                "FIELD_INTEGRITY_EXCEPTION", f"Package version {label} is deprecated and can't be pushed", fields
            )
        return version

    def _prepare_job(self, fields: Mapping[str, Any], batch: set[tuple[str, str]]) -> Row:
        values = self._check_fields(
            "PackagePushJob", fields, {"PackagePushRequestId", "SubscriberOrganizationKey", "Status"}
        )
        self._require(values, "PackagePushRequestId", "SubscriberOrganizationKey")
        self._check_initial_status(values)
        request = self._open_request(str(values["PackagePushRequestId"]))
        org_key = str(values["SubscriberOrganizationKey"])
        self._check_eligible(org_key, request)
        pair = (id15(request["Id"]), id15(org_key))
        self._check_not_duplicate(pair, batch)
        batch.add(pair)
        now = self._now_text()
        return {
            "PackagePushRequestId": request["Id"],
            "SubscriberOrganizationKey": org_key,
            "Status": "Created",
            "StartTime": None,
            "EndTime": None,
            "DurationSeconds": None,
            "CreatedDate": now,
            "SystemModstamp": now,
        }

    def _open_request(self, request_id: str) -> Row:
        fields = ["PackagePushRequestId"]
        if not _ID_RE.fullmatch(request_id):
            raise RecordError(
                "MALFORMED_ID", f"Package Push Request ID: id value of incorrect type: {request_id}", fields
            )
        request = self.table("PackagePushRequest").get(request_id)
        if request is None:
            raise RecordError("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", fields)
        if request["Status"] != "Created":
            # Not documented; FIELD_INTEGRITY_EXCEPTION as for the other push rules.
            raise RecordError(
                "FIELD_INTEGRITY_EXCEPTION",
                f"Push jobs can only be added to a push request in status Created; "
                f"{request['Id']} is {request['Status']}",
                fields,
            )
        return request

    def _check_eligible(self, org_key: str, request: Row) -> None:
        """Why an org can't be pushed to. The object reference lists none of these errors (it only
        says Inactive orgs can't receive push upgrades), so each is a FIELD_INTEGRITY_EXCEPTION
        on SubscriberOrganizationKey whose message says why."""
        fields = ["SubscriberOrganizationKey"]

        def refuse(message: str) -> RecordError:
            return RecordError("FIELD_INTEGRITY_EXCEPTION", message, fields)

        if not _ORG_KEY_RE.fullmatch(org_key):
            raise refuse(f"Invalid organization key: {org_key}")
        target = self.table("MetadataPackageVersion").get(request["PackageVersionId"])
        assert target is not None  # a request is only created for an existing version
        package = self.table("MetadataPackage").get(target["MetadataPackageId"])
        package_name = package["Name"] if package else target["MetadataPackageId"]
        subscriber = self.subscriber(org_key, target["MetadataPackageId"])
        if subscriber is None:
            raise refuse(f"Organization {org_key} is not a subscriber of package {package_name}")
        if subscriber["InstalledStatus"] != "i":
            raise refuse(f"Package {package_name} is not installed in organization {org_key}")
        if subscriber["OrgStatus"] == "Inactive":
            raise refuse(f"Organization {org_key} is inactive and can't receive push upgrades")
        installed = self.table("MetadataPackageVersion").get(subscriber["MetadataPackageVersionId"])
        if self._version_tuple(installed) >= self._version_tuple(target):
            raise refuse(
                f"Organization {org_key} already has version "
                f"{self._version_label(installed) if installed else '?'} of {package_name}, "
                f"which is not older than {self._version_label(target)}"
            )
        reason = {id15(key): text for key, text in self.refuse_org_keys.items()}.get(id15(org_key))
        if reason:
            raise refuse(reason)

    def _check_not_duplicate(self, pair: tuple[str, str], batch: set[tuple[str, str]]) -> None:
        existing = self._request_orgs.get(pair[0], {}).get(pair[1])
        if existing:
            raise RecordError(
                "DUPLICATE_VALUE",
                f"duplicate value found: SubscriberOrganizationKey duplicates value on record with id: {existing}",
                ["SubscriberOrganizationKey"],
            )
        if pair in batch:
            # Salesforce's wording when the duplicate is in the same call and has no id yet.
            raise RecordError(
                "DUPLICATE_VALUE",
                "duplicate value found: <unknown> duplicates value on record with id: <unknown>",
                ["SubscriberOrganizationKey"],
            )

    # ---- update (PATCH of a push request)

    def update_request(self, request_id: str, fields: Mapping[str, Any]) -> None:
        request = self.table("PackagePushRequest").get(request_id)
        if request is None:
            raise not_found()
        values = self._check_fields("PackagePushRequest", fields, {"Status", "ScheduledStartTime"})
        if "ScheduledStartTime" in values:
            self._reschedule(request, values["ScheduledStartTime"])
        if "Status" in values:
            self._change_status(request, values["Status"])

    def _invalid_transition(self, message: str) -> RecordError:
        """The docs define the statuses but not the error for a forbidden change; INVALID_OPERATION
        (a documented REST StatusCode) on the Status field is this sandbox's choice."""
        return RecordError("INVALID_OPERATION", message, ["Status"])

    def _reschedule(self, request: Row, value: Any) -> None:
        if request["Status"] not in ("Created", "Pending"):
            raise self._invalid_transition(
                f"ScheduledStartTime can't be changed once the push request is {request['Status']}"
            )
        request["ScheduledStartTime"] = parse_datetime_input(value, "ScheduledStartTime")
        request["SystemModstamp"] = self._now_text()
        run = self._runs.get(id15(request["Id"]))
        if run is not None:
            run.start_at = self._start_time(request, pending_at=self.clock())

    def _change_status(self, request: Row, status: Any) -> None:
        if status not in REQUEST_STATUSES:
            raise RecordError(
                "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                f"Status: bad value for restricted picklist field: {status}",
                ["Status"],
            )
        current = request["Status"]
        if status == current and status in ("Pending", "Canceled"):
            return  # repeating a change that already happened is harmless
        if status == "Pending" and current == "Created":
            self._schedule(request)
        elif status == "Canceled" and current in ("Created", "Pending"):
            self._cancel(request)
        elif status not in ("Pending", "Canceled"):
            raise self._invalid_transition(f"Status can only be set to Pending or Canceled, not {status}")
        else:
            raise self._invalid_transition(
                f"A push request in status {current} can't be set to {status}; only requests in status "
                "Created or Pending can be scheduled or canceled"
            )

    def _start_time(self, request: Row, *, pending_at: float) -> float:
        """A push starts when it is Pending and its ScheduledStartTime (none = now) has passed."""
        scheduled = request["ScheduledStartTime"]
        if scheduled is None:
            return pending_at
        return max(pending_at, parse_sf_datetime(scheduled).timestamp())

    def _schedule(self, request: Row) -> None:
        jobs = self.jobs_of(request["Id"])
        if not jobs:
            raise self._invalid_transition("A push request needs at least one push job before it can be set to Pending")
        now = self.clock()
        run = _PushRun(start_at=self._start_time(request, pending_at=now), job_ids=[job["Id"] for job in jobs])
        self._runs[id15(request["Id"])] = run
        stamp = format_sf_datetime(now)
        request.update(Status="Pending", SystemModstamp=stamp)
        for job in jobs:
            job.update(Status="Pending", SystemModstamp=stamp)

    def _cancel(self, request: Row) -> None:
        stamp = self._now_text()
        request.update(Status="Canceled", SystemModstamp=stamp)
        for job in self.jobs_of(request["Id"]):
            job.update(Status=self.job_canceled, SystemModstamp=stamp)
        self._runs.pop(id15(request["Id"]), None)

    # ---- running pushes

    def advance(self, now: float) -> None:
        """Bring every Pending / In Progress push up to time now."""
        requests = self.table("PackagePushRequest")
        for key, run in list(self._runs.items()):
            request = requests.get(key)
            assert request is not None
            if request["Status"] == "Pending":
                if now < run.start_at:
                    continue
                self._begin(request, run)
            self._progress(request, run, now)

    def _begin(self, request: Row, run: _PushRun) -> None:
        run.started_at = run.start_at
        request.update(
            Status="In Progress",
            StartTime=format_sf_datetime(run.start_at),
            SystemModstamp=format_sf_datetime(run.start_at),
        )
        version_key = id15(request["PackageVersionId"])
        jobs = self.table("PackagePushJob")
        for job_id in run.job_ids:
            job = jobs.get(job_id)
            assert job is not None
            org = id15(job["SubscriberOrganizationKey"])
            attempt = self._attempts.get((org, version_key), 0) + 1
            self._plans[id15(job_id)] = self._plan(org, version_key, attempt)

    def _plan(self, org: str, version_key: str, attempt: int) -> _JobPlan:
        """Whether a job fails is decided from (seed, org, version, attempt). The error type is
        fixed per org, so sticky errors (IneligibleUpgrade, FeatureMissing) fail every retry while
        transient ones (LockingFailure, LimitExceeded, UnclassifiedError) mostly succeed."""
        weights = [kind.weight for kind in PUSH_ERROR_KINDS]
        pick = _unit(self.seed, org, "type") * sum(weights)
        kind = PUSH_ERROR_KINDS[-1]
        for candidate, weight in zip(PUSH_ERROR_KINDS, weights, strict=True):
            if pick < weight:
                kind = candidate
                break
            pick -= weight
        chance = self.failure_rate if attempt == 1 else kind.retry_failure_rate
        fails = _unit(self.seed, org, version_key, attempt) < chance
        text_index = int(_unit(self.seed, org, "text") * len(kind.texts))
        return _JobPlan(attempt, kind if fails else None, text_index)

    def _slot_times(self, run: _PushRun, index: int) -> tuple[float, float]:
        assert run.started_at is not None
        start = run.started_at + (index // self.lanes) * self.job_seconds
        return start, start + self.job_seconds

    def _progress(self, request: Row, run: _PushRun, now: float) -> None:
        assert run.started_at is not None
        total = len(run.job_ids)
        if self.job_seconds <= 0:
            slots_done = math.inf
        else:
            slots_done = math.floor((now - run.started_at) / self.job_seconds)
        finished_target = int(min(total, slots_done * self.lanes))
        started_target = int(min(total, (slots_done + 1) * self.lanes))
        jobs = self.table("PackagePushJob")
        for index in range(run.started, started_target):
            start, _ = self._slot_times(run, index)
            job = jobs.get(run.job_ids[index])
            assert job is not None
            job.update(
                Status="In Progress", StartTime=format_sf_datetime(start), SystemModstamp=format_sf_datetime(start)
            )
        run.started = max(run.started, started_target)
        for index in range(run.finished, finished_target):
            self._finish_job(request, run, index)
        run.finished = max(run.finished, finished_target)
        if run.finished == total:
            self._finish_request(request, run)

    def _finish_job(self, request: Row, run: _PushRun, index: int) -> None:
        start, end = self._slot_times(run, index)
        job = self.table("PackagePushJob").get(run.job_ids[index])
        assert job is not None
        plan = self._plans.pop(id15(job["Id"]))
        org = id15(job["SubscriberOrganizationKey"])
        version_key = id15(request["PackageVersionId"])
        self._attempts[(org, version_key)] = plan.attempt
        stamp = format_sf_datetime(end)
        job.update(
            StartTime=format_sf_datetime(start), EndTime=stamp, DurationSeconds=round(end - start), SystemModstamp=stamp
        )
        if plan.error is None:
            job["Status"] = "Succeeded"
            self._upgrade_subscriber(org, request["PackageVersionId"], stamp)
            return
        job["Status"] = "Failed"
        run.failed += 1
        self._record_error(job, request, plan, stamp)

    def _upgrade_subscriber(self, org: str, version_id: str, stamp: str) -> None:
        version = self.table("MetadataPackageVersion").get(version_id)
        assert version is not None
        subscriber = self.subscriber(org, version["MetadataPackageId"])
        if subscriber is not None:
            subscriber.update(MetadataPackageVersionId=version["Id"], SystemModstamp=stamp)

    def _record_error(self, job: Row, request: Row, plan: _JobPlan, stamp: str) -> None:
        assert plan.error is not None
        version = self.table("MetadataPackageVersion").get(request["PackageVersionId"])
        assert version is not None
        package = self.table("MetadataPackage").get(version["MetadataPackageId"])
        title, message, details = plan.error.texts[plan.text_index]
        values = {
            "package": package["Name"] if package else "the package",
            "org": job["SubscriberOrganizationKey"],
            "version": self._version_label(version),
            "error_id": _error_id(self.seed, job["Id"]),
        }
        self.commit(
            "PackagePushError",
            {
                "PackagePushJobId": job["Id"],
                "ErrorSeverity": "Error",
                "ErrorType": plan.error.error_type,
                "ErrorTitle": title.format(**values),
                "ErrorMessage": message.format(**values),
                "ErrorDetails": details.format(**values),
                "SystemModstamp": stamp,
            },
        )

    def _finish_request(self, request: Row, run: _PushRun) -> None:
        """The object reference lists Succeeded and Failed but does not say which a push with
        some failed jobs ends in; this sandbox says Failed as soon as any job failed."""
        assert run.started_at is not None
        end = run.started_at + math.ceil(len(run.job_ids) / self.lanes) * self.job_seconds
        stamp = format_sf_datetime(end)
        request.update(
            Status="Failed" if run.failed else "Succeeded",
            EndTime=stamp,
            DurationSeconds=round(end - run.started_at),
            SystemModstamp=stamp,
        )
        self._runs.pop(id15(request["Id"]), None)


# --------------------------------------------------------------------------- Bulk API 2.0 ingest


@dataclass
class _BulkResult:
    row: list[str]
    record_id: str | None = None
    error: str | None = None


@dataclass
class BulkJob:
    """One Bulk API 2.0 ingest job and the records it has processed so far."""

    id: str
    sobject: str
    operation: str
    line_ending: str
    column_delimiter: str
    api_version: str
    created: float
    created_by: str
    state: str = "Open"
    modified: float = 0.0
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    uploaded: bool = False
    closed_at: float | None = None
    processed: int = 0
    results: list[_BulkResult] = field(default_factory=list)
    error_message: str | None = None
    fail_after: int | None = None  # an injected fault: the job ends Failed once this many rows are done

    @property
    def failed(self) -> int:
        return sum(1 for result in self.results if result.error is not None)

    @property
    def duration(self) -> float:
        return max(0.05, BULK_SECONDS_PER_10K * len(self.rows) / 10_000)

    def info(self, *, full: bool) -> Row:
        """Job info as the Bulk API 2.0 returns it; full adds the processing counters."""
        body: Row = {
            "id": self.id,
            "operation": self.operation,
            "object": self.sobject,
            "createdById": self.created_by,
            "createdDate": format_sf_datetime(self.created),
            "systemModstamp": format_sf_datetime(self.modified or self.created),
            "state": self.state,
            "concurrencyMode": "Parallel",
            "contentType": "CSV",
            "apiVersion": float(self.api_version),
            "jobType": "V2Ingest",
            "contentUrl": f"services/data/v{self.api_version}/jobs/ingest/{self.id}/batches",
            "lineEnding": self.line_ending,
            "columnDelimiter": self.column_delimiter,
        }
        if full:
            elapsed_ms = int(self.duration * 1000) if self.state == "JobComplete" else 0
            body.update(
                numberRecordsProcessed=self.processed,
                numberRecordsFailed=self.failed,
                retries=0,
                totalProcessingTime=elapsed_ms,
                apiActiveProcessingTime=elapsed_ms,
                apexProcessingTime=0,
            )
            if self.error_message:
                body["errorMessage"] = self.error_message
        return body


def bulk_error(status: int, code: str, message: str) -> ApiError:
    return ApiError(status, code, message)


class BulkIngest:
    """Bulk API 2.0 ingest jobs: Open -> UploadComplete -> InProgress -> JobComplete | Failed,
    or Aborted. Records are created in chunks of 200 as simulated processing time passes."""

    def __init__(self, state: PackagingState) -> None:
        self.state = state
        self.jobs: dict[str, BulkJob] = {}
        # Faults for the next jobs to start processing: (rows done before Failed, errorMessage or None).
        self.failures: list[tuple[int, str | None]] = []

    def job(self, job_id: str) -> BulkJob:
        job = self.jobs.get(id15(job_id)) if _ID_RE.fullmatch(job_id) else None
        if job is None:
            raise not_found()
        return job

    def create(self, body: Mapping[str, Any], api_version: str) -> BulkJob:
        sobject = self._insertable_object(str(body.get("object") or ""))
        if body.get("operation") != "insert":
            raise bulk_error(
                400,
                "INVALIDJOB",
                f"InvalidJob : Operation {body.get('operation')!r} is not supported for {sobject}; only insert is",
            )
        if body.get("contentType", "CSV") != "CSV":
            raise bulk_error(400, "INVALIDJOB", "InvalidJob : contentType must be CSV")
        line_ending = body.get("lineEnding", "LF")
        delimiter = body.get("columnDelimiter", "COMMA")
        if line_ending not in ("LF", "CRLF") or delimiter not in BULK_DELIMITERS:
            raise bulk_error(400, "INVALIDJOB", "InvalidJob : unsupported lineEnding or columnDelimiter")
        now = self.state.clock()
        job = BulkJob(
            self.state.ids.new("BulkJob"),
            sobject,
            "insert",
            line_ending,
            delimiter,
            api_version,
            now,
            self.state.user_id,
            modified=now,
        )
        self.jobs[id15(job.id)] = job
        return job

    def _insertable_object(self, name: str) -> str:
        for sobject in INSERTABLE:
            if sobject.lower() == name.lower():
                return sobject
        if name.lower() in {known.lower() for known in self.state.tables}:
            raise bulk_error(
                400, "INVALIDJOB", f"InvalidJob : Entity '{name}' is not supported by the Bulk API for insert"
            )
        raise bulk_error(400, "INVALIDJOB", f"InvalidJob : Unable to find object: {name}")

    def upload(self, job: BulkJob, content_type: str, data: bytes) -> None:
        # The docs require Content-Type: text/csv for job data; the error for another type is
        # not documented, so it is answered like other bad batch data.
        if not content_type.startswith("text/csv"):
            raise bulk_error(400, "INVALIDBATCH", "InvalidBatch : Content-Type must be text/csv")
        if job.state != "Open":
            raise bulk_error(409, "INVALIDJOBSTATE", f"Job {job.id} is not Open; it is {job.state}")
        if job.uploaded:
            raise bulk_error(
                400,
                "INVALIDJOBSTATE",
                f"Found multiple contents for job: <{job.id}>, please 'Close' / 'Abort' / "
                "'Delete' the current Job then create a new Job and make sure you only "
                "do 'PUT' once on a given Job.",
            )
        job.uploaded = True
        job.modified = self.state.clock()
        text = data.decode("utf-8-sig")
        if job.line_ending == "LF" and "\r\n" in text:
            job.error_message = f"LineEnding is invalid on user data. Current LineEnding setting is {job.line_ending}"
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=BULK_DELIMITERS[job.column_delimiter])
        rows = [row for row in reader if any(cell.strip() for cell in row)]
        job.header, job.rows = (rows[0], rows[1:]) if rows else ([], [])

    def change_state(self, job: BulkJob, wanted: Any) -> None:
        now = self.state.clock()
        if wanted == "UploadComplete" and job.state == "Open":
            job.state, job.closed_at, job.modified = "UploadComplete", now, now
        elif wanted == "Aborted" and job.state in ("Open", "UploadComplete", "InProgress"):
            job.state, job.modified = "Aborted", now
        elif wanted in ("UploadComplete", "Aborted"):
            raise bulk_error(
                400, "INVALIDJOBSTATE", f"Job {job.id} is in state {job.state} and can't be changed to {wanted}"
            )
        else:
            raise bulk_error(400, "INVALIDJOBSTATE", f"Invalid state: {wanted}")

    def delete(self, job: BulkJob) -> None:
        if job.state not in ("UploadComplete", "JobComplete", "Aborted", "Failed"):
            raise bulk_error(400, "INVALIDJOBSTATE", f"Job {job.id} can't be deleted in state {job.state}")
        del self.jobs[id15(job.id)]

    # ---- processing

    def advance(self, now: float) -> None:
        for job in self.jobs.values():
            if job.state in ("UploadComplete", "InProgress") and job.closed_at is not None:
                self._process(job, now)

    def _process(self, job: BulkJob, now: float) -> None:
        """UploadComplete for the first fifth of the processing time, then InProgress while
        200-record chunks commit, then JobComplete."""
        assert job.closed_at is not None
        progress = (now - job.closed_at) / job.duration
        if progress < 0.2:
            return
        if job.state == "UploadComplete":
            job.state, job.modified = "InProgress", now
            if self._fail_on_bad_input(job, now):
                return
            if self.failures:
                job.fail_after, job.error_message = self.failures.pop(0)
        done = 1.0 if progress >= 1 else (progress - 0.2) / 0.8
        target = len(job.rows) if done >= 1 else int(len(job.rows) * done) // BULK_CHUNK * BULK_CHUNK
        failing = job.fail_after is not None and target >= job.fail_after
        if failing:
            assert job.fail_after is not None
            target = min(job.fail_after, len(job.rows))
        for row in job.rows[job.processed : target]:
            job.results.append(self._insert_row(job, row))
        job.processed = max(job.processed, target)
        if failing:
            # "If the batch still can't be processed after 20 retries, the entire ingest job is
            # moved to the Failed state and remaining job data isn't processed"; what it already
            # inserted stays. The docs do not say whether errorMessage is then set: both happen here.
            job.state, job.modified = "Failed", now
        elif progress >= 1:
            job.state, job.modified = "JobComplete", now

    def _fail_on_bad_input(self, job: BulkJob, now: float) -> bool:
        schema = self.state.table(job.sobject).schema
        unknown = [name for name in job.header if schema.field_named(name) is None]
        if unknown:
            job.error_message = f"InvalidBatch : Field name not found : {unknown[0]}"
        if job.error_message:
            job.state, job.modified = "Failed", now
            return True
        return False

    def _insert_row(self, job: BulkJob, row: list[str]) -> _BulkResult:
        padded = row + [""] * (len(job.header) - len(row))
        # Bulk API treats an empty cell (or #N/A) as null.
        fields = {
            name: (None if value in ("", "#N/A") else value) for name, value in zip(job.header, padded, strict=False)
        }
        try:
            record_id = self.state.create(job.sobject, fields)
        except RecordError as error:
            return _BulkResult(padded, error=error.as_bulk_error())
        return _BulkResult(padded, record_id=record_id)

    # ---- results

    def results_csv(self, job: BulkJob, kind: str) -> str:
        if kind != "unprocessedrecords" and job.state not in ("JobComplete", "Failed", "Aborted"):
            raise bulk_error(
                400, "INVALIDJOBSTATE", f"Results are available once the job is complete; it is {job.state}"
            )
        if kind == "successfulResults":
            lines = [self._line(job, ["sf__Id", "sf__Created"], quote=True, raw_tail=job.header)]
            lines += [
                self._line(job, [result.record_id or "", "true", *result.row], quote=True)
                for result in job.results
                if result.record_id
            ]
        elif kind == "failedResults":
            lines = [self._line(job, ["sf__Id", "sf__Error"], quote=True, raw_tail=job.header)]
            lines += [
                self._line(job, ["", result.error or "", *result.row], quote=True)
                for result in job.results
                if result.error
            ]
        else:
            lines = [self._line(job, [], quote=False, raw_tail=job.header)]
            lines += [self._line(job, row, quote=True) for row in job.rows[job.processed :]]
        ending = "\r\n" if job.line_ending == "CRLF" else "\n"
        return "".join(line + ending for line in lines)

    def _line(self, job: BulkJob, values: list[str], *, quote: bool, raw_tail: list[str] | None = None) -> str:
        """Result files quote every value; the original column names follow unquoted, as uploaded."""
        delimiter = BULK_DELIMITERS[job.column_delimiter]
        cells = ['"' + value.replace('"', '""') + '"' if quote else value for value in values]
        return delimiter.join(cells + list(raw_tail or []))


# --------------------------------------------------------------------------- HTTP server


def release_label(version: int) -> str:
    """Salesforce's release name for an API version (59.0 was Winter '24, three a year)."""
    index = version - 59
    cycle, position = divmod(index, 3)
    season = ("Winter", "Spring", "Summer")[position]
    return f"{season} '{24 + cycle:02d}"


def json_response(body: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body, ensure_ascii=False).encode(),
        content_type="application/json",
        charset="UTF-8",
        headers=headers,
    )


@dataclass
class _Faults:
    drop: int = 0
    failures: list[int] = field(default_factory=list)  # statuses of the next failing calls
    limit_exceeded: int = 0


@dataclass
class _Cursor:
    records: list[Row]
    batch_size: int


class SalesforceOrgSim:
    """A Salesforce org (packaging, production or sandbox) served over HTTP on 127.0.0.1.

    Start it with ``await sim.start()`` and point a client at ``sim.url`` (or at the SFDX auth
    URL from ``build_auth_url(sim)``). The packaging kind is seeded from ``seed`` with two
    managed packages and ``subscribers`` subscriber orgs, and runs push upgrades whose jobs
    fail at ``failure_rate``. Tests steer it with the fault knobs (``fail_next``, ``drop_next``,
    ``limit_exceeded_next``, ``expire_sessions``, ``refuse_org_keys``,
    ``fail_bulk_next``, ``hidden_objects``) and read its state with
    ``push_request`` / ``push_jobs`` / ``subscribers`` / ``calls``.

    ``clock`` (seconds since the epoch) replaces wall-clock time, ``lanes`` the number of push
    jobs run at once; ``cancelled_spelling`` makes canceled push jobs say "Cancelled".
    """

    def __init__(
        self,
        *,
        org_id: str = "00D000000000001EAA",
        kind: str = "packaging",
        client_id: str = "sandbox-client",
        client_secret: str = "sandbox-secret",
        refresh_token: str = "sandbox-refresh",
        jwt_public_key: str | None = None,
        subscribers: int = 2400,
        seed: int = 7,
        failure_rate: float = 0.05,
        job_seconds: float = 0.004,
        latency: float = 0.0,
        api_version: str = "61.0",
        cancelled_spelling: bool = False,
        lanes: int = LANES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if kind not in ("packaging", "production", "sandbox"):
            raise ValueError(f"kind must be packaging, production or sandbox, not {kind!r}")
        self.org_id = org_id
        self.kind = kind
        self.client_id = client_id
        self.client_secret = client_secret
        self.refresh_token = refresh_token
        self.jwt_public_key = jwt_public_key
        self.latency = latency
        self.api_version = api_version
        self.clock = clock
        self.url = ""
        self.calls: list[tuple[str, str]] = []
        self.queries: list[str] = []  # the text of every SOQL query received, as Salesforce would parse it
        self.refuse_org_keys: dict[str, str] = {}
        # Objects queries cannot see: Salesforce answers INVALID_TYPE for the packaging objects
        # when the user lacks the permission to push (or the org is not a packaging org).
        self.hidden_objects: set[str] = set()
        self._ids = IdFactory(pod="5f")
        self.user_id = self._ids.new("User")
        tables = org_data.make_tables()
        if kind == "packaging":
            self._seed(tables, seed=seed, subscriber_count=subscribers)
        self.state = PackagingState(
            ids=self._ids,
            tables=tables,
            refuse_org_keys=self.refuse_org_keys,
            user_id=self.user_id,
            clock=clock,
            seed=seed,
            failure_rate=failure_rate,
            job_seconds=job_seconds,
            lanes=lanes,
            cancelled_spelling=cancelled_spelling,
        )
        self.bulk = BulkIngest(self.state)
        self._tokens: set[str] = set()
        # Production and sandbox orgs take metadata deployments (SOAP Metadata API).
        self.metadata: MetadataApiSim | None = (
            MetadataApiSim(
                org_id=org_id, kind=kind, session_ok=self._tokens.__contains__, clock=clock, api_version=api_version
            )
            if kind in ("production", "sandbox")
            else None
        )
        self._faults = _Faults()
        self._cursors: OrderedDict[str, _Cursor] = OrderedDict()
        self._api_calls = 0
        self._runner: web.AppRunner | None = None
        self.app = self._build_app()

    def _seed(self, tables: dict[str, Table], *, seed: int, subscriber_count: int) -> None:
        data = org_data.generate_seed(seed=seed, subscriber_count=subscriber_count, ids=self._ids)
        for sobject, rows in (
            ("MetadataPackage", data.packages),
            ("MetadataPackageVersion", data.versions),
            ("PackageSubscriber", data.subscribers),
        ):
            for row in rows:
                tables[sobject].insert(row)
        self.refuse_org_keys.update(data.refused_org_keys)

    # ---- lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner, self.url = await serve(self.app, host=host, port=port)
        return self.url

    async def stop(self) -> None:
        await close(self._runner)
        self._runner = None

    # ---- knobs for tests

    def reset_calls(self) -> None:
        self.calls.clear()
        self.queries.clear()

    def fail_next(self, n: int, status: int = 503) -> None:
        """The next n data API calls answer status (503: HTML maintenance page; 500: JSON error)."""
        self._faults.failures.extend([status] * n)

    def drop_next(self, n: int) -> None:
        """The next n data API calls get their connection closed without any response.

        aiohttp's client retries an idempotent request (GET, PUT, DELETE...) once by itself after
        such a disconnect, so a client sees the failure of a GET only when two calls are dropped."""
        self._faults.drop += n

    def limit_exceeded_next(self, n: int) -> None:
        self._faults.limit_exceeded += n

    def fail_bulk_next(self, *, after: int, message: str | None = None) -> None:
        """The next Bulk API 2.0 ingest job to start processing inserts ``after`` rows, then ends
        Failed with ``message`` as its errorMessage (none at all when ``message`` is None)."""
        self.bulk.failures.append((after, message))

    def expire_sessions(self) -> None:
        self._tokens.clear()

    # ---- state for tests

    def _advance(self) -> None:
        now = self.clock()
        self.state.advance(now)
        self.bulk.advance(now)

    def push_request(self, request_id: str) -> dict[str, Any] | None:
        self._advance()
        row = self.state.table("PackagePushRequest").get(request_id)
        return dict(row) if row else None

    def push_jobs(self, request_id: str) -> list[dict[str, Any]]:
        self._advance()
        return [dict(row) for row in self.state.jobs_of(request_id)]

    def push_errors(self, request_id: str) -> list[dict[str, Any]]:
        self._advance()
        job_ids = [job["Id"] for job in self.state.jobs_of(request_id)]
        return [dict(row) for row in self.state.table("PackagePushError").lookup("PackagePushJobId", job_ids)]

    @property
    def subscribers(self) -> list[dict[str, Any]]:
        return self.state.table("PackageSubscriber").rows

    @property
    def packages(self) -> list[dict[str, Any]]:
        return self.state.table("MetadataPackage").rows

    @property
    def versions(self) -> list[dict[str, Any]]:
        return self.state.table("MetadataPackageVersion").rows

    # ---- application

    def _build_app(self) -> web.Application:
        # Bulk uploads can be large; 100 MB is the documented raw-data limit per upload.
        app = web.Application(middlewares=[self._middleware], client_max_size=100 * 1024 * 1024)
        data = r"/services/data/v{version:\d+\.\d}"
        slash = "{slash:/?}"
        routes = [
            web.post("/services/oauth2/token", self._token),
            web.post("/services/oauth2/revoke", self._revoke),
            web.get("/services/oauth2/userinfo", self._userinfo),
            web.get("/id/{org}/{user}", self._identity),
            web.get("/services/data" + slash, self._versions),
            web.get(data + slash, self._resources),
            web.get(data + "/query" + slash, self._query),
            web.get(data + "/queryAll" + slash, self._query),
            web.get(data + "/query/{locator}", self._query_more),
            web.get(data + "/queryAll/{locator}", self._query_more),
            web.post(data + "/sobjects/{sobject}" + slash, self._create_record),
            web.get(data + "/sobjects/{sobject}/{record_id}", self._get_record),
            web.patch(data + "/sobjects/{sobject}/{record_id}", self._update_record),
            web.post(data + "/composite/sobjects" + slash, self._create_collection),
            web.post(data + "/jobs/ingest" + slash, self._bulk_create),
            web.get(data + "/jobs/ingest/{job_id}" + slash, self._bulk_info),
            web.patch(data + "/jobs/ingest/{job_id}" + slash, self._bulk_patch),
            web.delete(data + "/jobs/ingest/{job_id}" + slash, self._bulk_delete),
            web.put(data + "/jobs/ingest/{job_id}/batches" + slash, self._bulk_upload),
            web.get(
                data + "/jobs/ingest/{job_id}/{kind:successfulResults|failedResults|unprocessedrecords}" + slash,
                self._bulk_results,
            ),
        ]
        if self.metadata is not None:
            soap = r"/services/Soap/m/{version:\d+\.\d}{org:(?:/[A-Za-z0-9]{15,18})?}"
            routes.append(web.post(soap, self.metadata.handle))
        app.add_routes(routes)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        self.calls.append((request.method, request.path))
        if self.latency:
            await asyncio.sleep(self.latency)
        self._advance()
        is_data = request.path.startswith("/services/data")
        if is_data:
            fault = self._injected_fault(request)
            if fault is not None:
                return fault
        try:
            if is_data and request.match_info.get("version") is not None:
                self._authenticate(request)
                self._check_version(request)
                self._check_limits()
            response: web.StreamResponse = await handler(request)
        except ApiError as error:
            response = json_response(error.body, status=error.status, headers=error.headers)
        except web.HTTPNotFound:
            response = json_response([error_body("NOT_FOUND", "The requested resource does not exist")], status=404)
        except web.HTTPMethodNotAllowed as error:
            allowed = ",".join(sorted(error.allowed_methods))
            response = json_response(
                [
                    error_body(
                        "METHOD_NOT_ALLOWED",
                        f"HTTP Method '{request.method}' not allowed. Allowed are {allowed}",
                    )
                ],
                status=405,
            )
        if is_data:
            self._api_calls += 1
            response.headers["Sforce-Limit-Info"] = f"api-usage={self._api_calls}/15000"
        return response

    def _injected_fault(self, request: web.Request) -> web.StreamResponse | None:
        faults = self._faults
        if faults.drop:
            faults.drop -= 1
            if request.transport is not None:
                request.transport.close()
            raise asyncio.CancelledError  # aiohttp then drops the request without answering
        if faults.failures:
            return self._failure_response(faults.failures.pop(0))
        return None

    def _failure_response(self, status: int) -> web.Response:
        if status == 503:
            return web.Response(status=503, text=MAINTENANCE_PAGE, content_type="text/html")
        if status in (502, 504):
            return web.Response(status=status, text=GATEWAY_PAGE.format(status=status), content_type="text/html")
        message = (
            "An unexpected error occurred. Please include this ErrorId if you contact support: "
            "1376546413-93216 (-1093283713)"
        )
        return json_response([error_body("UNKNOWN_EXCEPTION", message)], status=status)

    def _authenticate(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        # Salesforce accepts "OAuth <token>" as well as "Bearer <token>".
        if scheme.lower() not in ("bearer", "oauth") or token.strip() not in self._tokens:
            raise ApiError(
                401, "INVALID_SESSION_ID", "Session expired or invalid", headers={"WWW-Authenticate": "Token"}
            )

    def _check_version(self, request: web.Request) -> None:
        version = request.match_info["version"]
        if not FIRST_API_VERSION <= float(version) <= float(self.api_version) or not version.endswith(".0"):
            raise not_found()

    def _check_limits(self) -> None:
        if self._faults.limit_exceeded:
            self._faults.limit_exceeded -= 1
            raise ApiError(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.")

    async def _json_body(self, request: web.Request) -> Any:
        text = await request.text()
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ApiError(
                400, "JSON_PARSER_ERROR", f"Unexpected character at [line:{error.lineno}, column:{error.colno}]"
            ) from None

    async def _json_object(self, request: web.Request) -> dict[str, Any]:
        body = await self._json_body(request)
        if not isinstance(body, dict):
            raise ApiError(
                400, "JSON_PARSER_ERROR", "Cannot deserialize instance of object from a non-object JSON value"
            )
        return body

    # ---- OAuth

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        params = {key: str(value) for key, value in form.items()} or dict(request.query)
        grant = params.get("grant_type")
        if grant == "refresh_token":
            return self._refresh_grant(params)
        if grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return self._jwt_grant(params)
        return self._oauth_error("unsupported_grant_type", "grant type not supported")

    def _oauth_error(self, error: str, description: str, status: int = 400) -> web.Response:
        return json_response({"error": error, "error_description": description}, status=status)

    def _refresh_grant(self, params: Mapping[str, str]) -> web.Response:
        if params.get("client_id") != self.client_id:
            return self._oauth_error("invalid_client_id", "client identifier invalid")
        if self.client_secret and params.get("client_secret") != self.client_secret:
            return self._oauth_error("invalid_client", "invalid client credentials")
        if params.get("refresh_token") != self.refresh_token:
            return self._oauth_error("invalid_grant", "expired access/refresh token")
        return json_response(self._issue_token(scope="api refresh_token"))

    def _jwt_grant(self, params: Mapping[str, str]) -> web.Response:
        """JWT bearer flow: RS256 assertion with iss = client id, sub = username, aud = the login
        URL and exp within 3 minutes (30 s of clock skew allowed here)."""
        assertion = params.get("assertion", "")
        try:
            claims = self._decode_assertion(assertion)
        except jwt.PyJWTError:
            return self._oauth_error("invalid_grant", "invalid assertion")
        if claims.get("iss") != self.client_id:
            return self._oauth_error("invalid_client_id", "client identifier invalid")
        audiences = {"https://login.salesforce.com", "https://test.salesforce.com", self.url}
        audience = claims.get("aud")
        audience_list = audience if isinstance(audience, list) else [audience]
        if not any(str(value).rstrip("/") in audiences for value in audience_list):
            return self._oauth_error("invalid_grant", "audience is invalid")
        expires = claims.get("exp")
        now = self.clock()
        if not isinstance(expires, int | float) or not now - 30 <= expires <= now + 180 + 30:
            return self._oauth_error("invalid_grant", "invalid assertion")
        if not claims.get("sub"):
            return self._oauth_error("invalid_grant", "invalid assertion")
        return json_response(self._issue_token(scope="api"))

    def _decode_assertion(self, assertion: str) -> dict[str, Any]:
        # Claims are checked by hand above, so pyjwt only checks the signature here.
        if self.jwt_public_key:
            return dict(
                jwt.decode(
                    assertion,
                    self.jwt_public_key,
                    algorithms=["RS256"],
                    options={"verify_exp": False, "verify_aud": False, "verify_iat": False, "verify_nbf": False},
                )
            )
        return dict(jwt.decode(assertion, options={"verify_signature": False}))

    def _issue_token(self, *, scope: str) -> Row:
        token = f"{self.org_id[:15]}!AQ{secrets.token_urlsafe(72).replace('-', '.').replace('_', '.')}"
        self._tokens.add(token)
        issued_at = str(int(self.clock() * 1000))
        identity = f"{self.url}/id/{self.org_id}/{self.user_id}"
        # The documented signature: HMAC-SHA256 of id + issued_at keyed with the client secret.
        digest = hmac.new(self.client_secret.encode(), (identity + issued_at).encode(), hashlib.sha256)
        return {
            "access_token": token,
            "signature": base64.b64encode(digest.digest()).decode(),
            "scope": scope,
            "instance_url": self.url,
            "id": identity,
            "token_type": "Bearer",
            "issued_at": issued_at,
        }

    async def _revoke(self, request: web.Request) -> web.Response:
        form = await request.post()
        self._tokens.discard(str(form.get("token", "")))
        return web.Response(status=200)

    def _identity_body(self) -> Row:
        return {
            "id": f"{self.url}/id/{self.org_id}/{self.user_id}",
            "user_id": self.user_id,
            "organization_id": self.org_id,
            "username": f"release.manager@{self.kind}.sandbox.example",
            "display_name": "Release Manager",
            "email": "release.manager@example.com",
            "urls": {
                "rest": f"{self.url}/services/data/v{{version}}/",
                "query": f"{self.url}/services/data/v{{version}}/query/",
            },
        }

    async def _userinfo(self, request: web.Request) -> web.Response:
        self._authenticate(request)
        return json_response(self._identity_body())

    async def _identity(self, request: web.Request) -> web.Response:
        self._authenticate(request)
        if request.match_info["user"] != self.user_id:
            raise not_found()
        return json_response(self._identity_body())

    # ---- REST resources

    async def _versions(self, request: web.Request) -> web.Response:
        # The Versions resource is the one REST resource that needs no session (REST API docs).
        top = int(float(self.api_version))
        return json_response(
            [
                {"label": release_label(number), "url": f"/services/data/v{number}.0", "version": f"{number}.0"}
                for number in range(FIRST_API_VERSION, top + 1)
            ]
        )

    async def _resources(self, request: web.Request) -> web.Response:
        base = f"/services/data/v{request.match_info['version']}"
        names = ("sobjects", "query", "queryAll", "composite", "jobs")
        return json_response({name: f"{base}/{name}" for name in names})

    def _batch_size(self, request: web.Request) -> int:
        options = request.headers.get("Sforce-Query-Options", "")
        match = re.search(r"batchSize\s*=\s*(\d+)", options)
        if not match:
            return QUERY_BATCH_SIZE
        return min(QUERY_BATCH_SIZE, max(200, int(match.group(1))))

    async def _query(self, request: web.Request) -> web.Response:
        text = request.query.get("q")
        self.queries.append(text or "")
        if not text:
            raise ApiError(400, "MALFORMED_QUERY", "A query string has to be specified")
        version = request.match_info["version"]
        try:
            visible = {name: table for name, table in self.state.tables.items() if name not in self.hidden_objects}
            result = run_query(text, visible, api_version=version, now=datetime.fromtimestamp(self.clock(), UTC))
        except SoqlError as error:
            raise ApiError(400, error.error_code, error.message) from None
        if result.count_only:
            return json_response({"totalSize": result.total_size, "done": True, "records": []})
        aggregate = bool(result.records) and result.records[0]["attributes"]["type"] == "AggregateResult"
        batch = len(result.records) if aggregate else self._batch_size(request)
        return json_response(self._page(_Cursor(result.records, batch), None, 0, version))

    def _page(self, cursor: _Cursor, locator: str | None, offset: int, version: str) -> Row:
        end = offset + cursor.batch_size
        body: Row = {"totalSize": len(cursor.records), "done": end >= len(cursor.records)}
        if not body["done"]:
            if locator is None:
                locator = self._ids.new("QueryLocator")
                self._cursors[locator] = cursor
                while len(self._cursors) > MAX_LOCATORS:
                    self._cursors.popitem(last=False)
            body["nextRecordsUrl"] = f"/services/data/v{version}/query/{locator}-{end}"
        body["records"] = cursor.records[offset:end]
        return body

    async def _query_more(self, request: web.Request) -> web.Response:
        locator, _, offset_text = request.match_info["locator"].rpartition("-")
        cursor = self._cursors.get(locator)
        if cursor is None or not offset_text.isdigit() or int(offset_text) > len(cursor.records):
            raise ApiError(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
        return json_response(self._page(cursor, locator, int(offset_text), request.match_info["version"]))

    def _sobject(self, request: web.Request) -> str:
        name = request.match_info["sobject"]
        for sobject in self.state.tables:
            if sobject.lower() == name.lower():
                return sobject
        raise not_found()

    async def _create_record(self, request: web.Request) -> web.Response:
        sobject = self._sobject(request)
        body = await self._json_object(request)
        try:
            record_id = self.state.create(sobject, body)
        except RecordError as error:
            raise error.as_api_error() from None
        return json_response({"id": record_id, "success": True, "errors": []}, status=201)

    async def _get_record(self, request: web.Request) -> web.Response:
        sobject = self._sobject(request)
        row = self.state.table(sobject).get(request.match_info["record_id"])
        if row is None:
            raise not_found()
        fields = [name for name in request.query.get("fields", "").split(",") if name.strip()]
        schema = self.state.table(sobject).schema
        chosen: list[str] = []
        for name in fields:
            canonical = schema.field_named(name.strip())
            if canonical is None:
                raise ApiError(400, "INVALID_FIELD", f"No such column '{name.strip()}' on entity '{sobject}'")
            chosen.append(canonical)
        version = request.match_info["version"]
        url = f"/services/data/v{version}/sobjects/{sobject}/{row['Id']}"
        body: Row = {"attributes": {"type": sobject, "url": url}}
        body.update({name: row.get(name) for name in (chosen or list(schema.fields))})
        return json_response(body)

    async def _update_record(self, request: web.Request) -> web.Response:
        sobject = self._sobject(request)
        if sobject != "PackagePushRequest":
            raise ApiError(
                405, "METHOD_NOT_ALLOWED", f"HTTP Method 'PATCH' not allowed for {sobject}. Allowed are GET,HEAD"
            )
        body = await self._json_object(request)
        try:
            self.state.update_request(request.match_info["record_id"], body)
        except RecordError as error:
            raise error.as_api_error() from None
        return web.Response(status=204)

    async def _create_collection(self, request: web.Request) -> web.Response:
        body = await self._json_object(request)
        records = body.get("records")
        if not isinstance(records, list):
            raise ApiError(400, "JSON_PARSER_ERROR", "records must be a list of sObjects")
        if len(records) > COLLECTION_LIMIT:
            raise ApiError(
                400,
                "EXCEEDED_ID_LIMIT",
                f"record limit reached. cannot submit more than {COLLECTION_LIMIT} records into this call",
            )
        all_or_none = bool(body.get("allOrNone", False))
        return json_response(self._save_collection(records, all_or_none=all_or_none))

    def _collection_type(self, record: Any) -> str:
        attributes = record.get("attributes") if isinstance(record, dict) else None
        name = attributes.get("type") if isinstance(attributes, dict) else None
        if not name:
            raise RecordError("INVALID_TYPE", "Each record needs an attributes map with a type")
        for sobject in self.state.tables:
            if sobject.lower() == str(name).lower():
                return sobject
        raise RecordError("INVALID_TYPE", f"sObject type '{name}' is not supported.")

    def _save_collection(self, records: list[Any], *, all_or_none: bool) -> list[Row]:
        """SaveResults in input order. Records are validated in order; with allOrNone nothing is
        saved unless every record is valid."""
        batch: set[tuple[str, str]] = set()
        if not all_or_none:
            return [self._save_one(record, batch) for record in records]
        prepared: list[tuple[str, Row] | RecordError] = []
        for record in records:
            try:
                sobject = self._collection_type(record)
                prepared.append((sobject, self.state.prepare(sobject, record, batch)))
            except RecordError as error:
                prepared.append(error)
        if any(isinstance(item, RecordError) for item in prepared):
            return [self._rolled_back(item) for item in prepared]
        saved = [self.state.commit(*item) for item in prepared if not isinstance(item, RecordError)]
        return [{"id": record_id, "success": True, "errors": []} for record_id in saved]

    def _save_one(self, record: Any, batch: set[tuple[str, str]]) -> Row:
        try:
            sobject = self._collection_type(record)
            record_id = self.state.commit(sobject, self.state.prepare(sobject, record, batch))
        except RecordError as error:
            return {"success": False, "errors": [error.as_save_error()]}
        return {"id": record_id, "success": True, "errors": []}

    def _rolled_back(self, item: tuple[str, Row] | RecordError) -> Row:
        if isinstance(item, RecordError):
            return {"id": None, "success": False, "errors": [item.as_save_error()]}
        error = RecordError(
            "ALL_OR_NONE_OPERATION_ROLLED_BACK",
            "Record rolled back because not all records were valid and the request was using AllOrNone header",
        )
        return {"id": None, "success": False, "errors": [error.as_save_error()]}

    # ---- Bulk API 2.0

    async def _bulk_create(self, request: web.Request) -> web.Response:
        body = await self._json_object(request)
        job = self.bulk.create(body, request.match_info["version"])
        return json_response(job.info(full=False))

    async def _bulk_info(self, request: web.Request) -> web.Response:
        return json_response(self.bulk.job(request.match_info["job_id"]).info(full=True))

    async def _bulk_patch(self, request: web.Request) -> web.Response:
        job = self.bulk.job(request.match_info["job_id"])
        body = await self._json_object(request)
        self.bulk.change_state(job, body.get("state"))
        return json_response(job.info(full=False))

    async def _bulk_delete(self, request: web.Request) -> web.Response:
        self.bulk.delete(self.bulk.job(request.match_info["job_id"]))
        return web.Response(status=204)

    async def _bulk_upload(self, request: web.Request) -> web.Response:
        job = self.bulk.job(request.match_info["job_id"])
        self.bulk.upload(job, request.headers.get("Content-Type", ""), await request.read())
        return web.Response(status=201)

    async def _bulk_results(self, request: web.Request) -> web.Response:
        job = self.bulk.job(request.match_info["job_id"])
        text = self.bulk.results_csv(job, request.match_info["kind"])
        return web.Response(text=text, content_type="text/csv", charset="UTF-8")


def build_auth_url(sim: SalesforceOrgSim) -> str:
    """The SFDX auth URL (as `sf org display --verbose` prints it) for a started sim."""
    return f"force://{sim.client_id}:{sim.client_secret}:{sim.refresh_token}@{sim.url}"
