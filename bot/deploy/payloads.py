"""What a deployment keeps in its operation row, typed: ``DeployParams`` (asked) and ``DeployData``
(happened).

Version 1 is the key layout the releases before typed payloads wrote, field for field, so their
rows load unchanged (``tests/fixtures/operations_r2_deploy.json`` holds such rows). ``dump`` writes
back exactly the keys a payload was read or built with (plus ``v``): a key that held ``null``
stays, a key that was absent is not invented, so a row read and written again keeps its layout.

The facts several modules derive from a row (until when a validation can be quick-deployed, whether
Salesforce failed it without a reason) live here too, next to the fields they read.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field

from bot.clients.salesforce.metadata import DeployOptions
from bot.core.payloads import OperationState, Payload
from bot.core.when import aware
from bot.store.models import Operation, OpState

VALIDATION_WINDOW = timedelta(days=10)  # deployRecentValidation: validations of the last 10 days
ACTION_LABEL = {"deploy": "Deploy", "validate": "Validate", "quick_deploy": "Quick deploy"}
Action = Literal["deploy", "validate", "quick_deploy"]


class Part(BaseModel):
    """A structured part of a payload (no version of its own: the payload around it has one)."""

    model_config = ConfigDict(extra="ignore")


class KeptKeys(Payload):
    """``dump`` keeps the keys the payload was read or built with, ``null`` ones included."""

    def dump(self) -> dict[str, Any]:
        return {"v": self.v, **self.model_dump(mode="json", exclude_unset=True)}


# -- params ----------------------------------------------------------------------------------------
class ArtifactSummary(Part):
    """The artifact as requested: enough to show it and to recognise its bytes again when sent."""

    ref: str = ""
    kind: str = ""  # zip | folder | url
    name: str = ""
    sha256: str = ""
    files: int = 0
    compressed: int = 0
    uncompressed: int = 0
    root_package: bool = False
    types: dict[str, int] = Field(default_factory=dict)  # metadata type → members (0 = wildcard)
    destructive: list[str] = Field(default_factory=list)


class OptionsData(Part):
    """``DeployOptions`` as stored (``DeployOptions.as_dict``)."""

    allow_missing_files: bool = False
    auto_update_package: bool = False
    check_only: bool = False
    ignore_warnings: bool = False
    perform_retrieve: bool = False
    purge_on_delete: bool = False
    rollback_on_error: bool = True
    run_tests: list[str] = Field(default_factory=list)
    single_package: bool = True
    test_level: str | None = None

    @classmethod
    def of(cls, options: DeployOptions) -> Self:
        return cls.model_validate(options.as_dict())

    def options(self) -> DeployOptions:
        return DeployOptions.from_dict(self.model_dump())


class QuickSource(Part):
    """The validation a quick deploy deploys."""

    ref: str = ""
    id: str = ""  # its Salesforce deployment id
    usable_until: str | None = None
    artifact: str | None = None  # its artifact's name
    test_level: str | None = None
    requester: str | None = None


class DeployParams(KeptKeys):
    action: Action = "deploy"
    org: str | None = None
    org_kind: str | None = None
    artifact: ArtifactSummary | None = None  # deploy, validate
    options: OptionsData | None = None  # deploy, validate
    validation: QuickSource | None = None  # quick_deploy
    notes: list[str] = Field(default_factory=list)
    scheduled_for: str | None = None


# -- data ------------------------------------------------------------------------------------------
Counts = list[int]  # [done, total, errors], as Salesforce counts them


class Progress(Part):
    """The latest status read while it runs."""

    status: str | None = None
    state_detail: str = ""
    current_test: str = ""
    components: Counts = Field(default_factory=list)
    tests: Counts = Field(default_factory=list)
    queue_ahead: int | None = None  # Pending: deployments sent from here before it, same org


class Outcome(Part):
    """The final ``DeployResult``."""

    status: str = ""
    success: bool = False
    check_only: bool = False
    created_date: str | None = None
    completed_date: str | None = None
    components: Counts = Field(default_factory=list)
    tests: Counts = Field(default_factory=list)
    error_message: str = ""
    error_status_code: str | None = None
    canceled_by_name: str | None = None


class ComponentProblem(Part):
    file_name: str = ""
    full_name: str = ""
    component_type: str = ""
    problem_type: str = ""
    problem: str = ""
    line: int | None = None
    column: int | None = None


class TestProblem(Part):
    class_name: str = ""
    method: str = ""
    message: str = ""
    stack_trace: str = ""
    namespace: str = ""
    qualified: str = ""


class FailureTotals(Part):
    """How many failures Salesforce returned (only the first ``MAX_STORED_FAILURES`` are kept)."""

    components: int = 0
    tests: int = 0


class ClassCoverage(Part):
    name: str = ""
    type: str | None = None  # Apex Class | Apex Trigger
    percent: float | None = None
    required: float | None = None
    message: str = ""


class FlowCoverage(Part):
    name: str = ""
    percent: float | None = None
    required: float | None = None
    message: str = ""


class Coverage(Part):
    """The coverage warnings: org-wide figures apart from the classes and flows named below them."""

    average: float | None = None
    required: float | None = None
    flow_average: float | None = None
    flow_required: float | None = None
    classes: list[ClassCoverage] = Field(default_factory=list)
    flows: list[FlowCoverage] = Field(default_factory=list)
    other: list[str] = Field(default_factory=list)  # org-wide messages whose figures could not be read


class DeployData(KeptKeys, OperationState):
    submit_attempted_at: str | None = None  # recorded before deploy() is called, cleared if surely not sent
    submitted_at: str | None = None
    status_url: str | None = None  # the org's Deployment Status page of it
    progress: Progress | None = None
    queued_announced: bool = False
    result: Outcome | None = None
    component_failures: list[ComponentProblem] = Field(default_factory=list)
    test_failures: list[TestProblem] = Field(default_factory=list)
    failure_totals: FailureTotals | None = None
    coverage: Coverage | None = None
    error: str | None = None
    cancel_requested_by: str | None = None
    canceled_by: str | None = None
    finished_before_cancel: bool = False


def params_of(op: Operation) -> DeployParams:
    return DeployParams.read(op.params)


def data_of(op: Operation) -> DeployData:
    return DeployData.read(op.data)


# -- facts read from a row -------------------------------------------------------------------------
def counts(values: Counts | None) -> tuple[int, int, int]:
    """[done, total, errors] with missing figures as 0."""
    done, total, errors = (int(x or 0) for x in [*(values or []), 0, 0, 0][:3])
    return done, total, errors


def validation_usable_until(op: Operation) -> datetime | None:
    """Until when ``op`` can be quick-deployed, or None if it never can (not a succeeded
    validation whose Apex tests ran)."""
    if params_of(op).action != "validate" or op.state != OpState.SUCCEEDED or not op.external_id:
        return None
    result = data_of(op).result or Outcome()
    if counts(result.tests)[1] == 0:
        return None
    completed = result.completed_date
    finished = datetime.fromisoformat(completed) if completed else (op.finished_at or op.updated_at)
    return aware(finished) + VALIDATION_WINDOW


def failed_without_reason(op: Operation) -> bool:
    """Salesforce ended it as failed and said nothing about why: no error, no component or test
    failure, no coverage warning. Real orgs do answer that; the user is then sent to Setup."""
    data = data_of(op)
    if op.state != OpState.FAILED or data.result is None:
        return False
    totals = data.failure_totals or FailureTotals()
    return not (data.result.error_message or totals.components or totals.tests or data.coverage)


def percent_text(value: float) -> str:
    """68.0 → "68%", 74.5 → "74.5%"."""
    return f"{value:g}%"


def iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat() if moment else None
