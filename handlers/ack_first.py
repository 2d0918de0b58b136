"""Acknowledgements before work: Slack waits at most 3 s for an ack, nobody waits for the rest.

Listeners ack, hand their work to ``AckFirst.spawn`` and return, so Bolt (run with
``process_before_response=True``) answers the HTTP request at once, without its 10 ms polling for
the ack. Under a burst of commands the work of the first ones (a dry run reads thousands of
subscribers) would still hold up the acks of the later ones, since both share one event loop. So
work waits until no request has been in the middle of being acknowledged for ``settle`` seconds
(the requests of a burst arrive milliseconds apart), but never longer than ``max_wait``, so that
steady traffic cannot starve it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from slack_bolt.async_app import AsyncApp
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.response import BoltResponse

log = logging.getLogger(__name__)


class AckFirst:
    def __init__(self, *, settle: float = 0.05, max_wait: float = 1.0) -> None:
        self._settle = settle
        self._max_wait = max_wait
        self._acking = 0
        self._last_ack = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    def register(self, app: AsyncApp) -> None:
        async def count_acks(
            req: AsyncBoltRequest, resp: BoltResponse, next: Callable[[], Awaitable[BoltResponse]]
        ) -> BoltResponse:
            self._acking += 1
            try:
                return await next()
            finally:
                self._acking -= 1
                self._last_ack = asyncio.get_running_loop().time()

        app.middleware(count_acks)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` once the acks in flight are out; kept referenced until it ends."""
        task = asyncio.get_running_loop().create_task(self._after_acks(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _after_acks(self, work: Coroutine[Any, Any, None]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_wait
        while loop.time() < deadline:
            calm_for = loop.time() - self._last_ack
            if self._acking == 0 and calm_for >= self._settle:
                break
            await asyncio.sleep(max(self._settle - calm_for, 0.005))
        try:
            await work
        except Exception:  # listeners turn errors into replies; this is the last resort
            log.exception("work after an ack failed")

    async def drain(self, timeout: float) -> None:
        """On shutdown: let the work already started finish, within ``timeout`` seconds."""
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), timeout)
