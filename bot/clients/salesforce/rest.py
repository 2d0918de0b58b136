"""Salesforce REST, sObject Collections and Bulk API 2.0 ingest over one aiohttp session.

Every public method goes through ``SalesforceClient._send``, which hands the request to the shared
``Transport`` with this org's session hook; ``_RestAnswers`` says what Salesforce's answers mean.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp

from bot.clients.retry import RetryPolicy, parse_retry_after
from bot.clients.salesforce.auth import AccessToken, OrgSession, TokenCache
from bot.clients.transport import OK, Ambiguous, Fail, Refresh, Request, Response, Retry, Transport, Verdict
from bot.errors import AmbiguousWriteError, ApiError, AuthError, TransientError

log = logging.getLogger(__name__)

SYSTEM = "salesforce"
ID_RE = re.compile(r"^[a-zA-Z0-9]{15}(?:[a-zA-Z0-9]{3})?$")
SOBJECT_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,79}$")
COLLECTION_LIMIT = 200  # sObject Collections accept at most 200 records per call
_SOQL_ESCAPES = {"\\": "\\\\", "'": "\\'", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def soql_literal(value: str) -> str:
    """A quoted SOQL literal with every reserved character escaped (SOQL "Quoted String Escape Sequences")."""
    return "'" + "".join(_SOQL_ESCAPES.get(ch, ch) for ch in value) + "'"


def soql_id_list(ids: Sequence[str]) -> str:
    """``('a','b')`` for record ids, each checked to look like a Salesforce id first."""
    for record_id in ids:
        checked_id(record_id)
    return "(" + ",".join(soql_literal(record_id) for record_id in ids) + ")"


_SOQL_LOCATION_RE = re.compile(r"^ERROR at Row:\d+:Column:\d+$")


def readable_message(text: str) -> str:
    """A Salesforce message as one line a person reads.

    Query errors (MALFORMED_QUERY, INVALID_TYPE, INVALID_FIELD) echo the query, a caret line
    under the bad token and ``ERROR at Row:1:Column:16`` before the sentence that matters; only
    that sentence is kept. Blank lines and runs of whitespace, which push errors often carry,
    collapse to single spaces.
    """
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if _SOQL_LOCATION_RE.match(line.strip()):
            lines = lines[index + 1 :]
            break
    else:
        carets = [index for index, line in enumerate(lines) if line.strip() == "^"]
        if carets:
            lines = lines[carets[-1] + 1 :]
    return " ".join(" ".join(lines).split())


def checked_id(record_id: str) -> str:
    if not ID_RE.match(record_id):
        raise ValueError(f"not a Salesforce id: {record_id[:40]!r}")
    return record_id


@dataclass(frozen=True)
class SaveResult:
    success: bool
    id: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def error_text(self) -> str:
        return "; ".join(
            f"{e.get('statusCode', '')}: {readable_message(str(e.get('message') or ''))}".strip(": ")
            for e in self.errors
        )


class SalesforceClient:
    """One org. ``session`` is shared with other clients and owned by the caller."""

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        tokens: TokenCache,
        api_version: str = "61.0",
        timeout: aiohttp.ClientTimeout | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._session = session
        self._tokens = tokens
        self.api_version = api_version
        self._timeout = timeout or aiohttp.ClientTimeout(total=60, connect=10)
        self.session_hook = OrgSession(tokens, session=session, timeout=self._timeout)
        self._transport = Transport(session=session, classifier=_RestAnswers(), timeout=self._timeout, retry=retry)

    @property
    def data_path(self) -> str:
        return f"/services/data/v{self.api_version}"

    async def instance_url(self) -> str:
        return (await self.session_hook.current()).instance_url

    async def record_url(self, record_id: str) -> str:
        """The record's page in the org. Salesforce opens any record from ``/<id>`` on the instance
        (Classic) and redirects there from Lightning; the docs give no other address for a push
        request's page (Setup › Push Upgrade History opens the same record)."""
        return f"{await self.instance_url()}/{checked_id(record_id)}"

    async def access_token(self) -> AccessToken:
        """For the Metadata API client, which shares this org's session and refresh."""
        return await self.session_hook.current()

    async def refresh_token(self, stale: AccessToken) -> AccessToken:
        return await self.session_hook.refresh(stale)

    # -- the one request path ------------------------------------------------------------
    async def _send(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: bytes | None = None,
        content_type: str | None = None,
        params: Mapping[str, str] | None = None,
        idempotent: bool,
    ) -> Response:
        headers = {"Accept": "application/json"}
        body: bytes | None = data
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        elif content_type:
            headers["Content-Type"] = content_type

        def build(token: AccessToken) -> Request:
            return Request(
                method,
                token.instance_url + path,
                idempotent=idempotent,
                headers={**headers, "Authorization": f"Bearer {token.value}"},
                body=body,
                params=params,
            )

        return await self._transport.send_with_session(build, self.session_hook)

    # -- REST ------------------------------------------------------------------------------
    async def query_pages(self, soql: str) -> AsyncIterator[list[dict[str, Any]]]:
        """Yields each page of records, following ``nextRecordsUrl``."""
        response = await self._send("GET", f"{self.data_path}/query", params={"q": soql}, idempotent=True)
        while True:
            payload = response.json()
            yield list(payload.get("records", []))
            next_url = payload.get("nextRecordsUrl")
            if payload.get("done", True) or not next_url:
                return
            # The next page is a path under this API version; anything else (another host via
            # "@…" or "//…", another API) would carry the bearer token away, so it is refused.
            if not re.fullmatch(rf"{re.escape(self.data_path)}/query/[0-9A-Za-z-]+", str(next_url)):
                raise ApiError(
                    f"Salesforce answered with an unexpected next page: {str(next_url)[:80]}", system="salesforce"
                )
            response = await self._send("GET", next_url, idempotent=True)

    async def query(self, soql: str) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        async for page in self.query_pages(soql):
            records.extend(page)
        return records

    async def count(self, sobject: str, where: str) -> int:
        """``SELECT COUNT() FROM sobject WHERE …``: Salesforce answers with ``totalSize`` and no records."""
        response = await self._send(
            "GET",
            f"{self.data_path}/query",
            params={"q": f"SELECT COUNT() FROM {_sobject(sobject)} WHERE {where}"},
            idempotent=True,
        )
        return int(response.json().get("totalSize") or 0)

    async def get_record(self, sobject: str, record_id: str) -> dict[str, Any]:
        path = f"{self.data_path}/sobjects/{_sobject(sobject)}/{checked_id(record_id)}"
        return dict((await self._send("GET", path, idempotent=True)).json())

    async def create(self, sobject: str, fields: Mapping[str, Any]) -> str:
        path = f"{self.data_path}/sobjects/{_sobject(sobject)}/"
        payload = (await self._send("POST", path, json_body=dict(fields), idempotent=False)).json()
        return str(payload["id"])

    async def update(self, sobject: str, record_id: str, fields: Mapping[str, Any]) -> None:
        path = f"{self.data_path}/sobjects/{_sobject(sobject)}/{checked_id(record_id)}"
        await self._send("PATCH", path, json_body=dict(fields), idempotent=True)

    async def create_many(
        self, sobject: str, records: Sequence[Mapping[str, Any]], *, all_or_none: bool = False
    ) -> list[SaveResult]:
        """sObject Collections create, 200 records per call; results in input order."""
        results: list[SaveResult] = []
        for start in range(0, len(records), COLLECTION_LIMIT):
            chunk = [
                {"attributes": {"type": _sobject(sobject)}, **record}
                for record in records[start : start + COLLECTION_LIMIT]
            ]
            body = {"allOrNone": all_or_none, "records": chunk}
            payload = (
                await self._send("POST", f"{self.data_path}/composite/sobjects", json_body=body, idempotent=False)
            ).json()
            results.extend(
                SaveResult(success=bool(item.get("success")), id=item.get("id"), errors=list(item.get("errors") or []))
                for item in payload
            )
        return results

    # -- Bulk API 2.0 ingest -------------------------------------------------------------
    async def bulk_create_insert_job(self, sobject: str) -> str:
        body = {"object": _sobject(sobject), "operation": "insert", "contentType": "CSV", "lineEnding": "LF"}
        payload = (await self._send("POST", f"{self.data_path}/jobs/ingest", json_body=body, idempotent=False)).json()
        return str(payload["id"])

    async def bulk_upload(self, job_id: str, rows: Sequence[Mapping[str, str]], columns: Sequence[str]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(column, "") for column in columns])
        await self._send(
            "PUT",
            f"{self.data_path}/jobs/ingest/{checked_id(job_id)}/batches",
            data=buffer.getvalue().encode(),
            content_type="text/csv",
            idempotent=False,
        )

    async def bulk_set_state(self, job_id: str, state: str) -> dict[str, Any]:
        """``UploadComplete`` starts processing; ``Aborted`` discards the job."""
        path = f"{self.data_path}/jobs/ingest/{checked_id(job_id)}"
        return dict((await self._send("PATCH", path, json_body={"state": state}, idempotent=True)).json())

    async def bulk_job(self, job_id: str) -> dict[str, Any]:
        path = f"{self.data_path}/jobs/ingest/{checked_id(job_id)}"
        return dict((await self._send("GET", path, idempotent=True)).json())

    async def bulk_results(self, job_id: str, which: str) -> list[dict[str, str]]:
        """``successfulResults`` (sf__Id, sf__Created, …) or ``failedResults`` (sf__Error, …)."""
        if which not in {"successfulResults", "failedResults", "unprocessedrecords"}:
            raise ValueError(which)
        path = f"{self.data_path}/jobs/ingest/{checked_id(job_id)}/{which}/"
        text = (await self._send("GET", path, idempotent=True)).body.decode("utf-8")
        return list(csv.DictReader(io.StringIO(text)))


def _sobject(name: str) -> str:
    if not SOBJECT_RE.match(name):
        raise ValueError(f"not an sObject name: {name[:40]!r}")
    return quote(name)


class _RestAnswers:
    """REST, sObject Collections and Bulk API 2.0 answers: errors are ``[{"errorCode", "message"}]``."""

    system = SYSTEM
    name = "Salesforce"

    def answer(self, request: Request, response: Response) -> Verdict:
        status = response.status
        code = _error_code(response)
        if status == 401 and code == "INVALID_SESSION_ID":
            return Refresh(AuthError("Salesforce rejected a freshly issued session", system=SYSTEM, status=401))
        if status in (429, 503) or code in {"REQUEST_LIMIT_EXCEEDED", "SERVER_UNAVAILABLE"}:
            return Retry(
                TransientError(f"Salesforce is busy (HTTP {status} {code})".strip(), system=SYSTEM, status=status),
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
        if status >= 500:
            message = f"Salesforce answered HTTP {status} {code}".strip()
            if request.idempotent:
                return Retry(TransientError(message, system=SYSTEM, status=status))
            return Ambiguous(AmbiguousWriteError(message, system=SYSTEM, status=status))
        if status >= 400:
            return Fail(_api_error(response, code))
        return OK

    def lost(self, request: Request, error: Exception, *, sent: bool) -> Retry | Ambiguous:
        if not sent:
            return Retry(TransientError(f"cannot connect to Salesforce ({type(error).__name__})", system=SYSTEM))
        message = f"Salesforce connection failed mid-request ({type(error).__name__})"
        if request.idempotent:
            return Retry(TransientError(message, system=SYSTEM))
        return Ambiguous(AmbiguousWriteError(message, system=SYSTEM))


def _error_code(response: Response) -> str:
    if response.status < 400:
        return ""
    try:
        payload = response.json()
    except (ValueError, UnicodeDecodeError):
        return ""
    first = payload[0] if isinstance(payload, list) and payload else payload
    if isinstance(first, dict):
        return str(first.get("errorCode") or first.get("error") or "")
    return ""


def _api_error(response: Response, code: str) -> ApiError:
    message = ""
    try:
        payload = response.json()
        first = payload[0] if isinstance(payload, list) and payload else payload
        if isinstance(first, dict):
            message = str(first.get("message") or first.get("error_description") or "")
    except (ValueError, UnicodeDecodeError):
        pass
    # Salesforce error messages are one sentence once the query echo is gone; cap them anyway so
    # nothing large reaches Slack.
    return ApiError(
        readable_message(message)[:300] or f"HTTP {response.status}",
        system=SYSTEM,
        status=response.status,
        code=code or f"HTTP_{response.status}",
    )
