"""The Slack outbox on its own: per-channel order, replies that wait for their card, and sends
interrupted by a crash, against the fake Slack Web API through the bot's real client."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_slack_response import AsyncSlackResponse
from sqlalchemy import update
from sqlmodel import col, select

from bot.sandbox.fake_slack import FakeSlack
from bot.slack.outbox import SlackOutbox, card_row, message_row, reply_row
from bot.slack.web import SlackPoster, make_outbox_client
from bot.store import repo
from bot.store.db import Database, migrate
from bot.store.models import ChannelPace, Operation, OutboxMessage

CHANNEL = "C0RELEASES"


@dataclass
class Setup:
    db: Database
    slack: FakeSlack
    poster: SlackPoster
    outbox: SlackOutbox

    async def operation(self) -> Operation:
        op, _ = await repo.insert_operation(
            self.db,
            operation=Operation(
                kind="push", state="running", requester="U0ALICE", channel=CHANNEL, idempotency_key=uuid.uuid4().hex
            ),
        )
        return op

    async def row(self, key: str) -> OutboxMessage:
        async with self.db.session() as session:
            return (await session.exec(select(OutboxMessage).where(OutboxMessage.dedupe_key == key))).one()

    def posted(self, key: str) -> list[Any]:
        return [
            m
            for m in self.slack.channel_messages(CHANNEL)
            if ((m.metadata or {}).get("event_payload") or {}).get("key") == key
        ]


async def drained(setup: Setup) -> None:
    await asyncio.wait_for(setup.outbox.drain(), 20)


async def render(op: Operation) -> tuple[str, list[dict[str, Any]]]:
    return f"card of {op.ref}", [{"type": "section", "text": {"type": "mrkdwn", "text": f"card of {op.ref}"}}]


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    await migrate(url)
    db = Database(url)
    slack = FakeSlack()
    await slack.start()
    client = make_outbox_client(token=slack.bot_token, base_url=slack.api_url)  # as bot/runtime.py builds it
    poster = SlackPoster(client)
    try:
        yield Setup(db, slack, poster, SlackOutbox(db=db, poster=poster, render_card=render, owner="test"))
    finally:
        await slack.stop()
        await db.close()


async def test_a_reply_waiting_for_its_card_does_not_hold_up_the_channel(setup: Setup) -> None:
    op = await setup.operation()
    waiting = reply_row(operation=op, text="progress of the push", key="reply-waiting")
    other = message_row(channel=CHANNEL, text="someone else's news", key="other")
    await setup.outbox.enqueue(waiting, other)

    await drained(setup)
    assert [m.text for m in setup.posted("other")] == ["someone else's news"]
    assert setup.posted("reply-waiting") == []
    row = await setup.row("reply-waiting")
    assert (row.state, row.attempts) == ("pending", 0)  # never claimed, so no attempt spent

    await setup.outbox.enqueue(card_row(op))
    await drained(setup)
    card = setup.posted(f"card:{op.id}")
    replies = setup.posted("reply-waiting")
    assert len(card) == 1 and len(replies) == 1
    assert replies[0].thread_ts == card[0].ts
    assert (await setup.row("reply-waiting")).state == "sent"


async def test_a_send_cut_short_by_a_crash_is_checked_before_it_is_repeated(setup: Setup) -> None:
    op = await setup.operation()
    await setup.outbox.enqueue(card_row(op))
    await drained(setup)
    await setup.outbox.enqueue(
        reply_row(operation=op, text="done", key="reached-slack"),
        reply_row(operation=op, text="also done", key="lost-on-the-way"),
    )
    # A replica claimed both and died: one post reached Slack, the other never left.
    op_now = await repo.get_operation(setup.db, operation_id=op.id or 0)
    assert op_now is not None and op_now.card_ts
    await setup.poster.post(
        channel=CHANNEL,
        thread_ts=op_now.card_ts,
        text="done",
        metadata={"event_type": "chatops_message", "event_payload": {"key": "reached-slack"}},
        paced=False,
    )
    async with setup.db.session() as session:
        await session.exec(
            update(OutboxMessage)
            .where(col(OutboxMessage.dedupe_key).in_(["reached-slack", "lost-on-the-way"]))
            .values(
                state="sending",
                attempts=1,
                lease_owner="dead-replica",
                lease_expires_at=datetime.now(UTC) - timedelta(seconds=1),
            )
        )
        await session.commit()

    await drained(setup)
    assert len(setup.posted("reached-slack")) == 1  # found in the thread, not posted again
    assert [m.text for m in setup.posted("lost-on-the-way")] == ["also done"]
    assert {(await setup.row(key)).state for key in ("reached-slack", "lost-on-the-way")} == {"sent"}


@pytest.mark.parametrize("slack_busy", [False, True], ids=["refreshed", "edit-refused"])
async def test_a_card_posted_by_a_replica_that_died_is_adopted_and_its_replies_follow(
    setup: Setup, slack_busy: bool
) -> None:
    if slack_busy:  # refreshing the adopted card fails: it must be adopted all the same
        setup.slack.rate_limit_next("chat.update", 20, retry_after=0)
    op = await setup.operation()
    await setup.outbox.enqueue(card_row(op), reply_row(operation=op, text="finished", key="completion"))
    # The dying replica posted the card but never recorded its ts, so the reply has no thread yet.
    ts = await setup.poster.post(
        channel=CHANNEL,
        text="card as it was",
        metadata={"event_type": "chatops_card", "event_payload": {"key": f"card:{op.id}"}},
        paced=False,
    )
    async with setup.db.session() as session:
        await session.exec(
            update(OutboxMessage)
            .where(col(OutboxMessage.dedupe_key) == f"card:{op.id}")
            .values(state="sending", attempts=1, lease_expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
        await session.commit()

    await drained(setup)
    assert [m.ts for m in setup.posted(f"card:{op.id}")] == [ts]  # not posted a second time
    assert [m.thread_ts for m in setup.posted("completion")] == [ts]
    adopted = await repo.get_operation(setup.db, operation_id=op.id or 0)
    assert adopted is not None and adopted.card_ts == ts
    card = setup.slack.find_message(CHANNEL, ts)
    assert card is not None
    if slack_busy:  # left for the poller to edit: no digest, and due
        assert adopted.card_digest is None and adopted.next_poll_at is not None
        assert card.text == "card as it was"
    else:
        assert adopted.card_digest is not None and card.text == f"card of {op.ref}"  # brought up to date


async def test_a_card_slack_refuses_for_good_takes_its_waiting_replies_with_it(setup: Setup) -> None:
    async def too_big(op: Operation) -> tuple[str, list[dict[str, Any]]]:
        section = {"type": "section", "text": {"type": "mrkdwn", "text": "row"}}
        return "card", [section] * 51  # Slack takes at most 50 blocks in a message

    outbox = SlackOutbox(db=setup.db, poster=setup.poster, render_card=too_big, owner="test")
    op = await setup.operation()
    await outbox.enqueue(card_row(op), reply_row(operation=op, text="finished", key="completion"))
    async with setup.db.session() as session:  # the card has already been refused five times
        await session.exec(update(OutboxMessage).where(col(OutboxMessage.kind) == "card").values(attempts=5))
        await session.commit()

    await asyncio.wait_for(outbox.drain(), 20)
    card, reply = await setup.row(f"card:{op.id}"), await setup.row("completion")
    assert (card.state, card.last_error) == ("failed", "invalid_blocks")
    assert reply.state == "failed" and "card could not be posted" in (reply.last_error or "")
    assert setup.slack.channel_messages(CHANNEL) == []


async def test_a_429_is_the_outboxs_to_answer_on_the_first_refusal(setup: Setup) -> None:
    """One retry owner: Slack's first 429 comes back to the outbox (no retries inside the call),
    which holds the row and its channel for Retry-After, then sends the message once."""
    setup.slack.rate_limit_next("chat.postMessage", 1, retry_after=2)
    await setup.outbox.enqueue(message_row(channel=CHANNEL, text="release notes", key="limited"))
    refused_at = time.monotonic()

    assert await setup.outbox.deliver() == 0
    assert len(setup.slack.calls_to("chat.postMessage")) == 1  # refused once, not retried in the call
    row = await setup.row("limited")
    assert (row.state, row.attempts, row.lease_owner) == ("pending", 0, None)  # pacing: no attempt spent
    assert row.next_attempt_at is not None
    assert await setup.outbox.deliver() == 0  # held, not hammered
    assert len(setup.slack.calls_to("chat.postMessage")) == 1

    await drained(setup)
    assert time.monotonic() - refused_at >= 1.5
    assert [m.text for m in setup.posted("limited")] == ["release notes"]
    assert len(setup.slack.calls_to("chat.postMessage")) == 2
    assert (await setup.row("limited")).state == "sent"


async def test_a_send_slack_fails_waits_longer_each_time_and_keeps_its_channels_order(setup: Setup) -> None:
    first, second = (
        message_row(channel=CHANNEL, text="one", key="one"),
        message_row(channel=CHANNEL, text="two", key="two"),
    )
    await setup.outbox.enqueue(first, second)
    real_post = setup.poster.post
    failures = 2

    async def flaky_post(**kwargs: Any) -> str:
        nonlocal failures
        if failures:
            failures -= 1
            raise TimeoutError  # Slack did not answer in time
        return await real_post(**kwargs)

    setup.poster.post = flaky_post  # type: ignore[method-assign]
    await setup.outbox.deliver()
    row = await setup.row("one")
    assert (row.state, row.attempts, row.last_error) == ("pending", 1, "timed out")
    assert row.next_attempt_at is not None
    await drained(setup)
    assert [m.text for m in setup.slack.channel_messages(CHANNEL)] == ["one", "two"]


async def attempted(setup: Setup, key: str, attempts: int) -> None:
    """As if the row had been tried ``attempts`` times already."""
    async with setup.db.session() as session:
        await session.exec(update(OutboxMessage).where(col(OutboxMessage.dedupe_key) == key).values(attempts=attempts))
        await session.commit()


async def due_now(setup: Setup, key: str) -> None:
    async with setup.db.session() as session:
        await session.exec(
            update(OutboxMessage).where(col(OutboxMessage.dedupe_key) == key).values(next_attempt_at=None)
        )
        await session.commit()
    async with setup.db.session() as session:  # and its channel's hold, as if the minute had passed
        await session.exec(update(ChannelPace).values(next_post_at=datetime.now(UTC) - timedelta(seconds=1)))
        await session.commit()


async def test_slack_down_longer_than_the_attempts_allow_is_waited_out_not_given_up(setup: Setup) -> None:
    """A Slack outage is not the message's fault: past MAX_ATTEMPTS tries it is still owed."""
    await setup.outbox.enqueue(message_row(channel=CHANNEL, text="release done", key="outage"))
    await attempted(setup, "outage", 10)
    real_post = setup.poster.post

    async def unreachable(**kwargs: Any) -> str:
        raise aiohttp.ClientConnectionError("Slack is down")

    setup.poster.post = unreachable  # type: ignore[method-assign]
    await setup.outbox.deliver()
    row = await setup.row("outage")
    assert (row.state, row.last_error) == ("pending", "Slack unreachable: ClientConnectionError")

    setup.poster.post = real_post  # type: ignore[method-assign]
    await due_now(setup, "outage")
    await drained(setup)
    assert [m.text for m in setup.posted("outage")] == ["release done"]


async def test_a_send_whose_earlier_try_cannot_be_checked_is_not_sent_blind(setup: Setup) -> None:
    """The earlier try may have reached Slack; if Slack will not say, sending again could post it
    twice: the row waits and is checked again."""
    await setup.outbox.enqueue(message_row(channel=CHANNEL, text="release done", key="unsure"))
    await attempted(setup, "unsure", 1)
    real_find = setup.poster.find_in_channel

    async def refused(**kwargs: Any) -> str | None:
        response = AsyncSlackResponse(
            client=None,  # type: ignore[arg-type]
            http_verb="POST",
            api_url="conversations.history",
            req_args={},
            data={"ok": False, "error": "internal_error"},
            headers={},
            status_code=500,
        )
        raise SlackApiError("internal_error", response)

    setup.poster.find_in_channel = refused  # type: ignore[method-assign]
    await setup.outbox.deliver()
    assert setup.posted("unsure") == [] and setup.slack.calls_to("chat.postMessage") == []
    assert (await setup.row("unsure")).state == "pending"

    setup.poster.find_in_channel = real_find  # type: ignore[method-assign]
    await due_now(setup, "unsure")
    await drained(setup)
    assert [m.text for m in setup.posted("unsure")] == ["release done"]
