"""Salesforce Metadata API (SOAP): ``deploy``, ``checkDeployStatus``, ``cancelDeploy``,
``deployRecentValidation``.

The client shares its org's access token and refresh with the REST client
(``SalesforceClient.session_hook``), so one expired session is refreshed once for both.
``MetadataClient._call`` sends every SOAP request through the shared ``Transport``;
``_SoapAnswers`` maps SOAP faults to what the transport does:

    sf:INVALID_SESSION_ID              refresh the token, resend once (a refused call did nothing)
    sf:REQUEST_LIMIT_EXCEEDED, sf:SERVER_UNAVAILABLE, HTTP 429/503, connect errors
                                       TransientError, retried with the shared RetryPolicy
    any other fault                    ApiError(code=<fault code>) with Salesforce's one-line text
    dropped connection / 5xx without a SOAP fault
                                       retried for reads; for ``deploy`` and
                                       ``deployRecentValidation`` AmbiguousWriteError, never resent:
                                       Salesforce may have started the deployment

Envelopes are built by hand with every text value XML-escaped; responses are parsed with
defusedxml (no DTDs, no entity expansion) and read with a size cap.

Wire format (Metadata API Developer Guide, "deploy()", "checkDeployStatus()", "DeployResult",
"cancelDeploy()", "CancelDeployResult", "deployRecentValidation()"): endpoint
``{instance}/services/Soap/m/{apiVersion}``, ``SessionHeader/sessionId`` in the SOAP header,
namespace ``http://soap.sforce.com/2006/04/metadata``; DeployOptions elements in the WSDL's
(alphabetical) sequence order. ``DeployResult.details.runTestResult`` (a ``RunTestsResult``) carries
``failures`` and the coverage warnings that fail a deployment with no other error:
``codeCoverageWarnings`` (``id``, ``message``, ``name``, ``namespace``; ``name`` is nil for the
org-wide average) and, from API 44.0, ``flowCoverageWarnings`` (``flowId``, ``flowName``,
``flowNamespace``, ``message``; ``flowName`` is nil for the org-wide flow coverage).
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any
from xml.etree.ElementTree import Element

import aiohttp
from defusedxml import ElementTree as SafeElementTree
from defusedxml.common import DefusedXmlException

from bot.clients.retry import RetryPolicy, parse_retry_after
from bot.clients.salesforce.auth import AccessToken
from bot.clients.salesforce.deploy_result import (
    CancelDeployResult as CancelDeployResult,
)
from bot.clients.salesforce.deploy_result import (
    DeployResult as DeployResult,
)
from bot.clients.salesforce.deploy_result import (
    deploy_status_url,
    local_name,
    parse_deploy_result,
    text_of,
)
from bot.clients.salesforce.rest import SalesforceClient, checked_id
from bot.clients.transport import OK, Ambiguous, Fail, Refresh, Request, Response, Retry, Transport, Verdict
from bot.errors import AmbiguousWriteError, ApiError, AuthError, TransientError

log = logging.getLogger(__name__)

SYSTEM = "salesforce"
SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"
MD_NS = "http://soap.sforce.com/2006/04/metadata"
TEST_LEVELS = ("NoTestRun", "RunSpecifiedTests", "RunLocalTests", "RunAllTestsInOrg")
TRANSIENT_FAULTS = frozenset({"REQUEST_LIMIT_EXCEEDED", "SERVER_UNAVAILABLE"})
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # a DeployResult with thousands of failures is a few MB
# XML 1.0 forbids most control characters even when escaped; nothing legitimate carries them.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def xml_text(value: str) -> str:
    """Escape a text value for an XML element (``& < >``; quotes too, harmless in text)."""
    if _XML_INVALID.search(value):
        raise ValueError("text contains characters XML cannot carry")
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _bool(value: bool) -> str:
    return "true" if value else "false"


@dataclass(frozen=True)
class DeployOptions:
    """``DeployOptions`` one to one; ``to_xml`` writes the elements in the WSDL's order."""

    allow_missing_files: bool = False
    auto_update_package: bool = False
    check_only: bool = False
    ignore_warnings: bool = False
    perform_retrieve: bool = False
    purge_on_delete: bool = False
    rollback_on_error: bool = True
    run_tests: tuple[str, ...] = ()
    single_package: bool = True
    test_level: str | None = None  # None: Salesforce's default for the org

    def to_xml(self) -> str:
        parts = [
            f"<met:allowMissingFiles>{_bool(self.allow_missing_files)}</met:allowMissingFiles>",
            f"<met:autoUpdatePackage>{_bool(self.auto_update_package)}</met:autoUpdatePackage>",
            f"<met:checkOnly>{_bool(self.check_only)}</met:checkOnly>",
            f"<met:ignoreWarnings>{_bool(self.ignore_warnings)}</met:ignoreWarnings>",
            f"<met:performRetrieve>{_bool(self.perform_retrieve)}</met:performRetrieve>",
            f"<met:purgeOnDelete>{_bool(self.purge_on_delete)}</met:purgeOnDelete>",
            f"<met:rollbackOnError>{_bool(self.rollback_on_error)}</met:rollbackOnError>",
            *(f"<met:runTests>{xml_text(name)}</met:runTests>" for name in self.run_tests),
            f"<met:singlePackage>{_bool(self.single_package)}</met:singlePackage>",
        ]
        if self.test_level is not None:
            if self.test_level not in TEST_LEVELS:
                raise ValueError(f"unknown test level {self.test_level!r}")
            parts.append(f"<met:testLevel>{self.test_level}</met:testLevel>")
        return "<met:DeployOptions>" + "".join(parts) + "</met:DeployOptions>"

    def as_dict(self) -> dict[str, Any]:
        return {
            f.name: list(getattr(self, f.name)) if f.name == "run_tests" else getattr(self, f.name)
            for f in fields(self)
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DeployOptions:
        known = {f.name for f in fields(cls)}
        kwargs = {key: value for key, value in values.items() if key in known}
        kwargs["run_tests"] = tuple(kwargs.get("run_tests") or ())
        return cls(**kwargs)


@dataclass(frozen=True)
class _Fault:
    code: str
    message: str


class MetadataClient:
    """The Metadata API of one org. ``session`` is shared and owned by the caller."""

    def __init__(
        self,
        *,
        rest: SalesforceClient,
        session: aiohttp.ClientSession,
        timeout: aiohttp.ClientTimeout | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._rest = rest
        self._session = session
        # A 39 MB zip is ~52 MB of base64 to upload: give the send more time than a REST call.
        self._timeout = timeout or aiohttp.ClientTimeout(total=300, connect=10)
        self._transport = Transport(
            session=session,
            classifier=_SoapAnswers(),
            timeout=self._timeout,
            retry=retry,
            max_body=MAX_RESPONSE_BYTES,
        )

    @property
    def api_version(self) -> str:
        return self._rest.api_version

    async def deploy_status_url(self, deploy_id: str) -> str:
        """Setup → Deployment Status for ``deploy_id`` in this org (the session's instance URL)."""
        return deploy_status_url(await self._rest.instance_url(), deploy_id)

    # -- the four calls --------------------------------------------------------------------
    async def deploy(self, zip_bytes: bytes, options: DeployOptions) -> str:
        """Start an asynchronous deployment; returns its id (``0Af…``). Never resent on doubt."""
        body = b"".join(
            [
                b"<met:deploy><met:ZipFile>",
                base64.b64encode(zip_bytes),  # base64's alphabet needs no XML escaping
                b"</met:ZipFile>",
                options.to_xml().encode(),
                b"</met:deploy>",
            ]
        )
        result = await self._call("deploy", body, idempotent=False)
        return _accepted_id(text_of(result, "id"), "deploy")

    async def check_deploy_status(self, deploy_id: str, *, include_details: bool = True) -> DeployResult:
        body = (
            f"<met:checkDeployStatus><met:asyncProcessId>{checked_id(deploy_id)}</met:asyncProcessId>"
            f"<met:includeDetails>{_bool(include_details)}</met:includeDetails></met:checkDeployStatus>"
        ).encode()
        return parse_deploy_result(await self._call("checkDeployStatus", body, idempotent=True))

    async def cancel_deploy(self, deploy_id: str) -> CancelDeployResult:
        body = f"<met:cancelDeploy><met:String>{checked_id(deploy_id)}</met:String></met:cancelDeploy>".encode()
        # Asking twice to cancel the same deployment is harmless, so it may be retried.
        result = await self._call("cancelDeploy", body, idempotent=True)
        return CancelDeployResult(id=text_of(result, "id") or deploy_id, done=text_of(result, "done") == "true")

    async def deploy_recent_validation(self, validation_id: str) -> str:
        """Quick-deploy a validation; returns the id of the new deployment."""
        body = (
            "<met:deployRecentValidation><met:validationId>"
            f"{checked_id(validation_id)}</met:validationId></met:deployRecentValidation>"
        ).encode()
        result = await self._call("deployRecentValidation", body, idempotent=False)
        # The response's <result> is the new deployment id itself (type string).
        return _accepted_id((result.text or "").strip(), "deployRecentValidation")

    # -- the one request path ------------------------------------------------------------
    async def _call(self, operation: str, body: bytes, *, idempotent: bool) -> Element:
        """Send one operation; returns the ``<result>`` element of ``<{operation}Response>``."""

        def build(token: AccessToken) -> Request:
            return Request(
                "POST",
                f"{token.instance_url}/services/Soap/m/{self.api_version}",
                idempotent=idempotent,
                headers={"Content-Type": "text/xml; charset=UTF-8", "SOAPAction": operation},
                body=_envelope(token.value, body),
            )

        response = await self._transport.send_with_session(build, self._rest.session_hook)
        try:
            return _result_of(response.body, operation)
        except TransientError:
            if idempotent:
                raise
            # HTTP 200: Salesforce took the request. An answer the bot cannot read (cut off, or
            # refused by the XML parser) must not get it sent again.
            raise AmbiguousWriteError(
                f"Salesforce accepted {operation} with an answer the bot cannot read",
                system=SYSTEM,
                status=response.status,
            ) from None


class _SoapAnswers:
    """Metadata API answers: a SOAP fault's ``faultcode`` (``sf:INVALID_SESSION_ID`` …) decides."""

    system = SYSTEM
    name = "Salesforce"

    def answer(self, request: Request, response: Response) -> Verdict:
        status, payload = response.status, response.body
        operation = request.headers.get("SOAPAction", "")
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        fault = _fault_of(payload) if status != 200 or b"Fault" in payload[:4096] else None
        if fault is not None:
            if fault.code == "INVALID_SESSION_ID":
                # A refused call did nothing, so even a deploy is sent again after the refresh.
                return Refresh(AuthError("Salesforce rejected a freshly issued session", system=SYSTEM, status=status))
            if fault.code not in TRANSIENT_FAULTS:
                return Fail(ApiError(fault.message[:300] or fault.code, system=SYSTEM, status=status, code=fault.code))
            return Retry(
                TransientError(f"Salesforce is busy ({fault.code})", system=SYSTEM, status=status), retry_after
            )
        if status in (429, 503):
            return Retry(
                TransientError(f"Salesforce is busy (HTTP {status})", system=SYSTEM, status=status), retry_after
            )
        if status >= 500:
            if not request.idempotent:
                return Ambiguous(
                    AmbiguousWriteError(
                        f"Salesforce answered HTTP {status} to {operation}", system=SYSTEM, status=status
                    )
                )
            return Retry(
                TransientError(f"Salesforce answered HTTP {status}", system=SYSTEM, status=status), retry_after
            )
        if status != 200:
            return Fail(ApiError(f"HTTP {status}", system=SYSTEM, status=status, code=f"HTTP_{status}"))
        return OK

    def lost(self, request: Request, error: Exception, *, sent: bool) -> Retry | Ambiguous:
        name = type(error).__name__
        if not sent:
            return Retry(TransientError(f"cannot connect to Salesforce ({name})", system=SYSTEM))
        if not request.idempotent:
            operation = request.headers.get("SOAPAction", "")
            return Ambiguous(
                AmbiguousWriteError(f"the connection to Salesforce dropped during {operation} ({name})", system=SYSTEM)
            )
        return Retry(TransientError(f"Salesforce connection failed mid-request ({name})", system=SYSTEM))


def _accepted_id(text: str, operation: str) -> str:
    """The id Salesforce gave a deployment it accepted; anything else leaves it unknown, not unsent."""
    try:
        return checked_id(text)
    except ValueError:
        raise AmbiguousWriteError(
            f"Salesforce accepted {operation} but its answer has no usable id", system=SYSTEM
        ) from None


def _envelope(session_id: str, body: bytes) -> bytes:
    head = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<soapenv:Envelope xmlns:soapenv="{SOAP_NS}" xmlns:met="{MD_NS}">'
        "<soapenv:Header><met:SessionHeader>"
        f"<met:sessionId>{xml_text(session_id)}</met:sessionId>"
        "</met:SessionHeader></soapenv:Header><soapenv:Body>"
    )
    return head.encode() + body + b"</soapenv:Body></soapenv:Envelope>"


def _parse(payload: bytes) -> Element | None:
    try:
        root: Element = SafeElementTree.fromstring(payload, forbid_dtd=True)
        return root
    except (SafeElementTree.ParseError, DefusedXmlException, ValueError):
        return None


def _fault_of(payload: bytes) -> _Fault | None:
    """``soapenv:Fault`` → (code without its ``sf:`` prefix, faultstring). None if not a fault."""
    root = _parse(payload)
    if root is None:
        return None
    for element in root.iter():
        if local_name(element.tag) != "Fault":
            continue
        code = message = ""
        for child in element.iter():
            name = local_name(child.tag)
            if name == "faultcode" and child.text:
                code = child.text.strip().rsplit(":", 1)[-1]
            elif name == "faultstring" and child.text:
                message = child.text.strip()
            elif name == "exceptionCode" and child.text and not code:
                code = child.text.strip()
        return _Fault(code=code or "UNKNOWN_FAULT", message=message)
    return None


def _result_of(payload: bytes, operation: str) -> Element:
    root = _parse(payload)
    if root is None:
        raise TransientError(f"Salesforce sent an unreadable {operation} response", system=SYSTEM)
    for element in root.iter():
        if local_name(element.tag) == f"{operation}Response":
            for child in element:
                if local_name(child.tag) == "result":
                    return child
    raise ApiError(f"no result in the {operation} response", system=SYSTEM, code="UNEXPECTED_RESPONSE")
