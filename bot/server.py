"""Serving the Bolt app: HTTP mode (aiohttp) or Socket Mode, with the poller alongside.

Anyone on the internet can POST to ``/slack/events``. Bolt's aiohttp adapter reads, decodes and
parses the whole body (form or JSON) before Bolt checks the signature, so a few large anonymous
bodies could hold the event loop for tenths of a second each, while genuine acks waited behind
them. Here the endpoint refuses oversized bodies before reading them and checks the signature on
the raw bytes before anything parses them; only a request Slack signed reaches Bolt.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.async_app import AsyncApp
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_sdk.signature import SignatureVerifier

from bot.runtime import Runtime

log = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"
# Slack's own payloads are a few KiB; a modal submission with many inputs stays far below this.
MAX_BODY_BYTES = 256 * 1024


async def read_capped(request: web.Request, *, limit: int) -> bytes | None:
    """The body, or None as soon as it proves longer than ``limit`` (a chunked body carries no
    Content-Length to refuse it by, so reading stops at the cap instead of at its end)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def signed_by_slack(verifier: SignatureVerifier, *, body: bytes, headers: Any) -> bool:
    """Slack's ``v0=`` HMAC-SHA256 over ``v0:{timestamp}:{raw body}``, within 5 minutes."""
    try:
        return verifier.is_valid(
            body=body,
            timestamp=headers.get("X-Slack-Request-Timestamp"),
            signature=headers.get("X-Slack-Signature"),
        )
    except (ValueError, TypeError):  # a timestamp that is not a number, a body that is not UTF-8
        return False


def _too_large() -> web.Response:
    response = web.Response(status=413, text="request body too large")
    # Close rather than let aiohttp read (for up to 10 s) the rest of a body we refused.
    response.force_close()
    return response


def http_app(
    bolt: AsyncApp, *, signing_secret: str, health: Callable[[], dict[str, Any]] | None = None
) -> web.Application:
    """``POST /slack/events`` for commands, interactivity and events; ``GET /healthz``."""
    verifier = SignatureVerifier(signing_secret)

    async def events(request: web.Request) -> web.Response:
        raw = await read_capped(request, limit=MAX_BODY_BYTES)
        if raw is None:
            return _too_large()
        if not signed_by_slack(verifier, body=raw, headers=request.headers):
            return web.Response(status=401, text="invalid request")
        text = raw.decode("utf-8")  # the signature check above decoded it already
        # Bolt verifies the signature again: at this size that costs microseconds, and it keeps the
        # app safe should it ever be served by another adapter than this endpoint.
        bolt_request = AsyncBoltRequest(body=text, query=request.query_string, headers=request.headers)  # type: ignore[arg-type]
        return await to_aiohttp_response(await bolt.async_dispatch(bolt_request))

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, **(health() if health else {})})

    application = web.Application(client_max_size=MAX_BODY_BYTES)
    application.router.add_post(EVENTS_PATH, events)
    application.router.add_get("/healthz", healthz)
    return application


async def start_http(runtime: Runtime, *, host: str = "0.0.0.0", port: int) -> web.AppRunner:
    def health() -> dict[str, Any]:
        return {"replica": runtime.poller.owner, "last_cycle": runtime.poller.last_cycle}

    assert runtime.settings.slack_signing_secret is not None
    signing_secret = runtime.settings.slack_signing_secret.get_secret_value()
    runner = web.AppRunner(http_app(runtime.app, signing_secret=signing_secret, health=health), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def serve_forever(runtime: Runtime, *, host: str = "0.0.0.0", stop: asyncio.Event | None = None) -> None:
    """Run until SIGINT/SIGTERM: HTTP mode when a signing secret is set, else Socket Mode."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    settings = runtime.settings
    runtime.poller.start()
    if settings.slack_signing_secret is not None:
        runner = await start_http(runtime, host=host, port=settings.port)
        log.info("serving Slack over HTTP on %s:%s%s", host, settings.port, EVENTS_PATH)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
    else:
        from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler

        assert settings.slack_app_token is not None
        handler = AsyncSocketModeHandler(runtime.app, settings.slack_app_token.get_secret_value())
        await handler.connect_async()  # type: ignore[no-untyped-call]  # slack_bolt leaves it unannotated
        log.info("connected to Slack in Socket Mode")
        try:
            await stop.wait()
        finally:
            await handler.close_async()  # type: ignore[no-untyped-call]
    await runtime.close()
