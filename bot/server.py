"""Serving the Bolt app: HTTP mode (aiohttp) or Socket Mode, with the poller alongside."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncApp

from bot.runtime import Runtime

log = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"


def http_app(bolt: AsyncApp, *, health: Callable[[], dict[str, Any]] | None = None) -> web.Application:
    """``POST /slack/events`` for commands, interactivity and events; ``GET /healthz``."""

    async def events(request: web.Request) -> web.Response:
        bolt_request = await to_bolt_request(request)
        return await to_aiohttp_response(await bolt.async_dispatch(bolt_request))

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, **(health() if health else {})})

    application = web.Application(client_max_size=2 * 1024 * 1024)
    application.router.add_post(EVENTS_PATH, events)
    application.router.add_get("/healthz", healthz)
    return application


async def start_http(runtime: Runtime, *, host: str = "0.0.0.0", port: int) -> web.AppRunner:
    def health() -> dict[str, Any]:
        return {"replica": runtime.poller.owner, "last_cycle": runtime.poller.last_cycle}

    runner = web.AppRunner(http_app(runtime.app, health=health), access_log=None)
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
        await handler.connect_async()
        log.info("connected to Slack in Socket Mode")
        try:
            await stop.wait()
        finally:
            await handler.close_async()
    await runtime.close()
