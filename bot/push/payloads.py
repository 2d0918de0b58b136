"""What a push keeps in its operation row: ``PushParams`` (what was asked) and ``PushData`` (what
happened since), read and written through these models instead of by string key.

Version 1 is exactly the key layout the release before typed payloads wrote (the rows in
``tests/fixtures/operations_r2_push.json``), so those rows read unchanged. Times stay the ISO
text they were written as (``IsoTime``): a row written by this release is read by the one before
it during a rolling upgrade, and that one parses the text itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

from bot.core.payloads import OperationState, Payload
from bot.store.models import Operation


def _iso(moment: datetime) -> str:
    return moment.isoformat()


# Written with ``isoformat()`` as before ("+00:00", not pydantic's "Z").
IsoTime = Annotated[datetime, PlainSerializer(_iso, return_type=str)]


class PushParams(Payload):
    """What was asked, fixed when the push is created."""

    version_id: str
    package_id: str = ""
    package: str = ""  # the package name, as shown on the card
    version: str = ""  # "1.4.0"
    orgs: str = ""  # the selection as the requester gave it, e.g. "all" or "12 listed org(s)"
    retry_of: str | None = None  # the ref of the push this one retries
    scheduled_for: IsoTime | None = None

    def dump(self) -> dict[str, Any]:
        """Unset values are written as null, as before: params are written once and shown as they are."""
        return self.model_dump(mode="json")


class _Part(BaseModel):
    """A structured part of ``PushData``; unknown keys are kept, as in ``PushData`` itself."""

    model_config = ConfigDict(extra="allow")


class PlanSummary(_Part):
    """The plan as the card shows it; the orgs themselves are in ``push_targets``."""

    total: int = 0
    rows: list[tuple[str, str, int]] = Field(default_factory=list)  # (from version, org type, how many)
    not_eligible: int = 0
    skipped: dict[str, int] = Field(default_factory=dict)  # why → how many subscribers left out


class JobCounts(_Part):
    created: int = 0
    refused: int = 0


class JobStatusCounts(_Part):
    """How many of a request's jobs are in each status, keyed as Salesforce names the statuses."""

    model_config = ConfigDict(extra="allow", serialize_by_alias=True, validate_by_name=True, validate_by_alias=True)

    created: int = Field(default=0, alias="Created")
    pending: int = Field(default=0, alias="Pending")
    in_progress: int = Field(default=0, alias="In Progress")
    succeeded: int = Field(default=0, alias="Succeeded")
    failed: int = Field(default=0, alias="Failed")
    canceled: int = Field(default=0, alias="Canceled")

    @classmethod
    def of(cls, counts: Mapping[str, int]) -> JobStatusCounts:
        return cls.model_validate(dict(counts))

    @property
    def done(self) -> int:
        return self.succeeded + self.failed + self.canceled

    @property
    def total(self) -> int:
        """Every job, in a status named here or in one Salesforce adds later."""
        extra = sum(int(value) for value in (self.model_extra or {}).values())
        return self.created + self.pending + self.in_progress + self.done + extra


class FailureGroup(_Part):
    """Failed orgs with the same error, numbers in the message aside."""

    type: str
    title: str
    message: str
    count: int
    numbers_vary: bool | None = None  # written only when true


class PushSummary(_Part):
    """The outcome of a finished request, from its jobs and their errors."""

    succeeded: int = 0
    failed: int = 0
    canceled: int = 0
    total: int = 0
    groups: list[FailureGroup] = Field(default_factory=list)  # the ten largest
    group_count: int = 0
    without_error_record: int = 0


class PushData(OperationState):
    """Everything a push records as it goes (``data``), beside what every kind shares.

    Keys this model does not know are kept (``extra="allow"``): a step writes the whole model
    back, and must not drop what a newer replica wrote meanwhile.
    """

    model_config = ConfigDict(extra="allow")

    plan: PlanSummary = Field(default_factory=PlanSummary)
    # create_request: set before the create call, so a resumed step looks for an orphan first.
    request_attempted_at: IsoTime | None = None
    request_url: str | None = None  # the request's page in the packaging org
    # create_jobs (bookkeeping, dropped once the jobs are recorded)
    jobs_attempted_at: IsoTime | None = None
    bulk_job_id: str | None = None
    bulk_job_rows: int | None = None
    bulk_failures: list[str] | None = None  # one line per ingest job that ended Failed
    jobs: JobCounts | None = None
    # following the request
    request_status: str | None = None  # Salesforce's status, "Cancelled" spelled "Canceled"
    counts: JobStatusCounts | None = None
    running_since: IsoTime | None = None
    summary: PushSummary | None = None
    # how it ended otherwise
    canceled_by: str | None = None
    error: str | None = None

    @classmethod
    def of(cls, operation: Operation) -> PushData:
        return cls.read(operation.data)

    def dump(self) -> dict[str, Any]:
        """As before: the shared fields nobody has set yet (no approvals, no trouble) are left out."""
        data = super().dump()
        for key in ("approved_by", "transient_failures"):
            if not data.get(key):
                data.pop(key, None)
        return data

    @property
    def job_bookkeeping_done(self) -> PushData:
        """This state without the keys only ``create_jobs`` needs while it runs."""
        return self.model_copy(
            update={"bulk_job_id": None, "bulk_job_rows": None, "bulk_failures": None, "jobs_attempted_at": None}
        )


def params_of(operation: Operation) -> PushParams:
    return PushParams.read(operation.params)
