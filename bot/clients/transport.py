"""The one send path of every HTTP client: retries, a session refresh and the meaning of an answer.

Salesforce REST, the Metadata API, sfp and FlexDeploy differ only in how they say "busy", "your
session expired" or "no": each client gives ``Transport`` a ``Classifier`` that turns an answer
(or a lost connection) into a ``Verdict``, and the loop below acts on it the same way for all:

    Ok          return the answer
    Retry       refused before any work was done, or a read that failed: send again after the
                ``RetryPolicy`` delay (or the server's ``Retry-After``); out of attempts, raise
                the ``TransientError``
    Refresh     the session expired: call the shared ``SessionHook`` and send once more (a refresh
                does not use up a retry); a second expiry within the same send raises the
                ``AuthError`` (a freshly issued session was refused)
    Ambiguous   a write that may have been applied: raise ``AmbiguousWriteError``, never resend
    Fail        a definite answer: raise its error (``ApiError``, ``AuthError``, …)

A connection that was never made is safe to repeat, even for a write; one that failed after the
request was sent is retried only for an idempotent request and is an ``AmbiguousWriteError``
otherwise, whatever the classifier says. Errors carry short, safe messages: never a whole response body.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from bot.clients.retry import RetryPolicy
from bot.errors import AmbiguousWriteError, AuthError, TransientError, UpstreamError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=60, connect=10)
_CHUNK = 64 * 1024

Credential = TypeVar("Credential")


@dataclass(frozen=True)
class Request:
    """One HTTP request as plain data; ``idempotent`` says whether sending it twice is harmless."""

    method: str
    url: str | URL
    idempotent: bool
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    params: Mapping[str, str] | None = None

    @property
    def path(self) -> str:
        """For logs: the path only (a query string may hold SOQL or ids)."""
        return URL(self.url, encoded=True).path if isinstance(self.url, str) else self.url.path


@dataclass(frozen=True)
class Response:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def json_request(
    method: str, url: str | URL, body: Any, *, idempotent: bool, headers: Mapping[str, str] | None = None
) -> Request:
    """A request whose body is ``body`` as JSON (``None``: no body)."""
    all_headers = dict(headers or {})
    data: bytes | None = None
    if body is not None:
        data = json.dumps(body).encode()
        all_headers["Content-Type"] = "application/json"
    return Request(method, url, idempotent=idempotent, headers=all_headers, body=data)


# -- verdicts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ok:
    pass


@dataclass(frozen=True)
class Retry:
    error: TransientError
    retry_after: float | None = None


@dataclass(frozen=True)
class Refresh:
    error: AuthError  # raised if the session is refused again right after a refresh


@dataclass(frozen=True)
class Ambiguous:
    error: AmbiguousWriteError


@dataclass(frozen=True)
class Fail:
    error: UpstreamError


Verdict = Ok | Retry | Refresh | Ambiguous | Fail
OK = Ok()


class Classifier(Protocol):
    """What one system's answers mean."""

    system: str  # UpstreamError.system
    name: str  # as users read it: "Salesforce", "the sfp server"

    def answer(self, request: Request, response: Response) -> Verdict: ...

    def lost(self, request: Request, error: Exception, *, sent: bool) -> Retry | Ambiguous | Fail:
        """The connection failed: before the request left (``sent`` False) or after."""
        ...


class SessionHook(Protocol[Credential]):
    """The current session of a system that issues them, and the one way to replace an expired one."""

    async def current(self) -> Credential: ...

    async def refresh(self, stale: Credential) -> Credential:
        """Replace ``stale`` unless a concurrent caller already did."""
        ...


class Transport:
    """Sends requests over an injected ``aiohttp.ClientSession``, which the caller owns."""

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        classifier: Classifier,
        timeout: aiohttp.ClientTimeout | None = None,
        retry: RetryPolicy | None = None,
        max_body: int | None = None,
    ) -> None:
        self._session = session
        self._classifier = classifier
        self._timeout = timeout or DEFAULT_TIMEOUT
        self._retry = retry or RetryPolicy()
        self._max_body = max_body

    @property
    def timeout(self) -> aiohttp.ClientTimeout:
        return self._timeout

    async def send(self, request: Request) -> Response:
        """A request that needs no session (static credentials, or none)."""
        return await self._send_with_retries(lambda _: request, None)

    async def send_with_session(
        self, build: Callable[[Credential], Request], hook: SessionHook[Credential]
    ) -> Response:
        """``build`` makes the request from the current session; it is called again after a refresh."""
        return await self._send_with_retries(build, hook)

    async def _send_with_retries(self, build: Callable[[Any], Request], hook: SessionHook[Any] | None) -> Response:
        refreshed = False
        attempt = 0
        while True:
            attempt += 1
            credential = await hook.current() if hook is not None else None
            request = build(credential)
            outcome = await self._send_once(request)
            match outcome:
                case Response():
                    return outcome
                case Refresh(error=error):
                    if hook is None or refreshed:
                        raise error
                    log.info("session expired; refreshing", extra={"system": self._classifier.system})
                    await hook.refresh(credential)
                    refreshed = True
                    attempt -= 1  # a refresh is not a failed attempt
                case Ambiguous(error=error) | Fail(error=error):
                    raise error
                case Retry(error=error, retry_after=retry_after):
                    if attempt >= self._retry.attempts:
                        raise error
                    delay = self._retry.delay(attempt, retry_after=retry_after)
                    log.info(
                        "upstream call failed; retrying",
                        extra={
                            "system": self._classifier.system,
                            "method": request.method,
                            "path": request.path,
                            "attempt": attempt,
                            "delay": round(delay, 2),
                            "why": error.message,
                        },
                    )
                    await asyncio.sleep(delay)

    async def _send_once(self, request: Request) -> Response | Retry | Refresh | Ambiguous | Fail:
        classifier = self._classifier
        verdict: Verdict
        try:
            async with self._session.request(
                request.method,
                request.url,
                data=request.body,
                params=request.params,
                headers=dict(request.headers),
                timeout=self._timeout,
            ) as raw:
                response = Response(raw.status, CIMultiDictProxy(CIMultiDict(raw.headers)), await self._read(raw))
        except aiohttp.ClientConnectorError as exc:
            # Never connected: nothing was sent, so even a write is safe to repeat.
            verdict = classifier.lost(request, exc, sent=False)
        except (aiohttp.ClientError, TimeoutError) as exc:
            verdict = classifier.lost(request, exc, sent=True)
            if not request.idempotent and isinstance(verdict, Retry):
                # The request may have arrived: a write is never sent twice, whatever the classifier says.
                verdict = Ambiguous(
                    AmbiguousWriteError(verdict.error.message, system=classifier.system, status=verdict.error.status)
                )
        else:
            verdict = classifier.answer(request, response)
            if isinstance(verdict, Ok):
                return response
        return verdict

    async def _read(self, raw: aiohttp.ClientResponse) -> bytes:
        if self._max_body is None:
            return await raw.read()
        chunks: list[bytes] = []
        size = 0
        async for chunk in raw.content.iter_chunked(_CHUNK):
            size += len(chunk)
            if size > self._max_body:
                raise TransientError(
                    f"{self._classifier.name} sent an unexpectedly large response", system=self._classifier.system
                )
            chunks.append(chunk)
        return b"".join(chunks)
