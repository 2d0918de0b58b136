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
from collections.abc import Coroutine, Iterator
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

    @contextlib.contextmanager
    def acking(self) -> Iterator[None]:
        """Around the dispatch of one request, up to its answer."""
        self._acking += 1
        try:
            yield
        finally:
            self._acking -= 1
            self._last_ack = asyncio.get_running_loop().time()

    def spawn(self, work: Coroutine[Any, Any, None], *, promptly: bool = False) -> None:
        """Run ``work`` once the acks in flight are out (``promptly``: at once, for what must
        happen within seconds of the click, like opening a modal); kept referenced until it ends."""
        task = asyncio.get_running_loop().create_task(self._after_acks(work, wait=not promptly))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _after_acks(self, work: Coroutine[Any, Any, None], *, wait: bool) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._max_wait if wait else 0.0)
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
        """On shutdown: let the work already acknowledged finish, within ``timeout`` seconds (what
        is still running then is canceled)."""
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), timeout)


class AckFirstApp(AsyncApp):
    """Bolt's app, telling ``AckFirst`` while a request is being dispatched: Bolt runs global
    middleware one after the other rather than nested, so only the dispatch as a whole (HTTP and
    Socket Mode alike) spans a request up to its answer."""

    def __init__(self, *, ack_first: AckFirst, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ack_first = ack_first

    async def async_dispatch(self, req: AsyncBoltRequest) -> BoltResponse:
        with self.ack_first.acking():
            return await super().async_dispatch(req)
