"""The one send path of every client, against a scripted aiohttp server on 127.0.0.1.

The classifier here is deliberately naive about writes (it asks to retry any lost connection):
the transport itself must still never send a write twice once it may have arrived.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bot.clients.retry import RetryPolicy, parse_retry_after
from bot.clients.transport import (
    OK,
    Ambiguous,
    Fail,
    Refresh,
    Request,
    Response,
    Retry,
    Transport,
    Verdict,
    json_request,
)
from bot.errors import AmbiguousWriteError, ApiError, AuthError, TransientError

FAST = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.5)
DROP = "drop"  # close the connection without answering
STALL = "stall"  # answer only when the test ends


@dataclass
class Seen:
    method: str
    authorization: str
    at: float


@dataclass
class ScriptedServer:
    """Answers each request with the next scripted (status, headers, body), then 200 forever."""

    url: str = ""
    script: list[tuple[int, dict[str, str], bytes] | str] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        loop = asyncio.get_running_loop()
        self.seen.append(Seen(request.method, request.headers.get("Authorization", ""), loop.time()))
        step = self.script.pop(0) if self.script else (200, {}, b'{"ok": true}')
        if step == DROP:
            if request.transport is not None:
                request.transport.close()
            raise asyncio.CancelledError  # aiohttp then drops the request without answering
        if step == STALL:
            await self.release.wait()
            return web.Response(status=200)
        status, headers, body = step
        return web.Response(status=status, headers=headers, body=body)


class Answers:
    """A small system: JSON ``{"error": …}`` bodies, 401 ``expired`` means refresh."""

    system = "test"
    name = "the test server"

    def answer(self, request: Request, response: Response) -> Verdict:
        status = response.status
        if status < 300:
            return OK
        if status == 401:
            return Refresh(AuthError("the test server refused a fresh session", system=self.system, status=401))
        if status in (429, 503):
            return Retry(
                TransientError(f"busy (HTTP {status})", system=self.system, status=status),
                parse_retry_after(response.headers.get("Retry-After")),
            )
        if status >= 500:
            if request.idempotent:
                return Retry(TransientError(f"HTTP {status}", system=self.system, status=status))
            return Ambiguous(AmbiguousWriteError(f"HTTP {status}", system=self.system, status=status))
        code = str((response.json() or {}).get("error", ""))[:40]
        return Fail(ApiError(f"refused: {code}", system=self.system, status=status, code=code))

    def lost(self, request: Request, error: Exception, *, sent: bool) -> Retry:
        return Retry(TransientError(f"connection lost ({type(error).__name__}, sent={sent})", system=self.system))


class Tokens:
    """A session hook: ``t1`` until refreshed, then ``t2``, …"""

    def __init__(self) -> None:
        self.number = 1
        self.refreshes = 0

    async def current(self) -> str:
        return f"t{self.number}"

    async def refresh(self, stale: str) -> str:
        self.refreshes += 1
        if stale == f"t{self.number}":
            self.number += 1
        return f"t{self.number}"


@pytest.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    scripted = ScriptedServer()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", scripted.handle)
    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server()
    scripted.url = str(test_server.make_url("/things"))
    yield scripted
    scripted.release.set()
    await test_server.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


def transport(session: aiohttp.ClientSession, **kwargs: object) -> Transport:
    return Transport(session=session, classifier=Answers(), retry=FAST, **kwargs)  # type: ignore[arg-type]


def get(url: str) -> Request:
    return Request("GET", url, idempotent=True)


def post(url: str) -> Request:
    return json_request("POST", url, {"name": "x"}, idempotent=False)


async def test_retry_after_is_honoured(server: ScriptedServer, session: aiohttp.ClientSession) -> None:
    server.script = [(503, {"Retry-After": "0.4"}, b"")]
    response = await transport(session).send(get(server.url))
    assert response.status == 200 and len(server.seen) == 2
    # The policy's own backoff is at most 1 ms here; only Retry-After explains the wait.
    assert server.seen[1].at - server.seen[0].at >= 0.35


async def test_a_write_refused_as_busy_is_sent_again(server: ScriptedServer, session: aiohttp.ClientSession) -> None:
    server.script = [(429, {}, b"")]
    response = await transport(session).send(post(server.url))
    assert response.status == 200 and [s.method for s in server.seen] == ["POST", "POST"]


async def test_expired_session_is_refreshed_once_and_the_request_resent_with_the_new_one(
    server: ScriptedServer, session: aiohttp.ClientSession
) -> None:
    server.script = [(401, {}, b'{"error": "expired"}')]
    tokens = Tokens()
    response = await transport(session).send_with_session(
        lambda token: Request("POST", server.url, idempotent=False, headers={"Authorization": f"Bearer {token}"}),
        tokens,
    )
    assert response.status == 200
    assert [s.authorization for s in server.seen] == ["Bearer t1", "Bearer t2"]
    assert tokens.refreshes == 1


async def test_session_refused_again_after_a_refresh_is_an_auth_error(
    server: ScriptedServer, session: aiohttp.ClientSession
) -> None:
    server.script = [(401, {}, b'{"error": "expired"}')] * 3
    tokens = Tokens()
    with pytest.raises(AuthError, match="refused a fresh session"):
        await transport(session).send_with_session(
            lambda token: Request("GET", server.url, idempotent=True, headers={"Authorization": f"Bearer {token}"}),
            tokens,
        )
    assert [s.authorization for s in server.seen] == ["Bearer t1", "Bearer t2"]
    assert tokens.refreshes == 1


async def test_refresh_without_a_session_hook_fails_at_once(
    server: ScriptedServer, session: aiohttp.ClientSession
) -> None:
    server.script = [(401, {}, b"{}")]
    with pytest.raises(AuthError):
        await transport(session).send(get(server.url))
    assert len(server.seen) == 1


async def test_ambiguous_write_is_never_resent(server: ScriptedServer, session: aiohttp.ClientSession) -> None:
    server.script = [(500, {}, b"")]
    with pytest.raises(AmbiguousWriteError):
        await transport(session).send(post(server.url))
    assert len(server.seen) == 1
    server.seen.clear()
    server.script = [(500, {}, b"")]
    response = await transport(session).send(get(server.url))  # the same answer to a read: retried
    assert response.status == 200 and len(server.seen) == 2


async def test_write_whose_connection_dropped_is_never_resent_even_if_the_classifier_says_retry(
    server: ScriptedServer, session: aiohttp.ClientSession
) -> None:
    server.script = [DROP]
    with pytest.raises(AmbiguousWriteError, match="connection lost"):
        await transport(session).send(post(server.url))
    assert len(server.seen) == 1


async def test_write_that_timed_out_is_never_resent_and_a_read_is(
    server: ScriptedServer, session: aiohttp.ClientSession
) -> None:
    short = aiohttp.ClientTimeout(total=0.3)
    server.script = [STALL]
    with pytest.raises(AmbiguousWriteError, match="TimeoutError"):
        await transport(session, timeout=short).send(post(server.url))
    assert len(server.seen) == 1
    server.seen.clear()
    server.script = [STALL]
    response = await transport(session, timeout=short).send(get(server.url))
    assert response.status == 200 and len(server.seen) == 2


async def test_retry_budget_exhausted_is_a_transient_error(
    server: ScriptedServer, session: aiohttp.ClientSession
) -> None:
    server.script = [(503, {}, b"")] * 5
    with pytest.raises(TransientError, match="busy") as raised:
        await transport(session).send(post(server.url))
    assert not isinstance(raised.value, AmbiguousWriteError)
    assert len(server.seen) == FAST.attempts


async def test_a_write_that_never_connected_is_retried_and_is_not_ambiguous(session: aiohttp.ClientSession) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(TransientError, match="sent=False") as raised:
        await transport(session).send(post(f"http://127.0.0.1:{port}/things"))
    assert not isinstance(raised.value, AmbiguousWriteError)


async def test_definite_refusal_fails_at_once_with_the_classified_error(
    server: ScriptedServer, session: aiohttp.ClientSession
) -> None:
    server.script = [(400, {}, json.dumps({"error": "BAD_NAME", "detail": "x" * 5000}).encode())]
    with pytest.raises(ApiError) as raised:
        await transport(session).send(get(server.url))
    assert raised.value.code == "BAD_NAME" and len(raised.value.message) < 100
    assert len(server.seen) == 1


async def test_an_oversized_answer_is_refused(server: ScriptedServer, session: aiohttp.ClientSession) -> None:
    server.script = [(200, {}, b"x" * 300_000)]
    with pytest.raises(TransientError, match="the test server sent an unexpectedly large response"):
        await transport(session, max_body=100_000).send(get(server.url))
    assert len(server.seen) == 1


async def test_a_refresh_does_not_use_up_a_retry(server: ScriptedServer, session: aiohttp.ClientSession) -> None:
    server.script = [(401, {}, b"{}"), (503, {}, b"")]
    two_tries = Transport(session=session, classifier=Answers(), retry=RetryPolicy(attempts=2, base_delay=0.001))
    response = await two_tries.send_with_session(
        lambda token: Request("GET", server.url, idempotent=True, headers={"Authorization": f"Bearer {token}"}),
        Tokens(),
    )
    assert response.status == 200
    assert [s.authorization for s in server.seen] == ["Bearer t1", "Bearer t2", "Bearer t2"]
