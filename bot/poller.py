"""The poller: every tick, lease the due operations, advance them, and keep Slack in step.

Leases make replicas safe: an operation is advanced by whichever replica's conditional UPDATE
claimed it, and every write the advance makes is conditioned on that lease. A replica that dies
holding leases simply lets them expire; another picks the operations up.

Completion is announced exactly once: ``announced_state`` goes to ``posting:<state>`` before
the message is sent (with Slack message metadata naming the operation) and to ``<state>``
after. A replica that finds ``posting:…`` left behind by a crash looks for that metadata in the
thread before posting again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from slack_sdk.errors import SlackApiError
from sqlmodel import col, select

from bot.services.operations import Advance, Advancer, OpEvent
from bot.settings import PollerConfig
from bot.slack.web import COMPLETION_EVENT, SlackPoster
from bot.store import repo
from bot.store.db import Database
from bot.store.models import Approval, Operation, OpState

log = logging.getLogger(__name__)

Blocks = list[dict[str, Any]]


@dataclass(frozen=True)
class KindView:
    """How one kind of operation is advanced and shown."""

    advancer: Advancer
    card: Callable[..., tuple[str, Blocks]]  # (op, approvals=[...]) -> (text, blocks)
    event_reply: Callable[[Operation, OpEvent], str | None]
    completion_text: Callable[[Operation], str]


class Poller:
    def __init__(
        self,
        *,
        db: Database,
        views: dict[str, KindView],
        poster: SlackPoster,
        config: PollerConfig,
        notifications_channel: str | None = None,
        owner: str | None = None,
    ) -> None:
        self._db = db
        self._views = views
        self._poster = poster
        self._config = config
        self._notify_channel = notifications_channel
        self.owner = owner or f"{socket.gethostname()}:{uuid.uuid4().hex[:6]}"
        self._scheduler: AsyncIOScheduler | None = None
        self._tick_lock = asyncio.Lock()
        self._stopping = False

    # -- scheduling -----------------------------------------------------------------------
    def start(self) -> None:
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._scheduler.add_job(
            self.tick,
            "interval",
            seconds=self._config.interval_seconds,
            id="poll",
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC),
        )
        self._scheduler.start()

    async def stop(self, *, grace_seconds: float = 10.0) -> None:
        """Stop scheduling and let a cycle in flight finish (it holds leases and half-sent cards)."""
        self._stopping = True
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.pause()
        try:
            await asyncio.wait_for(self._tick_lock.acquire(), timeout=grace_seconds)
        except TimeoutError:
            log.warning("a poll cycle was still running at shutdown; its leases will expire")
        else:
            self._tick_lock.release()
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)

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
            by_kind: dict[str, list[Operation]] = defaultdict(list)
            for operation in claimed:
                by_kind[operation.kind].append(operation)
            advances: dict[int, Advance] = {}
            for kind, operations in by_kind.items():
                view = self._views.get(kind)
                if view is None:
                    continue
                token = operations[0].lease_owner or ""
                try:
                    advances.update(await view.advancer.advance(operations, lease_token=token))
                except Exception:
                    log.exception("advancing %d %s operation(s) failed", len(operations), kind)
            fresh = await self._reload([op.id for op in claimed if op.id is not None])
            approvals = await self._approvals([op for op in fresh if op.state == OpState.AWAITING_APPROVAL])
            await asyncio.gather(
                *(self._publish(op, advances.get(op.id or 0, Advance()), approvals.get(op.id or 0, [])) for op in fresh)
            )
            return len(claimed)

    async def _reload(self, ids: Sequence[int]) -> list[Operation]:
        async with self._db.session() as session:
            return list((await session.exec(select(Operation).where(col(Operation.id).in_(ids)))).all())

    async def _approvals(self, operations: Sequence[Operation]) -> dict[int, list[str]]:
        if not operations:
            return {}
        async with self._db.session() as session:
            rows = (
                await session.exec(
                    select(Approval).where(
                        col(Approval.operation_id).in_([op.id for op in operations]), Approval.decision == "approve"
                    )
                )
            ).all()
        result: dict[int, list[str]] = defaultdict(list)
        for row in rows:
            result[row.operation_id].append(row.approver)
        return result

    async def _publish(self, op: Operation, advance: Advance, approvals: list[str]) -> None:
        """Card, thread replies, completion; then hand the lease back with the next poll time."""
        assert op.id is not None
        token = op.lease_owner or ""
        view = self._views.get(op.kind)
        next_poll: datetime | None = None
        retry_soon = datetime.now(UTC) + timedelta(seconds=max(self._config.interval_seconds, 5.0))
        digest = op.card_digest
        try:
            if view is None:
                return
            digest, synced = await self._sync_card(op, view, approvals, token)
            for event in advance.events:
                text = view.event_reply(op, event)
                if text and op.card_ts:
                    await self._poster.post(channel=op.channel, thread_ts=op.card_ts, text=text)
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
        finally:
            await repo.release_lease(
                self._db, operation_id=op.id, lease_token=token, next_poll_at=next_poll, card_digest=digest
            )

    async def _sync_card(
        self, op: Operation, view: KindView, approvals: list[str], token: str
    ) -> tuple[str | None, bool]:
        """Post the card once, then edit it only when its content changed and the update budget allows.

        Returns the digest of what Slack now shows and whether that is the current content.
        """
        text, blocks = view.card(op, approvals=approvals)
        digest = hashlib.sha256(json.dumps([text, blocks], sort_keys=True).encode()).hexdigest()[:32]
        if op.card_ts is None:
            ts = await self._poster.post(channel=op.channel, text=text, blocks=blocks)
            op.card_ts = ts
            # Recorded at once: a crash before the lease is released must not post a second card.
            await repo.update_operation(self._db, operation_id=op.id or 0, lease_token=token, values={"card_ts": ts})
            return digest, True
        if digest == op.card_digest:
            return digest, True
        if await self._poster.try_update(channel=op.channel, ts=op.card_ts, text=text, blocks=blocks):
            return digest, True
        return op.card_digest, False

    async def _announce(self, op: Operation, view: KindView, token: str) -> None:
        assert op.id is not None and op.card_ts is not None
        marker = f"posting:{op.state}"
        key = f"{op.id}:{op.state}"
        if op.announced_state == marker and await self._poster.thread_has_event(
            channel=op.channel, thread_ts=op.card_ts, event_type=COMPLETION_EVENT, key=key
        ):
            await repo.update_operation(
                self._db, operation_id=op.id, lease_token=token, values={"announced_state": op.state}
            )
            return
        if not await repo.update_operation(
            self._db, operation_id=op.id, lease_token=token, values={"announced_state": marker}
        ):
            return  # the lease was lost: whoever holds it now will announce
        text = view.completion_text(op)
        metadata = {"event_type": COMPLETION_EVENT, "event_payload": {"key": key, "ref": op.ref}}
        files = await view.advancer.completion_files(op)
        await self._poster.post(channel=op.channel, thread_ts=op.card_ts, text=text, metadata=metadata)
        for file in files:
            await self._poster.upload(channel=op.channel, thread_ts=op.card_ts, file=file)
        if self._notify_channel and self._notify_channel != op.channel:
            await self._poster.post(channel=self._notify_channel, text=text)
        await repo.update_operation(
            self._db, operation_id=op.id, lease_token=token, values={"announced_state": op.state}
        )
        await repo.audit(
            self._db, actor="bot", channel=op.channel, operation_ref=op.ref, action="completed", outcome=op.state
        )
