"""FlexDeploy's project package REST API (v1) over one injected aiohttp session.

    GET    /flexdeploy/rest/v1/project/{projectId}/package/{packageName}
    POST   /flexdeploy/rest/v1/project/{projectId}/package
    PUT    /flexdeploy/rest/v1/project/{projectId}/package/{packageName}   replace (files too)
    PATCH  /flexdeploy/rest/v1/project/{projectId}/package/{packageName}   null = untouched, files appended
    DELETE /flexdeploy/rest/v1/project/{projectId}/package/{packageName}   a missing package is not an error

Basic authentication on every request (FlexDeploy "Project Packages API" and "API Guide":
username and password, or an API token in place of the password). ``FlexDeployClient._send``
is the only place that authenticates; it sends through the shared ``Transport``, and
``_FlexDeployAnswers`` maps the status codes.

Where FlexDeploy's documentation is silent, this client chooses:
- error bodies: a JSON object whose ``message`` (or ``error``/``errorMessage``) is used, clipped;
  anything else (HTML error pages, plain text) is reduced to a clipped first line of text;
- DELETE answers 200 with any body (ignored);
- 500 is retried for idempotent calls (GET, PUT, DELETE) but not for POST/PATCH, where a
  repeat could apply the change twice: those raise ``AmbiguousWriteError`` for the caller to
  check with a GET.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from bot.clients.retry import RetryPolicy, parse_retry_after
from bot.clients.transport import OK, Ambiguous, Fail, Request, Response, Retry, Transport, Verdict, json_request
from bot.errors import AmbiguousWriteError, ApiError, AuthError, TransientError

log = logging.getLogger(__name__)

SYSTEM = "FlexDeploy"  # shown to users as is ("FlexDeploy did not accept that: …")
BASE_PATH = "/flexdeploy/rest/v1"
RETRY_STATUSES = {429, 502, 503, 504}
_IDEMPOTENT = {"GET", "PUT", "DELETE"}
_TAGS = re.compile(r"<[^>]*>")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class PackageFile:
    file_path: str
    object_type: str | None = None
    sequence_number: int | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"filePath": self.file_path}
        if self.object_type is not None:
            body["objectType"] = self.object_type
        if self.sequence_number is not None:
            body["sequenceNumber"] = self.sequence_number
        return body


@dataclass(frozen=True)
class Package:
    """A package as FlexDeploy returns it; ``files`` in sequence order."""

    name: str
    description: str | None = None
    files: tuple[PackageFile, ...] = ()
    package_type: str = "USER_MANAGED"
    package_status: str = "ACTIVE"
    include_path: str | None = None
    exclude_path: str | None = None
    tests: str | None = None
    test_level: str | None = None
    version_syntax: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # fields newer versions add

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Package:
        files = [
            PackageFile(
                file_path=str(item.get("filePath") or ""),
                object_type=_text_or_none(item.get("objectType")),
                sequence_number=_int_or_none(item.get("sequenceNumber")),
            )
            for item in data.get("files") or []
            if isinstance(item, Mapping)
        ]
        # Unnumbered files keep their order, after the numbered ones.
        ordered = sorted(
            enumerate(files),
            key=lambda pair: (pair[1].sequence_number is None, pair[1].sequence_number or 0, pair[0]),
        )
        known = {
            "name",
            "description",
            "files",
            "packageType",
            "packageStatus",
            "includePath",
            "excludePath",
            "tests",
            "testLevel",
            "versionSyntax",
        }
        return cls(
            name=str(data.get("name") or ""),
            description=_text_or_none(data.get("description")),
            files=tuple(file for _, file in ordered),
            package_type=str(data.get("packageType") or "USER_MANAGED"),
            package_status=str(data.get("packageStatus") or "ACTIVE"),
            include_path=_text_or_none(data.get("includePath")),
            exclude_path=_text_or_none(data.get("excludePath")),
            tests=_text_or_none(data.get("tests")),
            test_level=_text_or_none(data.get("testLevel")),
            version_syntax=_text_or_none(data.get("versionSyntax")),
            extra={key: value for key, value in data.items() if key not in known},
        )


class _FlexDeployAnswers:
    """FlexDeploy's status codes; 429/502/503/504 mean nothing was done, so even a write is resent."""

    system = SYSTEM
    name = "FlexDeploy"

    def answer(self, request: Request, response: Response) -> Verdict:
        if response.status < 400:
            return OK
        failure = FlexDeployClient._failure(request.method, response)
        if isinstance(failure, AmbiguousWriteError):
            return Ambiguous(failure)
        if isinstance(failure, TransientError):
            # Unexpected server errors on idempotent calls are retried too, without Retry-After.
            retry_after = None
            if response.status in RETRY_STATUSES:
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
            return Retry(failure, retry_after)
        return Fail(failure)

    def lost(self, request: Request, error: Exception, *, sent: bool) -> Retry | Ambiguous:
        name = type(error).__name__
        if not sent:
            return Retry(TransientError(f"cannot connect to FlexDeploy ({name})", system=SYSTEM))
        if not request.idempotent:
            return Ambiguous(
                AmbiguousWriteError(
                    f"the connection to FlexDeploy failed mid-request ({name}); "
                    "the change may or may not have been applied",
                    system=SYSTEM,
                )
            )
        return Retry(TransientError(f"the connection to FlexDeploy failed ({name})", system=SYSTEM))


def _text_or_none(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def package_path(project_id: int, name: str | None = None) -> str:
    """The URL path, every user-supplied part percent-encoded (``/`` too: it is one segment)."""
    path = f"{BASE_PATH}/project/{int(project_id)}/package"
    return path if name is None else f"{path}/{quote(name, safe='')}"


def server_message(body: bytes, content_type: str) -> str:
    """A short, single-line reason from an error body; never the body itself."""
    text = ""
    if "json" in content_type or body[:1] in (b"{", b"["):
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if isinstance(data, list) and data:
            data = data[0]
        if isinstance(data, Mapping):
            text = str(data.get("message") or data.get("error") or data.get("errorMessage") or "")
        elif isinstance(data, str):
            text = data
    elif "html" not in content_type:
        text = body[:2000].decode("utf-8", "replace").strip().splitlines()[0] if body.strip() else ""
    text = _CONTROL.sub(" ", _TAGS.sub("", text)).strip()
    return text[:200] + ("…" if len(text) > 200 else "")


class FlexDeployClient:
    """One FlexDeploy server. ``session`` is shared with other clients and owned by the caller."""

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        base_url: str,
        user: str,
        password: str,
        timeout: aiohttp.ClientTimeout | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")
        # The Authorization header is built once and kept private: it is never logged or shown.
        self._authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        self._timeout = timeout or aiohttp.ClientTimeout(total=60, connect=10)
        self._transport = Transport(
            session=session, classifier=_FlexDeployAnswers(), timeout=self._timeout, retry=retry
        )

    def __repr__(self) -> str:  # never show the credentials
        return f"FlexDeployClient({self._base_url!r})"

    # -- the one request path ------------------------------------------------------------------
    async def _send(self, method: str, path: str, *, json_body: Any = None) -> Response:
        # encoded=True: the path is already percent-encoded; yarl must not decode %2F back to "/".
        url = URL(self._base_url + path, encoded=True)
        headers = {"Accept": "application/json", "Authorization": self._authorization}
        request = json_request(method, url, json_body, idempotent=method in _IDEMPOTENT, headers=headers)
        return await self._transport.send(request)

    @staticmethod
    def _failure(method: str, response: Response) -> ApiError | AuthError | TransientError:
        """Every status FlexDeploy documents (400, 401, 403, 404, 500) gets its own message."""
        status = response.status
        reason = server_message(response.body, response.content_type)
        said = f": {reason}" if reason else ""
        if status == 400:
            return ApiError(
                f"it refused the request (HTTP 400 bad request){said}", system=SYSTEM, status=400, code="BAD_REQUEST"
            )
        if status == 401:
            return AuthError(
                "it rejected the bot's credentials (HTTP 401); an admin needs to check "
                "FLEXDEPLOY_USER and FLEXDEPLOY_PASSWORD (an API token can replace the password)",
                system=SYSTEM,
                status=401,
            )
        if status == 403:
            return ApiError(
                "the bot's FlexDeploy user is not allowed to do that (HTTP 403); creating and editing "
                "packages needs the Execute Project permission on the project",
                system=SYSTEM,
                status=403,
                code="FORBIDDEN",
            )
        if status == 404:
            return ApiError(f"no such project or package (HTTP 404){said}", system=SYSTEM, status=404, code="NOT_FOUND")
        if status in RETRY_STATUSES:
            return TransientError(f"FlexDeploy is busy or unavailable (HTTP {status})", system=SYSTEM, status=status)
        if status >= 500:
            if method not in _IDEMPOTENT:
                return AmbiguousWriteError(
                    f"it had an unexpected internal error (HTTP {status}){said}; "
                    "the change may or may not have been applied",
                    system=SYSTEM,
                    status=status,
                )
            return TransientError(
                f"it had an unexpected internal error (HTTP {status}){said}", system=SYSTEM, status=status
            )
        return ApiError(f"it answered HTTP {status}{said}", system=SYSTEM, status=status, code=f"HTTP_{status}")

    async def _package(self, method: str, path: str, *, json_body: Any = None) -> Package:
        response = await self._send(method, path, json_body=json_body)
        try:
            data = json.loads(response.body)
        except ValueError:
            raise TransientError(
                f"FlexDeploy answered {method} with something that is not JSON", system=SYSTEM
            ) from None
        if not isinstance(data, Mapping):
            raise TransientError(f"FlexDeploy answered {method} with an unexpected shape", system=SYSTEM)
        return Package.from_json(data)

    # -- the package API -------------------------------------------------------------------------
    async def get_package(self, project_id: int, name: str) -> Package:
        return await self._package("GET", package_path(project_id, name))

    async def create_package(self, project_id: int, body: Mapping[str, Any]) -> Package:
        """POST; ``body`` carries ``name`` and any other attribute."""
        return await self._package("POST", package_path(project_id), json_body=dict(body))

    async def replace_package(self, project_id: int, name: str, body: Mapping[str, Any]) -> Package:
        """PUT: a complete update; files not in ``body`` are removed from the package."""
        return await self._package("PUT", package_path(project_id, name), json_body=dict(body))

    async def patch_package(self, project_id: int, name: str, body: Mapping[str, Any]) -> Package:
        """PATCH: attributes left out stay as they are; new files are appended."""
        return await self._package("PATCH", package_path(project_id, name), json_body=dict(body))

    async def delete_package(self, project_id: int, name: str) -> None:
        """DELETE; FlexDeploy answers 200 whether or not the package existed."""
        await self._send("DELETE", package_path(project_id, name))
