"""The Metadata API (SOAP) of a simulated production or sandbox org: deployments.

Mounted by ``SalesforceOrgSim`` at ``POST /services/Soap/m/{version}[/{orgId}]``; the session id
in ``SessionHeader`` must be one the org issued (expired sessions get ``sf:INVALID_SESSION_ID``).
Operations, as the Metadata API Developer Guide documents them:

    deploy(ZipFile, DeployOptions)        -> AsyncResult {done=false, id, state=Queued}
    checkDeployStatus(id, includeDetails) -> DeployResult (+ details when asked)
    cancelDeploy(id)                      -> CancelDeployResult {done, id}
    deployRecentValidation(validationId)  -> string (the new deployment id)

One deployment runs per org at a time; later ones stay ``Pending`` in submission order. A
running deployment processes its components one after another, then runs its Apex tests one
method after another, so a poller sees ``numberComponentsDeployed`` and
``numberTestsCompleted`` grow and ``stateDetail`` name what is being processed
(``Processing Type: ApexClass``, ``Running Test: Class.method``).

    Pending -> InProgress -> Succeeded | SucceededPartial | Failed
    Pending -> Canceled                      (cancelDeploy answers done=true)
    InProgress -> Canceling -> Canceled      (cancelDeploy answers done=false)

Nothing runs in the background: every request first brings all deployments up to the current
(wall-clock or injected) time.

Failures are triggered by names in the artifact, so tours and tests can provoke them:

* a component whose name starts with ``Broken`` fails; the first line of its file containing
  ``FAIL:`` gives the line number and the problem text (else line 1, a generic problem);
* an Apex class marked ``@isTest`` is a test class; its ``static void`` methods are tests, and
  a method whose name starts with ``fails`` fails with an assertion and a stack trace;
* a component whose name starts with ``Slow`` takes ``slow_component_seconds`` (to cancel it);
* in a production org, an Apex class or trigger (not a test) or a flow whose name starts with
  ``Uncovered`` has 0% test coverage: once the deployment's tests all pass it ends ``Failed`` on
  coverage alone — every component deployed, every test passed, no ``errorMessage`` — with
  ``details/runTestResult/codeCoverageWarnings`` (the org-wide average, ``uncovered_average``,
  against ``coverage_required``; then one entry per class/trigger) and ``flowCoverageWarnings``
  (one per flow). Sandbox orgs do not enforce coverage, as in Salesforce;
* ``fail_without_reason_next()`` makes the next deployment end ``Failed`` with no error, no
  failure and no warning at all, which real orgs also answer now and then.

Stack traces of failing tests: Salesforce's docs do not describe them. Real ones often start
with a line outside the org's code (``External entry point``); this sim writes that line first
for a test that fails on an exception (not an assertion), and the ``Class.…`` line after it.

Where the docs are silent the choice made is noted at the code: the fault code and text of a
refused ``deployRecentValidation`` (``INVALID_ID_FIELD``), the status when only tests fail
(``Failed``), tests running after a component failure (they do, so both lists are reported),
and the errors of production rule violations (``INVALID_OPERATION`` on the DeployResult).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element

from aiohttp import web
from defusedxml import ElementTree as SafeElementTree
from defusedxml.common import DefusedXmlException

from bot.sandbox.org_data import to_18
from bot.sandbox.served import close, serve

SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"
MD_NS = "http://soap.sforce.com/2006/04/metadata"
VALIDATION_DAYS = 10  # deployRecentValidation accepts validations from the last 10 days
FIRST_SOAP_VERSION = 30.0  # cancelDeploy appeared in 30.0; deployRecentValidation in 33.0
TEST_LEVELS = ("NoTestRun", "RunSpecifiedTests", "RunLocalTests", "RunAllTestsInOrg")
OPTION_NAMES = (
    "allowMissingFiles",
    "autoUpdatePackage",
    "checkOnly",
    "ignoreWarnings",
    "performRetrieve",
    "purgeOnDelete",
    "rollbackOnError",
    "singlePackage",
    "testLevel",
)
FOLDER_TYPES = {
    "applications": "CustomApplication",
    "aura": "AuraDefinitionBundle",
    "classes": "ApexClass",
    "components": "ApexComponent",
    "customMetadata": "CustomMetadata",
    "flows": "Flow",
    "labels": "CustomLabels",
    "layouts": "Layout",
    "lwc": "LightningComponentBundle",
    "objects": "CustomObject",
    "pages": "ApexPage",
    "permissionsets": "PermissionSet",
    "profiles": "Profile",
    "staticresources": "StaticResource",
    "tabs": "CustomTab",
    "triggers": "ApexTrigger",
}
BUNDLE_FOLDERS = {"aura", "lwc"}
_TEST_CLASS = re.compile(r"@istest", re.IGNORECASE)
_TEST_METHOD = re.compile(r"\bstatic\s+(?:testmethod\s+)?void\s+(\w+)\s*\(", re.IGNORECASE)
_DESTRUCTIVE = re.compile(r"^destructiveChanges(?:Pre|Post)?\.xml$")


def sf_datetime(epoch: float) -> str:
    """SOAP ``dateTime`` as Salesforce writes it: ``2026-05-01T10:00:00.000Z``."""
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _esc(value: object) -> str:
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


class _PlanError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SoapFault(Exception):
    """A SOAP fault answer: HTTP 500 with ``faultcode`` ``sf:<CODE>`` and a ``faultstring``."""

    def __init__(self, code: str, message: str, *, prefix: str = "sf") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.prefix = prefix


# --------------------------------------------------------------------------- deployment model


@dataclass
class _Component:
    type: str
    name: str
    file_name: str
    seconds: float
    failure: tuple[int, int, str] | None = None  # (line, column, problem)
    deleted: bool = False


@dataclass(frozen=True)
class _Test:
    class_name: str
    method: str
    line: int  # where the failing assertion is (the stack trace's line)
    fails: bool
    namespace: str = ""
    message: str = "System.AssertException: Assertion Failed: Expected: true, Actual: false"

    @property
    def stack_trace(self) -> str:
        frame = f"Class.{self.class_name}.{self.method}: line {self.line}, column 1"
        if self.message.startswith("System.AssertException"):
            return frame
        return f"External entry point\n{frame}"


@dataclass
class SimDeployment:
    id: str
    created_at: float
    options: dict[str, Any]
    components: list[_Component] = field(default_factory=list)
    tests: list[_Test] = field(default_factory=list)
    validation_of: str | None = None  # for a quick deploy: the validation it deploys
    start_at: float | None = None
    cancel_requested_at: float | None = None
    completed_at: float | None = None
    status: str = "Pending"
    error_message: str = ""
    error_status_code: str = ""
    quick_deployed_as: str | None = None  # a validation already used by deployRecentValidation
    test_classes: dict[str, list[_Test]] = field(default_factory=dict)  # Apex test classes it deploys
    fails_without_reason: bool = False
    coverage_failed: bool = False  # every test passed, but coverage is below the threshold
    # progress (recomputed while running, frozen when done)
    components_done: int = 0
    component_errors: int = 0
    tests_done: int = 0
    test_errors: int = 0
    state_detail: str = ""

    @property
    def check_only(self) -> bool:
        return bool(self.options.get("checkOnly"))

    @property
    def done(self) -> bool:
        return self.status in {"Succeeded", "SucceededPartial", "Failed", "Canceled"}

    def steps(self) -> list[tuple[str, _Component | _Test, float]]:
        return [("component", c, c.seconds) for c in self.components] + [("test", t, 0.0) for t in self.tests]


@dataclass(frozen=True)
class SoapRequest:
    """What the org received, for tests: the operation and its arguments (never the session)."""

    operation: str
    args: dict[str, Any]


@dataclass
class _Faults:
    drop: int = 0
    statuses: list[int] = field(default_factory=list)
    soap: list[tuple[str, str]] = field(default_factory=list)
    silent_failures: int = 0


# --------------------------------------------------------------------------- the endpoint


class MetadataApiSim:
    """Deployments of one simulated org. Pacing and failure knobs are plain attributes."""

    def __init__(
        self,
        *,
        org_id: str,
        kind: str,
        session_ok: Callable[[str], bool],
        clock: Callable[[], float],
        api_version: str = "61.0",
        user_id: str = "005000000000001AAA",
    ) -> None:
        self.org_id = org_id
        self.kind = kind
        self.production = kind == "production"
        self._session_ok = session_ok
        self.clock = clock
        self.api_version = api_version
        self.user_id = user_id
        self.component_seconds = 0.05
        self.slow_component_seconds = 60.0
        self.test_seconds = 0.1
        self.cancel_seconds = 3.0  # Canceling lasts a moment, as in Salesforce
        self.uncovered_average = 68  # the org-wide Apex coverage once an Uncovered* class is in
        self.coverage_required = 75
        self.trigger_coverage_required = 1  # each trigger needs some coverage
        self.deployments: dict[str, SimDeployment] = {}
        self.requests: list[SoapRequest] = []
        self._faults = _Faults()
        self._counter = 0
        self._free_at = 0.0
        # What the org already has: components by (type, name) and its Apex tests.
        self.org_components: set[tuple[str, str]] = {
            ("ApexClass", "AccountTriggerHandler"),
            ("ApexClass", "OpportunityService"),
            ("ApexClass", "LegacyInvoiceHelper"),
            ("ApexClass", "AccountTriggerTest"),
            ("ApexClass", "OpportunityServiceTest"),
            ("ApexTrigger", "AccountTrigger"),
        }
        self.org_tests: dict[str, list[_Test]] = {
            "AccountTriggerTest": [
                _Test("AccountTriggerTest", "testInsert", 8, False),
                _Test("AccountTriggerTest", "testUpdate", 17, False),
            ],
            "OpportunityServiceTest": [
                _Test("OpportunityServiceTest", "testClose", 6, False),
                _Test("OpportunityServiceTest", "testReopen", 15, False),
                _Test("OpportunityServiceTest", "testBulkClose", 24, False),
            ],
            # A managed package's test: only RunAllTestsInOrg runs it.
            "acme__BillingTest": [_Test("BillingTest", "testInvoiceRun", 11, False, namespace="acme")],
        }

    # ---- knobs and state for tests

    def drop_next(self, n: int) -> None:
        """Close the connection of the next n SOAP calls without answering."""
        self._faults.drop += n

    def fail_next(self, n: int, status: int = 500) -> None:
        """The next n SOAP calls answer ``status`` with an HTML page (no SOAP fault)."""
        self._faults.statuses.extend([status] * n)

    def fault_next(self, code: str, message: str, n: int = 1) -> None:
        """The next n SOAP calls answer this fault (e.g. REQUEST_LIMIT_EXCEEDED)."""
        self._faults.soap.extend([(code, message)] * n)

    def fail_without_reason_next(self, n: int = 1) -> None:
        """The next n deployments end Failed with no error, failure or warning."""
        self._faults.silent_failures += n

    def backdate(self, deploy_id: str, *, days: float) -> None:
        """Move a deployment ``days`` into the past (to age a validation past 10 days)."""
        deployment = self.deployments[deploy_id]
        shift = days * 86400.0
        deployment.created_at -= shift
        if deployment.start_at is not None:
            deployment.start_at -= shift
        if deployment.completed_at is not None:
            deployment.completed_at -= shift

    def snapshot(self, deploy_id: str) -> SimDeployment:
        self.advance(self.clock())
        return self.deployments[deploy_id]

    def calls(self, operation: str) -> list[SoapRequest]:
        return [request for request in self.requests if request.operation == operation]

    # ---- HTTP

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self._faults.drop:
            self._faults.drop -= 1
            if request.transport is not None:
                request.transport.close()
            raise asyncio.CancelledError  # aiohttp drops the request without answering
        if self._faults.statuses:
            status = self._faults.statuses.pop(0)
            return web.Response(status=status, text=f"<html><body>{status}</body></html>", content_type="text/html")
        try:
            version = float(request.match_info.get("version", "0"))
            if not FIRST_SOAP_VERSION <= version <= float(self.api_version):
                raise SoapFault("UNSUPPORTED_API_VERSION", f"Invalid Api version specified on URL: {version}")
            root = self._parse(await request.read())
            session, operation = self._envelope_parts(root)
            if not self._session_ok(session):
                raise SoapFault(
                    "INVALID_SESSION_ID",
                    "INVALID_SESSION_ID: Invalid Session ID found in SessionHeader: Illegal Session",
                )
            if self._faults.soap:
                code, message = self._faults.soap.pop(0)
                raise SoapFault(code, message)
            self.advance(self.clock())
            name = _local(operation.tag)
            handlers = {
                "deploy": self._deploy,
                "checkDeployStatus": self._check_deploy_status,
                "cancelDeploy": self._cancel_deploy,
                "deployRecentValidation": self._deploy_recent_validation,
            }
            if name not in handlers:
                raise SoapFault("Client", f"No operation available for request {{{MD_NS}}}{name}", prefix="soapenv")
            if name == "deployRecentValidation" and version < 33.0:
                raise SoapFault("INVALID_OPERATION", "deployRecentValidation requires API version 33.0 or later")
            body = handlers[name](operation)
            return _soap_response(f"{name}Response", body)
        except SoapFault as fault:
            return _soap_fault(fault)

    def _parse(self, body: bytes) -> Element:
        try:
            root: Element = SafeElementTree.fromstring(body, forbid_dtd=True)
            return root
        except (SafeElementTree.ParseError, DefusedXmlException, ValueError):
            raise SoapFault("Client", "Unable to parse the SOAP request: malformed XML", prefix="soapenv") from None

    def _envelope_parts(self, root: Element) -> tuple[str, Element]:
        if root.tag != f"{{{SOAP_NS}}}Envelope":
            raise SoapFault("VersionMismatch", "Wrong SOAP envelope namespace", prefix="soapenv")
        header = root.find(f"{{{SOAP_NS}}}Header")
        body = root.find(f"{{{SOAP_NS}}}Body")
        session = ""
        if header is not None:
            element = header.find(f"{{{MD_NS}}}SessionHeader/{{{MD_NS}}}sessionId")
            session = (element.text or "").strip() if element is not None else ""
        if body is None or len(body) == 0:
            raise SoapFault("Client", "The SOAP body is empty", prefix="soapenv")
        operation = body[0]
        if not operation.tag.startswith(f"{{{MD_NS}}}"):
            raise SoapFault("Client", f"Unexpected element {operation.tag} in the SOAP body", prefix="soapenv")
        return session, operation

    # ---- operations

    def _deploy(self, operation: Element) -> str:
        zip_text = _arg(operation, "ZipFile")
        options_element = operation.find(f"{{{MD_NS}}}DeployOptions")
        options: dict[str, Any] = {"runTests": []}
        if options_element is not None:
            for child in options_element:
                name, value = _local(child.tag), (child.text or "").strip()
                if name == "runTests":
                    options["runTests"].append(value)
                elif name in OPTION_NAMES:
                    options[name] = value if name == "testLevel" else value == "true"
                else:
                    raise SoapFault(
                        "Client", f"Unexpected element {{{MD_NS}}}{name} in DeployOptions", prefix="soapenv"
                    )
        try:
            data = base64.b64decode(zip_text, validate=True)
        except (binascii.Error, ValueError):
            raise SoapFault("INVALID_ZIP", "ZipFile is not valid base64") from None
        deployment = SimDeployment(id=self._new_id(), created_at=self.clock(), options=options)
        if self._faults.silent_failures:
            self._faults.silent_failures -= 1
            deployment.fails_without_reason = True
        self.deployments[deployment.id] = deployment
        entries = self._plan(deployment, data)
        self.requests.append(SoapRequest("deploy", {**options, "entries": entries, "zip_bytes": len(data)}))
        if deployment.done:
            deployment.completed_at = deployment.created_at
        self.advance(self.clock())
        return f"<done>false</done><id>{deployment.id}</id><state>Queued</state>"

    def _check_deploy_status(self, operation: Element) -> str:
        deploy_id = _arg(operation, "asyncProcessId")
        details = _arg(operation, "includeDetails") == "true"
        self.requests.append(SoapRequest("checkDeployStatus", {"id": deploy_id, "includeDetails": details}))
        return self._result_xml(self._find(deploy_id), details=details)

    def _cancel_deploy(self, operation: Element) -> str:
        deploy_id = _arg(operation, "String")
        self.requests.append(SoapRequest("cancelDeploy", {"id": deploy_id}))
        deployment = self._find(deploy_id)
        now = self.clock()
        if deployment.done:
            # The documented fault for a finished deployment.
            raise SoapFault("INVALID_ID_FIELD", "INVALID_ID_FIELD: Deployment already completed")
        if deployment.start_at is None:
            deployment.status = "Canceled"
            deployment.completed_at = now
            return f"<done>true</done><id>{deployment.id}</id>"
        if deployment.cancel_requested_at is None:
            deployment.cancel_requested_at = now
            deployment.status = "Canceling"
        return f"<done>false</done><id>{deployment.id}</id>"

    def _deploy_recent_validation(self, operation: Element) -> str:
        validation_id = _arg(operation, "validationId")
        self.requests.append(SoapRequest("deployRecentValidation", {"validationId": validation_id}))
        validation = self._find(validation_id)
        now = self.clock()
        # Docs: the validation must have succeeded, run Apex tests that passed, and be from the
        # last 10 days. They are silent on the fault; this sim answers INVALID_ID_FIELD.
        reason = ""
        if not validation.check_only:
            reason = "it is not a validation (checkOnly deployment)"
        elif validation.status != "Succeeded":
            reason = f"the validation did not succeed ({validation.status})"
        elif not validation.tests:
            reason = "no Apex tests ran as part of the validation"
        elif validation.completed_at is not None and now - validation.completed_at > VALIDATION_DAYS * 86400:
            reason = "the validation is more than 10 days old"
        elif validation.quick_deployed_as:
            reason = f"it was already quick-deployed as {validation.quick_deployed_as}"
        if reason:
            raise SoapFault("INVALID_ID_FIELD", f"INVALID_ID_FIELD: This validation can't be quick deployed: {reason}")
        quick = SimDeployment(
            id=self._new_id(),
            created_at=now,
            options={**validation.options, "checkOnly": False},
            components=[
                _Component(c.type, c.name, c.file_name, c.seconds, None, c.deleted) for c in validation.components
            ],
            validation_of=validation.id,
        )
        validation.quick_deployed_as = quick.id
        self.deployments[quick.id] = quick
        self.advance(now)
        return quick.id

    def _find(self, deploy_id: str) -> SimDeployment:
        for key, deployment in self.deployments.items():
            if deploy_id and (key == deploy_id or key[:15] == deploy_id[:15]):
                return deployment
        raise SoapFault("INVALID_ID_FIELD", "INVALID_ID_FIELD: Invalid deploy ID")

    def _new_id(self) -> str:
        self._counter += 1
        digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
        value, text = self._counter, ""
        while value:
            value, rest = divmod(value, 62)
            text = digits[rest] + text
        # Two characters of the org id stand for the pod, so ids of different orgs differ.
        return to_18(f"0Af{self.org_id[-3:-1]}0{text.rjust(9, '0')}")

    # ---- planning a deployment from its zip

    def _plan(self, deployment: SimDeployment, data: bytes) -> list[str]:
        """Components and tests of the deployment, or a Failed deployment with its error."""
        options = deployment.options

        def fail(code: str, message: str) -> list[str]:
            deployment.status = "Failed"
            deployment.error_status_code = code
            deployment.error_message = message
            return entries

        entries: list[str] = []
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
            entries = [info.filename for info in archive.infolist() if not info.is_dir()]
        except zipfile.BadZipFile:
            return fail("INVALID_ZIP", "The ZipFile is not a valid zip archive")
        # Production rules (Metadata API docs, DeployOptions). The docs do not give the errors;
        # this sim fails the deployment with INVALID_OPERATION and a one-line reason.
        if self.production:
            if options.get("testLevel") == "NoTestRun":
                return fail("INVALID_OPERATION", "testLevel of NoTestRun cannot be used in production organizations")
            if options.get("rollbackOnError") is False:
                return fail("INVALID_OPERATION", "rollbackOnError must be true for deployments to production")
            for name in ("purgeOnDelete", "allowMissingFiles", "autoUpdatePackage"):
                if options.get(name):
                    return fail("INVALID_OPERATION", f"{name} is not allowed in production organizations")
        level = options.get("testLevel")
        if level is not None and level not in TEST_LEVELS:
            return fail("INVALID_OPERATION", f"Unknown testLevel: {level}")
        if options["runTests"] and level != "RunSpecifiedTests":
            return fail("INVALID_OPERATION", "runTests can only be used with a testLevel of RunSpecifiedTests")
        if level == "RunSpecifiedTests" and not options["runTests"]:
            return fail("INVALID_OPERATION", "A RunSpecifiedTests deployment needs at least one runTests class")
        single = options.get("singlePackage", False)
        roots = [name[: -len("package.xml")] for name in entries if name.rsplit("/", 1)[-1] == "package.xml"]
        roots = [root for root in roots if root == "" or (not single and root.count("/") == 1)]
        if not roots:
            return fail("INVALID_ZIP", "No package.xml found")
        for root in roots:
            for name in entries:
                if not name.startswith(root) or name == root + "package.xml":
                    continue
                relative = name[len(root) :]
                if _DESTRUCTIVE.match(relative):
                    deployment.components.extend(self._destructive(archive.read(name), name))
                    continue
                component = self._component(archive, name, relative)
                if component is not None and not any(
                    c.type == component.type and c.name == component.name for c in deployment.components
                ):
                    deployment.components.append(component)
        try:
            deployment.tests = self._select_tests(deployment, archive)
        except _PlanError as error:
            return fail(error.code, error.message)
        return entries

    def _component(self, archive: zipfile.ZipFile, name: str, relative: str) -> _Component | None:
        parts = relative.split("/")
        if len(parts) < 2 or relative.endswith("-meta.xml"):
            return None
        folder = parts[0]
        ctype = FOLDER_TYPES.get(folder, folder[:1].upper() + folder[1:])
        if folder in BUNDLE_FOLDERS:
            component_name = parts[1]
            file_name = name.rsplit("/", len(parts) - 2)[0] if len(parts) > 2 else name
        else:
            component_name = parts[-1].rsplit(".", 1)[0]
            file_name = name
        seconds = self.slow_component_seconds if component_name.startswith("Slow") else self.component_seconds
        failure = None
        if component_name.startswith("Broken"):
            failure = (1, 1, "Unexpected token '}'.")
            text = archive.read(name).decode("utf-8", "replace") if folder not in BUNDLE_FOLDERS else ""
            for number, line in enumerate(text.splitlines(), start=1):
                if "FAIL:" in line:
                    failure = (number, line.index("FAIL:") + 1, line.split("FAIL:", 1)[1].strip() or "Compile error")
                    break
        return _Component(ctype, component_name, file_name, seconds, failure)

    def _destructive(self, data: bytes, file_name: str) -> list[_Component]:
        try:
            root = SafeElementTree.fromstring(data, forbid_dtd=True)
        except (SafeElementTree.ParseError, DefusedXmlException, ValueError):
            return [_Component("Package", file_name, file_name, 0.0, (1, 1, "Invalid XML in destructive changes"))]
        components: list[_Component] = []
        for types in root.findall(f"{{{MD_NS}}}types"):
            type_name = (types.findtext(f"{{{MD_NS}}}name") or "").strip()
            for member in types.findall(f"{{{MD_NS}}}members"):
                member_name = (member.text or "").strip()
                failure = None
                if (type_name, member_name) not in self.org_components:
                    # Salesforce reports deleting something that is not there as a warning-like
                    # failure; this sim reports it as an error so it is visible.
                    failure = (0, 0, f"No {type_name} named: {member_name} found")
                components.append(
                    _Component(type_name, member_name, file_name, self.component_seconds, failure, deleted=True)
                )
        return components

    def _select_tests(self, deployment: SimDeployment, archive: zipfile.ZipFile) -> list[_Test]:
        for component in deployment.components:
            if component.type != "ApexClass" or component.deleted or component.failure is not None:
                continue
            text = archive.read(component.file_name).decode("utf-8", "replace")
            if not _TEST_CLASS.search(text):
                continue
            deployment.test_classes[component.name] = _test_methods(component.name, text)
        available = {**self.org_tests, **deployment.test_classes}
        has_apex = any(c.type in {"ApexClass", "ApexTrigger"} for c in deployment.components)
        level = deployment.options.get("testLevel")
        if level is None:
            # Docs: without a test level, production runs local tests when the package has Apex;
            # other orgs run none.
            level = "RunLocalTests" if self.production and has_apex else "NoTestRun"
        if level == "NoTestRun":
            return []
        if level == "RunSpecifiedTests":
            chosen: list[_Test] = []
            for spec in deployment.options["runTests"]:
                class_name, _, method = spec.partition(".")
                if class_name not in available:
                    raise _PlanError("INVALID_OPERATION", f"No Apex test class named {class_name} was found")
                chosen.extend(t for t in available[class_name] if not method or t.method == method)
            return chosen
        local = level == "RunLocalTests"
        return [test for name, tests in available.items() if not (local and "__" in name) for test in tests]

    # ---- time

    def advance(self, now: float) -> None:
        """Bring every deployment to ``now``: one runs at a time, in submission order."""
        for deployment in self.deployments.values():
            if deployment.done:
                continue
            if deployment.start_at is None:
                deployment.start_at = max(deployment.created_at, self._free_at)
                deployment.status = "InProgress"
            finish = self._progress(deployment, now)
            if finish is None:
                return  # still running: everything after it stays Pending
            self._free_at = finish

    def _progress(self, deployment: SimDeployment, now: float) -> float | None:
        """Update counters at ``now``; the completion time if it is over, else None."""
        assert deployment.start_at is not None
        cutoff = now
        cancel_at = None
        if deployment.cancel_requested_at is not None:
            cancel_at = deployment.cancel_requested_at + self.cancel_seconds
            cutoff = min(now, deployment.cancel_requested_at)
        deployment.components_done = deployment.component_errors = 0
        deployment.tests_done = deployment.test_errors = 0
        deployment.state_detail = ""
        moment = deployment.start_at
        finished_all = True
        for kind, item, seconds in deployment.steps():
            length = seconds if kind == "component" else self.test_seconds
            if moment + length > cutoff:
                finished_all = False
                if isinstance(item, _Component):
                    deployment.state_detail = f"Processing Type: {item.type}"
                else:
                    deployment.state_detail = f"Running Test: {item.class_name}.{item.method}"
                break
            moment += length
            if isinstance(item, _Component):
                deployment.components_done += 1
                deployment.component_errors += item.failure is not None
            else:
                deployment.tests_done += 1
                deployment.test_errors += item.fails
        if finished_all and (cancel_at is None or moment <= cancel_at) and moment <= now:
            self._finish(deployment, moment)
            return moment
        if cancel_at is not None and cancel_at <= now:
            deployment.status = "Canceled"
            deployment.state_detail = ""
            deployment.completed_at = cancel_at
            return cancel_at
        deployment.status = "Canceling" if cancel_at is not None else "InProgress"
        return None

    def _finish(self, deployment: SimDeployment, moment: float) -> None:
        deployment.completed_at = moment
        deployment.state_detail = ""
        options = deployment.options
        if deployment.component_errors == 0 and deployment.test_errors == 0:
            deployment.coverage_failed = bool(self._uncovered(deployment))
            failed = deployment.coverage_failed or deployment.fails_without_reason
            deployment.status = "Failed" if failed else "Succeeded"
        elif deployment.test_errors or deployment.check_only or options.get("rollbackOnError"):
            # Docs are silent on failing tests with rollbackOnError=false; this sim fails them.
            deployment.status = "Failed"
        else:
            deployment.status = "SucceededPartial"
        if deployment.check_only or deployment.status == "Failed":
            return
        for component in deployment.components:
            if component.failure is not None:
                continue
            key = (component.type, component.name)
            if component.deleted:
                self.org_components.discard(key)
                self.org_tests.pop(component.name, None)
            else:
                self.org_components.add(key)
        self.org_tests.update(deployment.test_classes)

    def _uncovered(self, deployment: SimDeployment) -> list[_Component]:
        """What this deployment brings at 0% coverage, where the org enforces coverage."""
        if not self.production or not deployment.tests:
            return []
        return [
            c
            for c in deployment.components
            if c.name.startswith("Uncovered")
            and not c.deleted
            and c.type in {"ApexClass", "ApexTrigger", "Flow"}
            and c.name not in deployment.test_classes
        ]

    # ---- responses

    def _result_xml(self, deployment: SimDeployment, *, details: bool) -> str:
        options = deployment.options
        done = deployment.done
        fields: list[tuple[str, object]] = [("checkOnly", _b(deployment.check_only))]
        if deployment.completed_at is not None and done:
            fields.append(("completedDate", sf_datetime(deployment.completed_at)))
        fields += [
            ("createdBy", self.user_id[:15]),
            ("createdByName", "Release Manager"),
            ("createdDate", sf_datetime(deployment.created_at)),
        ]
        parts = [f"<{name}>{_esc(value)}</{name}>" for name, value in fields]
        if details:
            parts.append(self._details_xml(deployment))
        tail: list[tuple[str, object]] = [("done", _b(done))]
        if deployment.error_message:
            tail += [("errorMessage", deployment.error_message), ("errorStatusCode", deployment.error_status_code)]
        tail += [
            ("id", deployment.id),
            ("ignoreWarnings", _b(bool(options.get("ignoreWarnings")))),
            ("lastModifiedDate", sf_datetime(deployment.completed_at or deployment.start_at or deployment.created_at)),
            ("numberComponentErrors", deployment.component_errors),
            ("numberComponentsDeployed", deployment.components_done - deployment.component_errors),
            ("numberComponentsTotal", len(deployment.components)),
            ("numberTestErrors", deployment.test_errors),
            ("numberTestsCompleted", deployment.tests_done - deployment.test_errors),
            ("numberTestsTotal", len(deployment.tests)),
            ("rollbackOnError", _b(bool(options.get("rollbackOnError")))),
            ("runTestsEnabled", _b(bool(deployment.tests))),
        ]
        if deployment.start_at is not None and deployment.status != "Pending":
            tail.append(("startDate", sf_datetime(deployment.start_at)))
        if deployment.state_detail and not done:
            tail.append(("stateDetail", deployment.state_detail))
        tail += [("status", deployment.status), ("success", _b(deployment.status in {"Succeeded", "SucceededPartial"}))]
        parts += [f"<{name}>{_esc(value)}</{name}>" for name, value in tail]
        return "".join(parts)

    def _details_xml(self, deployment: SimDeployment) -> str:
        stamp = sf_datetime(deployment.created_at)
        failures: list[str] = []
        successes: list[str] = []
        for index, component in enumerate(deployment.components[: deployment.components_done]):
            common = (
                f"<changed>{_b(component.failure is None)}</changed>"
                + (
                    f"<columnNumber>{component.failure[1]}</columnNumber>"
                    if component.failure and component.failure[1]
                    else ""
                )
                + f"<componentType>{_esc(component.type)}</componentType>"
                + f"<created>{_b(component.failure is None and not component.deleted)}</created>"
                + f"<createdDate>{stamp}</createdDate>"
                + f"<deleted>{_b(component.deleted and component.failure is None)}</deleted>"
                + f"<fileName>{_esc(component.file_name)}</fileName>"
                + f"<fullName>{_esc(component.name)}</fullName>"
            )
            if component.failure is not None:
                line, _, problem = component.failure
                failures.append(
                    "<componentFailures>"
                    + common
                    + (f"<lineNumber>{line}</lineNumber>" if line else "")
                    + f"<problem>{_esc(problem)}</problem><problemType>Error</problemType>"
                    + "<success>false</success></componentFailures>"
                )
            else:
                successes.append(
                    f"<componentSuccesses>{common}<id>{self._component_id(index)}</id><success>true</success></componentSuccesses>"
                )
        run = deployment.tests[: deployment.tests_done]
        test_failures = "".join(
            "<failures>"
            + f"<id>{self._component_id(1000 + index)}</id>"
            + f"<message>{_esc(test.message)}</message>"
            + f"<methodName>{_esc(test.method)}</methodName><name>{_esc(test.class_name)}</name>"
            + (f"<namespace>{_esc(test.namespace)}</namespace>" if test.namespace else '<namespace xsi:nil="true"/>')
            + f"<packageName>{_esc(test.class_name)}</packageName>"
            + f"<stackTrace>{_esc(test.stack_trace)}</stackTrace>"
            + f"<time>{int(self.test_seconds * 1000)}</time><type>Class</type></failures>"
            for index, test in enumerate(run)
            if test.fails
        )
        test_successes = "".join(
            f"<successes><id>{self._component_id(2000 + index)}</id><methodName>{_esc(test.method)}</methodName>"
            f"<name>{_esc(test.class_name)}</name><time>{int(self.test_seconds * 1000)}</time></successes>"
            for index, test in enumerate(run)
            if not test.fails
        )
        code_warnings, flow_warnings = self._coverage_warnings_xml(deployment)
        # RunTestsResult's sequence: codeCoverage*, codeCoverageWarnings*, failures*, flowCoverage*,
        # flowCoverageWarnings*, numFailures, numTestsRun, successes*, totalTime.
        run_result = (
            "<runTestResult>"
            + code_warnings
            + test_failures
            + flow_warnings
            + f"<numFailures>{sum(1 for t in run if t.fails)}</numFailures><numTestsRun>{len(run)}</numTestsRun>"
            + test_successes
            + f"<totalTime>{int(len(run) * self.test_seconds * 1000)}</totalTime></runTestResult>"
        )
        return "<details>" + "".join(failures) + "".join(successes) + run_result + "</details>"

    def _coverage_warnings_xml(self, deployment: SimDeployment) -> tuple[str, str]:
        """``codeCoverageWarnings`` and ``flowCoverageWarnings`` of a deployment that failed on
        coverage. The docs give the elements, not the messages: these are the texts real orgs
        send for Apex; the per-flow text is this sim's own (the docs and the results seen are silent)."""
        if not deployment.coverage_failed:
            return "", ""
        nil = '<namespace xsi:nil="true"/>'
        code = [
            f"<codeCoverageWarnings><id>{self._component_id(3000)}</id>"
            f"<message>Average test coverage across all Apex Classes and Triggers is {self.uncovered_average}%, "
            f"at least {self.coverage_required}% test coverage is required.</message>"
            f'<name xsi:nil="true"/>{nil}</codeCoverageWarnings>'
        ]
        flows = []
        for index, component in enumerate(self._uncovered(deployment)):
            if component.type == "Flow":
                flows.append(
                    f"<flowCoverageWarnings><flowId>{to_18(f'301{self.org_id[-3:-1]}0{index:09d}')}</flowId>"
                    f'<flowName>{_esc(component.name)}</flowName><flowNamespace xsi:nil="true"/>'
                    f"<message>Test coverage of selected Flow is 0%, at least {self.coverage_required}% "
                    "test coverage is required</message></flowCoverageWarnings>"
                )
                continue
            kind, required = (
                ("Apex Trigger", self.trigger_coverage_required)
                if component.type == "ApexTrigger"
                else ("Apex Class", self.coverage_required)
            )
            code.append(
                f"<codeCoverageWarnings><id>{self._component_id(3001 + index)}</id>"
                f"<message>Test coverage of selected {kind} is 0%, at least {required}% test coverage is required"
                f"</message><name>{_esc(component.name)}</name>{nil}</codeCoverageWarnings>"
            )
        return "".join(code), "".join(flows)

    def _component_id(self, index: int) -> str:
        return to_18(f"01p{self.org_id[-3:-1]}0{index:09d}")


def _test_methods(class_name: str, text: str) -> list[_Test]:
    """Every ``static void`` method of a test class; one whose name starts with ``fails`` fails
    at its first ``FAIL: <message>`` line (else two lines into the method, with an assertion)."""
    matches = list(_TEST_METHOD.finditer(text))
    tests: list[_Test] = []
    for index, match in enumerate(matches):
        name = match.group(1)
        start_line = text.count("\n", 0, match.start()) + 1
        if not name.lower().startswith("fails"):
            tests.append(_Test(class_name, name, start_line, False))
            continue
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        body = text[match.start() : end]
        marker = body.find("FAIL:")
        if marker < 0:
            tests.append(_Test(class_name, name, start_line + 2, True))
            continue
        line = start_line + body.count("\n", 0, marker)
        message = body[marker + len("FAIL:") :].split("\n", 1)[0].strip()
        tests.append(_Test(class_name, name, line, True, message=message or _Test.message))
    return tests


def _b(value: bool) -> str:
    return "true" if value else "false"


def _arg(operation: Element, name: str) -> str:
    element = operation.find(f"{{{MD_NS}}}{name}")
    if element is None:
        raise SoapFault("Client", f"Missing element {{{MD_NS}}}{name}", prefix="soapenv")
    return (element.text or "").strip()


def _soap_response(element: str, result: str) -> web.Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<soapenv:Envelope xmlns:soapenv="{SOAP_NS}" xmlns="{MD_NS}" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        f"<soapenv:Body><{element}><result>{result}</result></{element}></soapenv:Body></soapenv:Envelope>"
    )
    return web.Response(status=200, body=body.encode(), content_type="text/xml", charset="UTF-8")


def _soap_fault(fault: SoapFault) -> web.Response:
    """Salesforce's fault shape: HTTP 500, faultcode ``sf:CODE``, faultstring, and the
    ``UnexpectedErrorFault`` detail carrying the same code."""
    detail = ""
    if fault.prefix == "sf":
        detail = (
            '<detail><sf:UnexpectedErrorFault xsi:type="sf:UnexpectedErrorFault">'
            f"<sf:exceptionCode>{_esc(fault.code)}</sf:exceptionCode>"
            f"<sf:exceptionMessage>{_esc(fault.message)}</sf:exceptionMessage>"
            "</sf:UnexpectedErrorFault></detail>"
        )
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<soapenv:Envelope xmlns:soapenv="{SOAP_NS}" xmlns:sf="{MD_NS}" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault>'
        f"<faultcode>{fault.prefix}:{_esc(fault.code)}</faultcode><faultstring>{_esc(fault.message)}</faultstring>"
        f"{detail}</soapenv:Fault></soapenv:Body></soapenv:Envelope>"
    )
    return web.Response(status=500, body=body.encode(), content_type="text/xml", charset="UTF-8")


# --------------------------------------------------------------------------- sample artifacts

_PACKAGE = """<?xml version="1.0" encoding="UTF-8"?>
<Package xmlns="http://soap.sforce.com/2006/04/metadata">
{types}    <version>61.0</version>
</Package>
"""
_CLASS_META = """<?xml version="1.0" encoding="UTF-8"?>
<ApexClass xmlns="http://soap.sforce.com/2006/04/metadata">
    <apiVersion>61.0</apiVersion>
    <status>Active</status>
</ApexClass>
"""
_TRIGGER_META = _CLASS_META.replace("ApexClass", "ApexTrigger")


def _package_xml(types: dict[str, list[str]]) -> str:
    blocks = ""
    for name, members in sorted(types.items()):
        blocks += "    <types>\n"
        blocks += "".join(f"        <members>{member}</members>\n" for member in members)
        blocks += f"        <name>{name}</name>\n    </types>\n"
    return _PACKAGE.format(types=blocks)


def _apex_class(name: str, body: str) -> dict[str, str]:
    return {f"classes/{name}.cls": body, f"classes/{name}.cls-meta.xml": _CLASS_META}


def _test_class(name: str, methods: list[str], failures: dict[str, str] | None = None) -> str:
    lines = ["@isTest", f"private class {name} {{"]
    for method in methods:
        lines += [
            "    @isTest",
            f"    static void {method}() {{",
            "        Invoice__c invoice = new Invoice__c(Amount__c = 100);",
            "        insert invoice;",
        ]
        if method in (failures or {}):
            lines.append(f"        // FAIL: {(failures or {})[method]}")
        lines += ["        System.assert(InvoiceService.total(invoice.Id) > 0);", "    }", ""]
    return "\n".join([*lines, "}", ""])


_OBJECT = """<?xml version="1.0" encoding="UTF-8"?>
<CustomObject xmlns="http://soap.sforce.com/2006/04/metadata">
    <label>Invoice</label>
    <pluralLabel>Invoices</pluralLabel>
    <nameField><label>Invoice Number</label><type>AutoNumber</type></nameField>
    <deploymentStatus>Deployed</deploymentStatus>
    <sharingModel>ReadWrite</sharingModel>
</CustomObject>
"""
_SERVICE = """public with sharing class InvoiceService {
    public static Decimal total(Id invoiceId) {
        Invoice__c invoice = [SELECT Amount__c FROM Invoice__c WHERE Id = :invoiceId];
        return invoice.Amount__c;
    }
}
"""


def _good_files() -> dict[str, str]:
    files = {
        "objects/Invoice__c.object": _OBJECT,
        **_apex_class("InvoiceService", _SERVICE),
        **_apex_class(
            "InvoiceServiceTest", _test_class("InvoiceServiceTest", ["testTotal", "testZeroAmount", "testBulk"])
        ),
    }
    files["package.xml"] = _package_xml(
        {"ApexClass": ["InvoiceService", "InvoiceServiceTest"], "CustomObject": ["Invoice__c"]}
    )
    return files


def _failing_files() -> dict[str, str]:
    files = _good_files()
    files.update(
        _apex_class(
            "BrokenInvoiceCalc",
            "public class BrokenInvoiceCalc {\n    public static Decimal net(Decimal gross) {\n"
            "        Decimal result = gross;\n        // the tax rate moved to custom metadata\n"
            "        // FAIL: Variable does not exist: taxRate\n        return result * (1 - taxRate);\n    }\n}\n",
        )
    )
    files.update(
        _apex_class(
            "BrokenTaxRule",
            "public class BrokenTaxRule {\n    public Decimal apply(Decimal amount) {\n"
            "        // FAIL: Method does not exist or incorrect signature: void round(Decimal) from the type Math\n"
            "        return Math.round(amount);\n    }\n}\n",
        )
    )
    files["triggers/BrokenInvoiceTrigger.trigger"] = (
        "trigger BrokenInvoiceTrigger on Invoice__c (before insert) {\n    for (Invoice__c invoice : Trigger.new) {\n"
        "        // FAIL: Field does not exist: Discount__c on Invoice__c\n"
        "        invoice.Discount__c = 0;\n    }\n}\n"
    )
    files["triggers/BrokenInvoiceTrigger.trigger-meta.xml"] = _TRIGGER_META
    files.update(
        _apex_class(
            "InvoiceRegressionTest",
            _test_class(
                "InvoiceRegressionTest",
                ["testTotals", "failsOnRounding", "testDiscounts", "failsOnNullCustomer"],
                {
                    "failsOnRounding": "System.AssertException: Assertion Failed: Expected: 10.01, Actual: 10.00",
                    "failsOnNullCustomer": "System.NullPointerException: Attempt to de-reference a null object",
                },
            ),
        )
    )
    files["package.xml"] = _package_xml(
        {
            "ApexClass": [
                "BrokenInvoiceCalc",
                "BrokenTaxRule",
                "InvoiceRegressionTest",
                "InvoiceService",
                "InvoiceServiceTest",
            ],
            "ApexTrigger": ["BrokenInvoiceTrigger"],
            "CustomObject": ["Invoice__c"],
        }
    )
    return files


def _slow_files() -> dict[str, str]:
    files = _good_files()
    files.update(
        _apex_class(
            "SlowDataMigration",
            "public class SlowDataMigration implements Database.Batchable<SObject> {\n"
            "    public Database.QueryLocator start(Database.BatchableContext context) {\n"
            "        return Database.getQueryLocator('SELECT Id FROM Invoice__c');\n    }\n"
            "    public void execute(Database.BatchableContext context, List<SObject> scope) {}\n"
            "    public void finish(Database.BatchableContext context) {}\n}\n",
        )
    )
    files["package.xml"] = _package_xml(
        {
            "ApexClass": ["InvoiceService", "InvoiceServiceTest", "SlowDataMigration"],
            "CustomObject": ["Invoice__c"],
        }
    )
    return files


_FLOW = """<?xml version="1.0" encoding="UTF-8"?>
<Flow xmlns="http://soap.sforce.com/2006/04/metadata">
    <apiVersion>61.0</apiVersion>
    <label>Invoice reminder</label>
    <processType>AutoLaunchedFlow</processType>
    <status>Active</status>
</Flow>
"""


def _coverage_files() -> dict[str, str]:
    """Compiles and passes every test, but brings a class and a flow that no test covers: in
    production it fails on code coverage alone."""
    files = _good_files()
    files.update(
        _apex_class(
            "UncoveredInvoiceExport",
            "public with sharing class UncoveredInvoiceExport {\n"
            "    public static String toCsv(List<Invoice__c> invoices) {\n"
            "        String csv = 'Id,Amount';\n        for (Invoice__c invoice : invoices) {\n"
            "            csv += '\\n' + invoice.Id + ',' + invoice.Amount__c;\n        }\n"
            "        return csv;\n    }\n}\n",
        )
    )
    files["flows/Uncovered_Invoice_Reminder.flow"] = _FLOW
    files["package.xml"] = _package_xml(
        {
            "ApexClass": ["InvoiceService", "InvoiceServiceTest", "UncoveredInvoiceExport"],
            "CustomObject": ["Invoice__c"],
            "Flow": ["Uncovered_Invoice_Reminder"],
        }
    )
    return files


def _destructive_files() -> dict[str, str]:
    return {
        "package.xml": _package_xml({}),
        "destructiveChangesPost.xml": _package_xml({"ApexClass": ["LegacyInvoiceHelper"]}),
    }


def _write_folder(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _write_zip(path: Path, files: dict[str, str]) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, text in sorted(files.items()):
            archive.writestr(name, text)


def write_sample_artifacts(directory: Path) -> dict[str, str]:
    """The artifacts the sandbox offers, by purpose → name under ``[artifacts] dir``."""
    directory.mkdir(parents=True, exist_ok=True)
    _write_folder(directory / "good-release", _good_files())
    _write_zip(directory / "good-release.zip", _good_files())
    _write_zip(directory / "failing-release.zip", _failing_files())
    _write_zip(directory / "slow-release.zip", _slow_files())
    _write_zip(directory / "coverage-release.zip", _coverage_files())
    _write_folder(directory / "cleanup-release", _destructive_files())
    return {
        "good": "good-release.zip",
        "good_folder": "good-release",
        "failing": "failing-release.zip",
        "slow": "slow-release.zip",
        "coverage": "coverage-release.zip",
        "destructive": "cleanup-release",
    }


class ArtifactServer:
    """Serves the ``.zip`` files of a directory at ``GET /releases/<name>`` (an artifact store,
    so ``/deploy`` can be given an URL under an allowed prefix)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.url = ""
        self.downloads: list[str] = []
        self._runner: web.AppRunner | None = None

    @property
    def prefix(self) -> str:
        return f"{self.url}/releases/"

    async def start(self) -> str:
        app = web.Application()
        app.add_routes([web.get("/releases/{name}", self._get)])
        self._runner, self.url = await serve(app)
        return self.url

    async def stop(self) -> None:
        await close(self._runner)
        self._runner = None

    async def _get(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = self.directory / name
        if "/" in name or name.startswith(".") or not name.endswith(".zip") or not path.is_file():
            raise web.HTTPNotFound()
        self.downloads.append(name)
        return web.Response(body=path.read_bytes(), content_type="application/zip")
