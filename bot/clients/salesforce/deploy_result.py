"""What ``checkDeployStatus`` answers, read into typed results (Metadata API ``DeployResult``).

``DeployResult.details.runTestResult`` (a ``RunTestsResult``) carries ``failures`` and the
coverage warnings that fail a deployment with no other error: ``codeCoverageWarnings`` (``id``,
``message``, ``name``, ``namespace``; ``name`` is nil for the org-wide average) and, from API
44.0, ``flowCoverageWarnings`` (``flowId``, ``flowName``, ``flowNamespace``, ``message``;
``flowName`` is nil for the org-wide flow coverage).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit
from xml.etree.ElementTree import Element

from bot.clients.salesforce.rest import checked_id

XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
# "… is 68%, at least 75% test coverage is required": the first figure is the coverage, the one
# after "at least" the threshold. The docs give no grammar for these messages; this is the
# wording real orgs answer with.
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%")
_REQUIRED = re.compile(r"at least\s+(\d+(?:\.\d+)?)\s*%", re.IGNORECASE)
# Setup → Deployment Status, one deployment (the page sf CLI links to after a deploy).
DEPLOY_STATUS_PATH = (
    "/lightning/setup/DeployStatus/page?address=%2Fchangemgmt%2FmonitorDeploymentsDetails.apexp%3FasyncId%3D"
)


@dataclass(frozen=True)
class ComponentFailure:
    """A ``DeployMessage`` from ``details/componentFailures``."""

    file_name: str
    full_name: str
    component_type: str
    problem_type: str
    problem: str
    line: int | None = None
    column: int | None = None


@dataclass(frozen=True)
class TestFailure:
    """A ``RunTestFailure`` from ``details/runTestResult/failures``."""

    class_name: str
    method: str
    message: str
    stack_trace: str
    namespace: str = ""

    @property
    def qualified(self) -> str:
        name = namespaced(self.namespace, self.class_name)
        return f"{name}.{self.method}" if self.method else name


def namespaced(namespace: str, name: str) -> str:
    """``ns__Name``, as Salesforce writes a managed component, unless the name already has it."""
    prefix = f"{namespace}__" if namespace and "__" not in name else ""
    return f"{prefix}{name}"


def coverage_figures(message: str) -> tuple[float | None, float | None]:
    """(coverage, required) percentages read from a coverage warning's text; None where absent."""
    required_match = _REQUIRED.search(message)
    required = float(required_match.group(1)) if required_match else None
    head = message[: required_match.start()] if required_match else message
    found = _PERCENT.search(head)
    return (float(found.group(1)) if found else None), required


@dataclass(frozen=True)
class CoverageWarning:
    """What Apex and flow coverage warnings share: a message that gives the coverage reached and
    the coverage required, in words only (the API sends no figures)."""

    message: str

    @property
    def percent(self) -> float | None:
        return coverage_figures(self.message)[0]

    @property
    def required(self) -> float | None:
        return coverage_figures(self.message)[1]


@dataclass(frozen=True)
class CodeCoverageWarning(CoverageWarning):
    """A ``CodeCoverageWarning`` from ``details/runTestResult/codeCoverageWarnings``. ``name`` is
    empty for the org-wide average; otherwise it names the class or trigger below the threshold.
    ``type`` (Class/Trigger) is not in the documented type but some results carry it."""

    name: str = ""
    namespace: str = ""
    id: str = ""
    type: str = ""

    @property
    def qualified(self) -> str:
        return namespaced(self.namespace, self.name) if self.name else ""

    @property
    def kind(self) -> str:
        """ "Apex Class" or "Apex Trigger": from ``type`` when sent, else from the message's wording."""
        if self.type in {"Class", "Trigger"}:
            return f"Apex {self.type}"
        return next((kind for kind in ("Apex Trigger", "Apex Class") if kind.lower() in self.message.lower()), "Apex")


@dataclass(frozen=True)
class FlowCoverageWarning(CoverageWarning):
    """A ``FlowCoverageWarning`` from ``details/runTestResult/flowCoverageWarnings`` (API 44.0+).
    ``flow_name`` is empty when the warning is about the org's overall flow coverage."""

    flow_name: str = ""
    flow_namespace: str = ""
    flow_id: str = ""

    @property
    def qualified(self) -> str:
        return namespaced(self.flow_namespace, self.flow_name) if self.flow_name else ""


def deploy_status_url(instance_url: str, deploy_id: str) -> str:
    """The org's Setup → Deployment Status page of one deployment. Built only from the org's
    instance URL (scheme and host) and a checked Salesforce id, never from anything a user typed."""
    parts = urlsplit(instance_url)
    if parts.scheme not in {"https", "http"} or not parts.hostname:
        raise ValueError("not an instance URL")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    port = f":{parts.port}" if parts.port else ""  # never any user:password@ the URL might carry
    return f"{parts.scheme}://{host}{port}{DEPLOY_STATUS_PATH}{checked_id(deploy_id)}"


@dataclass(frozen=True)
class DeployResult:
    """``DeployResult`` as returned by ``checkDeployStatus`` (API 29.0+ fields)."""

    id: str
    done: bool
    status: str
    success: bool = False
    check_only: bool = False
    state_detail: str = ""
    components_deployed: int = 0
    components_total: int = 0
    component_errors: int = 0
    tests_completed: int = 0
    tests_total: int = 0
    test_errors: int = 0
    run_tests_enabled: bool = False
    rollback_on_error: bool = False
    ignore_warnings: bool = False
    created_date: datetime | None = None
    start_date: datetime | None = None
    completed_date: datetime | None = None
    error_message: str = ""
    error_status_code: str = ""
    canceled_by_name: str = ""
    component_failures: tuple[ComponentFailure, ...] = field(default_factory=tuple)
    test_failures: tuple[TestFailure, ...] = field(default_factory=tuple)
    tests_run: int = 0
    code_coverage_warnings: tuple[CodeCoverageWarning, ...] = field(default_factory=tuple)
    flow_coverage_warnings: tuple[FlowCoverageWarning, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class CancelDeployResult:
    id: str
    done: bool  # True: canceled at once (it was queued); False: Canceling, follow checkDeployStatus


def local_name(tag: str) -> str:
    """An element's name without its namespace."""
    return tag.rsplit("}", 1)[-1]


def _children(element: Element, name: str) -> list[Element]:
    return [child for child in element if local_name(child.tag) == name]


def _child(element: Element | None, name: str) -> Element | None:
    if element is None:
        return None
    found = _children(element, name)
    return found[0] if found else None


def text_of(element: Element | None, name: str) -> str:
    child = _child(element, name)
    if child is None or child.get(f"{{{XSI_NS}}}nil") == "true":
        return ""
    return (child.text or "").strip()


def _int(element: Element | None, name: str) -> int:
    try:
        return int(text_of(element, name) or 0)
    except ValueError:
        return 0


def _opt_int(element: Element | None, name: str) -> int | None:
    text = text_of(element, name)
    return int(text) if text.lstrip("-").isdigit() else None


def parse_sf_datetime(text: str) -> datetime | None:
    """``2026-05-01T10:00:00.000Z`` (SOAP dateTime) → aware UTC datetime."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_deploy_result(result: Element) -> DeployResult:
    details = _child(result, "details")
    components = tuple(
        ComponentFailure(
            file_name=text_of(item, "fileName"),
            full_name=text_of(item, "fullName"),
            component_type=text_of(item, "componentType"),
            problem_type=text_of(item, "problemType") or "Error",
            problem=text_of(item, "problem"),
            line=_opt_int(item, "lineNumber"),
            column=_opt_int(item, "columnNumber"),
        )
        for item in (_children(details, "componentFailures") if details is not None else [])
    )
    run = _child(details, "runTestResult")
    tests = tuple(
        TestFailure(
            class_name=text_of(item, "name"),
            method=text_of(item, "methodName"),
            message=text_of(item, "message"),
            stack_trace=text_of(item, "stackTrace"),
            namespace=text_of(item, "namespace"),
        )
        for item in (_children(run, "failures") if run is not None else [])
    )
    code_warnings = tuple(
        CodeCoverageWarning(
            message=text_of(item, "message"),
            name=text_of(item, "name"),
            namespace=text_of(item, "namespace"),
            id=text_of(item, "id"),
            type=text_of(item, "type"),
        )
        for item in (_children(run, "codeCoverageWarnings") if run is not None else [])
    )
    flow_warnings = tuple(
        FlowCoverageWarning(
            message=text_of(item, "message"),
            flow_name=text_of(item, "flowName"),
            flow_namespace=text_of(item, "flowNamespace"),
            flow_id=text_of(item, "flowId"),
        )
        for item in (_children(run, "flowCoverageWarnings") if run is not None else [])
    )
    return DeployResult(
        id=text_of(result, "id"),
        done=text_of(result, "done") == "true",
        status=text_of(result, "status"),
        success=text_of(result, "success") == "true",
        check_only=text_of(result, "checkOnly") == "true",
        state_detail=text_of(result, "stateDetail"),
        components_deployed=_int(result, "numberComponentsDeployed"),
        components_total=_int(result, "numberComponentsTotal"),
        component_errors=_int(result, "numberComponentErrors"),
        tests_completed=_int(result, "numberTestsCompleted"),
        tests_total=_int(result, "numberTestsTotal"),
        test_errors=_int(result, "numberTestErrors"),
        run_tests_enabled=text_of(result, "runTestsEnabled") == "true",
        rollback_on_error=text_of(result, "rollbackOnError") == "true",
        ignore_warnings=text_of(result, "ignoreWarnings") == "true",
        created_date=parse_sf_datetime(text_of(result, "createdDate")),
        start_date=parse_sf_datetime(text_of(result, "startDate")),
        completed_date=parse_sf_datetime(text_of(result, "completedDate")),
        error_message=text_of(result, "errorMessage"),
        error_status_code=text_of(result, "errorStatusCode"),
        canceled_by_name=text_of(result, "canceledByName"),
        component_failures=components,
        test_failures=tests,
        tests_run=_int(run, "numTestsRun"),
        code_coverage_warnings=code_warnings,
        flow_coverage_warnings=flow_warnings,
    )
