"""Serving a simulator's aiohttp app on a local port, written once for every simulator.

Each simulator (Salesforce org, sfp server, FlexDeploy, the release-artifact host) is its own
aiohttp app that a test or the console starts on a free port and stops at the end.
"""

from __future__ import annotations

from aiohttp import web


async def serve(app: web.Application, *, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on host:port (0: any free port); the runner, and the base URL of the port bound."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound_host, bound_port = runner.addresses[0][:2]
    return runner, f"http://{bound_host}:{bound_port}"


async def close(runner: web.AppRunner | None) -> None:
    """Stop serving; stopping a simulator that never started is harmless."""
    if runner is not None:
        await runner.cleanup()
