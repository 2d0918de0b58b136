"""Requests Slack did not sign, signed with another secret, or replayed late get 401 and do nothing;
bodies over 256 KiB get 413 before they are read, and neither kind delays a genuine ack."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from urllib.parse import urlencode

import aiohttp
import pytest

from bot.sandbox.embedded import Sandbox
from bot.store import repo
from tests.helpers import CHANNEL, ephemerals, next_ephemeral


def command_body(text: str) -> bytes:
    return urlencode(
        {
            "token": "x",
            "team_id": "T0SANDBOX",
            "channel_id": CHANNEL,
            "user_id": "U0ALICE",
            "user_name": "alice",
            "command": "/push",
            "text": text,
            "trigger_id": "1.2.3",
            "response_url": "http://127.0.0.1:9/none",
        }
    ).encode()


@pytest.mark.parametrize("case", ["unsigned", "forged", "stale"])
async def test_bad_signatures_get_401_and_change_nothing(sandbox: Sandbox, case: str) -> None:
    body = command_body("create Acme Billing@1.4.0 --orgs sandbox")
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if case == "forged":
        headers.update(sandbox.agent.sign(body))
        headers["X-Slack-Signature"] = "v0=" + "0" * 64
    elif case == "stale":
        headers.update(sandbox.agent.sign(body, timestamp=int(time.time()) - 301))
    sandbox.packaging.reset_calls()
    async with sandbox.agent.session.post(sandbox.bot_url, data=body, headers=headers) as response:
        assert response.status == 401
    assert sandbox.runtime is not None
    assert await repo.count_operations(sandbox.runtime.db) == 0
    assert sandbox.packaging.calls == []
    assert not any(name.startswith("chat.") for name, _ in sandbox.slack.calls)


async def test_signed_request_within_the_window_is_accepted(sandbox: Sandbox) -> None:
    body = command_body("list")
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        **sandbox.agent.sign(body, timestamp=int(time.time()) - 200),
    }
    async with sandbox.agent.session.post(sandbox.bot_url, data=body, headers=headers) as response:
        assert response.status == 200


JUNK_BYTES = 1_900_000  # under the 2 MB aiohttp used to accept, so the old code read and parsed it


async def _post_junk(sandbox: Sandbox, body: bytes, *, chunked: bool) -> int:
    """An anonymous POST (no signature); chunked bodies carry no Content-Length to refuse them by."""

    async def in_chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    try:
        async with sandbox.agent.session.post(
            sandbox.bot_url, data=in_chunks() if chunked else body, headers=headers
        ) as response:
            return response.status
    except aiohttp.ClientError:
        return 0  # the bot hung up mid-body (it refused it); recorded so that the assert shows it


async def test_finding_2_unsigned_bodies_are_refused_before_parsing_and_never_delay_a_genuine_ack(
    sandbox: Sandbox,
) -> None:
    big = b"payload=" + b"x" * JUNK_BYTES
    small = command_body("create Acme Billing@1.4.0 --orgs sandbox")
    junk = [
        *(_post_junk(sandbox, big, chunked=index % 3 == 0) for index in range(15)),
        *(_post_junk(sandbox, small, chunked=False) for _ in range(5)),
    ]
    junk_tasks = [asyncio.ensure_future(post) for post in junk]
    await asyncio.sleep(0)  # the junk is on its way before the genuine command leaves

    before = len(ephemerals(sandbox, "U0ALICE"))
    started = time.perf_counter()
    genuine = await sandbox.agent.command(
        user="U0ALICE", channel=CHANNEL, command="/push", text="create Acme Billing@1.4.0 --orgs sandbox --dry-run"
    )
    ack_seconds = time.perf_counter() - started
    statuses = await asyncio.gather(*junk_tasks)

    assert statuses[:15] == [413] * 15
    assert statuses[15:] == [401] * 5
    assert genuine.status == 200 and not genuine.timed_out
    # The target is 200 ms (measured by `python -m bench`); this bound only has to hold on a
    # loaded two-core CI, and the old code took seconds here.
    assert ack_seconds < 1.0, ack_seconds
    assert "Dry run — nothing created" in await next_ephemeral(sandbox, "U0ALICE", before)
    assert sandbox.runtime is not None
    assert await repo.count_operations(sandbox.runtime.db) == 0  # the small unsigned create did nothing


async def test_signed_body_over_the_cap_gets_413_and_changes_nothing(sandbox: Sandbox) -> None:
    body = command_body("create Acme Billing@1.4.0 --orgs sandbox " + "x" * (256 * 1024))
    status, _ = await sandbox.agent.post(body)
    assert status == 413
    assert sandbox.runtime is not None
    assert await repo.count_operations(sandbox.runtime.db) == 0
