"""Requests Slack did not sign, signed with another secret, or replayed late get 401 and do nothing."""

from __future__ import annotations

import time
from urllib.parse import urlencode

import pytest

from bot.sandbox.embedded import Sandbox
from bot.store import repo
from tests.helpers import CHANNEL


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
