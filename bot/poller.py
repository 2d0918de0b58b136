"""The poller: every tick, lease the due operations, advance them, and keep Slack in step.

Leases make replicas safe: an operation is advanced by whichever replica's conditional UPDATE
claimed it, and every write the advance makes is conditioned on that lease. A replica that dies
holding leases simply lets them expire; another picks the operations up.

Messages go through the Slack outbox (bot/slack/outbox.py): a cycle only records what is owed, so it
never waits for Slack's one-message-per-second-per-channel rate. The completion notice is queued
and ``announced_state`` recorded in one transaction, so it is owed exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from slack_sdk.errors import SlackApiError

from bot.core.operations import Advance, Advancer, OpEvent
from bot.settings import PollerConfig
from bot.slack.outbox import CardRenderer, SlackOutbox, card_digest, file_row, message_row, reply_row
from bot.slack.web import COMPLETION_EVENT, SlackPoster
from bot.store import outbox as outbox_store
from bot.store import repo
from bot.store.db import Database
from bot.store.models import Operation, OpState, OutboxMessage

log = logging.getLogger(__name__)

Blocks = list[dict[str, Any]]


@dataclass(frozen=True)
class KindView:
    """How one kind of operation is advanced and shown."""

    advancer: Advancer
    card: Callable[..., tuple[str, Blocks]]  # (op, approvals=[...]) -> (text, blocks)
    event_reply: Callable[[Operation, OpEvent], str | None]
    completion_text: Callable[[Operation], str]


def replica_name() -> str:
    """Names this process in leases (the poller's and the outbox's), unique among replicas."""
    return f"{socket.gethostname()}:{uuid.uuid4().hex[:6]}"


def card_renderer(*, db: Database, views: dict[str, KindView]) -> CardRenderer:
    """The card of an operation as it should look now: the outbox renders a card when it finally
    sends it, so a card that waited in the queue goes out with the newest content."""

    async def render(op: Operation) -> tuple[str, Blocks]:
        waiting = op.state == OpState.AWAITING_APPROVAL and op.id is not None
        approvals = (await repo.approvers(db, operation_ids=[op.id or 0])).get(op.id or 0, []) if waiting else []
        return views[op.kind].card(op, approvals=approvals)

    return render


class Poller:
    def __init__(
        self,
        *,
        db: Database,
        views: dict[str, KindView],
        poster: SlackPoster,
        outbox: SlackOutbox,
        config: PollerConfig,
        notifications_channel: str | None = None,
        owner: str | None = None,
    ) -> None:
        self._db = db
        self._views = views
        self._poster = poster
        self._config = config
        self._notify_channel = notifications_channel
        self.owner = owner or replica_name()
        self._scheduler: AsyncIOScheduler | None = None
        self._tick_lock = asyncio.Lock()
        self._jobs: set[asyncio.Task[Any]] = set()  # scheduler jobs running now
        self._stopping = False
        self._replies: list[OutboxMessage] = []
        self.last_cycle: dict[str, Any] = {}  # shown on /healthz: what the latest non-empty cycle did
        self.outbox = outbox  # built by the runtime; the poller schedules its deliveries
        self.outbox.wake = self._wake_outbox

    # -- scheduling -----------------------------------------------------------------------
    def start(self) -> None:
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._scheduler.add_job(
            self._tracked(self.tick),
            "interval",
            seconds=self._config.interval_seconds,
            id="poll",
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC),
        )
        self._scheduler.add_job(
            self._tracked(self.outbox.deliver),
            "interval",
            seconds=0.25,
            id="outbox",
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC),
        )
        self._scheduler.start()

    async def stop(self, *, grace_seconds: float = 10.0) -> None:
        """Stop scheduling, let a cycle in flight finish (it holds leases), and send what is owed.

        Whatever the outbox cannot send within the grace period stays queued for the next start.
        """
        self._stopping = True
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.pause()
        try:
            await asyncio.wait_for(self._tick_lock.acquire(), timeout=grace_seconds)
        except TimeoutError:
            log.warning("a poll cycle was still running at shutdown; its leases will expire")
        else:
            self._tick_lock.release()
        try:
            await asyncio.wait_for(self.outbox.drain(), timeout=grace_seconds)
        except TimeoutError:
            log.warning("Slack messages still queued at shutdown; they are sent after the next start")
        # APScheduler's shutdown cancels the job tasks still in flight and returns at once. They
        # must be over before the caller closes the database (a task cut off in the middle of a
        # query can wait for ever on a connection that is gone): let them finish first, and
        # then let any that had to be canceled unwind.
        if self._jobs:
            await asyncio.wait(set(self._jobs), timeout=grace_seconds)
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        if self._jobs:
            await asyncio.wait(set(self._jobs), timeout=grace_seconds)

    def _tracked(self, job: Callable[[], Awaitable[int]]) -> Callable[[], Awaitable[int]]:
        async def run() -> int:
            task = asyncio.current_task()
            assert task is not None
            self._jobs.add(task)
            try:
                return await job()
            finally:
                self._jobs.discard(task)

        return run

    def _wake_outbox(self) -> None:
        if self._scheduler is not None and self._scheduler.running and (job := self._scheduler.get_job("outbox")):
            job.modify(next_run_time=datetime.now(UTC))

    def kick(self) -> None:
        """Run a tick now (a new operation, an approval): users should not wait a whole interval."""
        if self._scheduler is None or not self._scheduler.running:
            return
        job = self._scheduler.get_job("poll")
        if job is not None:
            job.modify(next_run_time=datetime.now(UTC))

    # -- one cycle ----------------------------------------------------------------------------
    async def tick(self) -> int:
        """Advance every due operation once; returns how many were handled."""
        if self._stopping:
            return 0
        async with self._tick_lock:
            started = time.perf_counter()
            now = datetime.now(UTC)
            claimed = await repo.claim_due(
                self._db,
                owner=self.owner,
                now=now,
                lease=timedelta(seconds=self._config.lease_seconds),
                limit=self._config.batch_size,
            )
            if not claimed:
                return 0
            async with self._holding(claimed[0].lease_owner or ""):
                by_kind: dict[str, list[Operation]] = defaultdict(list)
                for operation in claimed:
                    by_kind[operation.kind].append(operation)
                # Each kind talks to its own system: they are advanced side by side.
                advances: dict[int, Advance] = {}
                for outcome in await asyncio.gather(*(self._advance(kind, ops) for kind, ops in by_kind.items())):
                    advances.update(outcome)
                fresh = await repo.operations_by_ids(self._db, ids=[op.id for op in claimed if op.id is not None])
                # An operation someone else moved meanwhile (an approval, a cancel) is looked at again
                # at once rather than after the delay its advancer chose for the old state.
                advanced = {op.id: op.state for op in claimed}
                for op in fresh:
                    if op.id is not None and op.state != advanced.get(op.id):
                        advances[op.id] = replace(advances.get(op.id, Advance()), next_poll_in=0.0)
                waiting = [op.id for op in fresh if op.state == OpState.AWAITING_APPROVAL and op.id is not None]
                approvals = await repo.approvers(self._db, operation_ids=waiting)
                # Cards not in Slack yet, in one statement and ahead of any reply of this cycle; the
                # outbox renders each when it sends it, so it goes out with the newest content.
                await self.outbox.enqueue_cards([op for op in fresh if op.card_ts is None and op.kind in self._views])
                self._replies = []
                releases = await asyncio.gather(
                    *(
                        self._publish(op, advances.get(op.id or 0, Advance()), approvals.get(op.id or 0, []))
                        for op in fresh
                    )
                )
                await self.outbox.enqueue(*self._replies)  # thread replies of the whole cycle, one statement
                await repo.release_many(self._db, rows=releases)
                self.last_cycle = {
                    "operations": len(claimed),
                    "seconds": round(time.perf_counter() - started, 4),
                    "started_at": now.isoformat(),
                    "finished_at": datetime.now(UTC).isoformat(),
                }
                return len(claimed)

    @contextlib.asynccontextmanager
    async def _holding(self, lease_token: str) -> AsyncIterator[None]:
        """Renew this cycle's leases while it runs, so that a cycle slowed down by slow systems
        is not taken over half-way by another replica (which would see half-done steps)."""

        async def renew() -> None:
            every = self._config.lease_seconds / 3
            while True:
                await asyncio.sleep(every)
                until = datetime.now(UTC) + timedelta(seconds=self._config.lease_seconds)
                try:
                    await repo.extend_leases(self._db, lease_token=lease_token, until=until)
                except Exception:
                    log.exception("could not renew the leases of this cycle")

        keeper = asyncio.create_task(renew())
        try:
            yield
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    async def _advance(self, kind: str, operations: list[Operation]) -> dict[int, Advance]:
        """Advance the operations of one kind; a failure of one kind leaves the others alone."""
        view = self._views.get(kind)
        if view is None:
            return {}
        try:
            return await view.advancer.advance(operations, lease_token=operations[0].lease_owner or "")
        except Exception:
            log.exception("advancing %d %s operation(s) failed", len(operations), kind)
            return {}

    async def _publish(
        self, op: Operation, advance: Advance, approvals: list[str]
    ) -> tuple[int, str, datetime | None, str | None]:
        """Card, thread replies, completion; returns how to hand the lease back (released in one batch)."""
        assert op.id is not None
        token = op.lease_owner or ""
        view = self._views.get(op.kind)
        retry_soon = datetime.now(UTC) + timedelta(seconds=max(self._config.interval_seconds, 5.0))
        if view is None:
            return op.id, token, retry_soon, None
        next_poll: datetime | None = None
        digest = op.card_digest
        try:
            digest, synced = await self._sync_card(op, view, approvals)
            texts = [view.event_reply(op, event) for event in advance.events]
            replies = [reply_row(operation=op, text=text) for text in texts if text]
            if op.is_terminal:
                await self.outbox.enqueue(*replies)  # before the completion notice, in this order
            else:
                self._replies.extend(replies)
            if op.is_terminal:
                if op.announced_state != op.state:
                    await self._announce(op, view, token)
                if not synced:
                    next_poll = retry_soon  # the final card is still owed (update budget was spent)
            else:
                delay = advance.next_poll_in if advance.next_poll_in is not None else self._config.interval_seconds
                next_poll = datetime.now(UTC) + timedelta(seconds=delay)
        except SlackApiError as exc:
            log.warning("slack call failed for %s: %s", op.ref, exc.response.get("error"))
            next_poll = retry_soon
        except Exception:
            log.exception("publishing %s failed", op.ref)
            next_poll = retry_soon
        return op.id, token, next_poll, digest

    async def _sync_card(self, op: Operation, view: KindView, approvals: list[str]) -> tuple[str | None, bool]:
        """Queue the card once; then edit it only when its content changed and the update budget allows.

        Returns the digest of what Slack now shows and whether that is the current content.
        """
        if op.card_ts is None:
            return op.card_digest, True  # queued by the cycle (``tick``)
        text, blocks = view.card(op, approvals=approvals)
        digest = card_digest(text, blocks)
        if digest == op.card_digest:
            return digest, True
        if await self._poster.try_update(channel=op.channel, ts=op.card_ts, text=text, blocks=blocks):
            return digest, True
        return op.card_digest, False

    async def _announce(self, op: Operation, view: KindView, token: str) -> None:
        """Queue the completion notice (thread, files, notifications channel) and record it, together."""
        assert op.id is not None
        key = f"{op.id}:{op.state}"
        text = view.completion_text(op)
        rows = [reply_row(operation=op, text=text, key=f"completion:{key}", event_type=COMPLETION_EVENT)]
        for index, file in enumerate(await view.advancer.completion_files(op)):
            rows.append(file_row(operation=op, file=file, key=f"file:{key}:{index}"))
        if self._notify_channel and self._notify_channel != op.channel:
            rows.append(
                message_row(
                    channel=self._notify_channel,
                    text=text,
                    key=f"notice:{key}",
                    operation_id=op.id,
                    event_type=COMPLETION_EVENT,
                )
            )
        # One transaction: the notice is owed exactly when ``announced_state`` says it was queued
        # (a failure between the two would lose the notice, or send it twice).
        async with self._db.transaction() as session:
            if not await repo.record_announced(session, operation_id=op.id, lease_token=token, state=op.state):
                return  # the lease was lost: its new holder announces
            await outbox_store.enqueue(session, rows=rows)
            await repo.audit(
                session, actor="bot", channel=op.channel, operation_ref=op.ref, action="completed", outcome=op.state
            )
        self.outbox.wake()
