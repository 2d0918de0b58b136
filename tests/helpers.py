"""Small helpers for end-to-end tests: act as a Slack user, wait for what Slack would show."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from sqlmodel import select

from bot.sandbox.embedded import NOTIFY_CHANNEL, RELEASES_CHANNEL, Sandbox
from bot.sandbox.fake_slack import Message
from bot.store import repo
from bot.store.models import Operation, OpKind, OutboxMessage

CHANNEL = RELEASES_CHANNEL
T = TypeVar("T")


def ephemerals(sandbox: Sandbox, user: str) -> list[Message]:
    return [m for m in sandbox.slack.messages.get(CHANNEL, []) if m.ephemeral_for == user]


async def push(sandbox: Sandbox, user: str, text: str) -> str:
    """Run ``/push <text>`` as ``user``; return the first ephemeral answer it produced."""
    before = len(ephemerals(sandbox, user))
    result = await sandbox.agent.command(user=user, channel=CHANNEL, command="/push", text=text)
    assert result.status == 200, result
    return await next_ephemeral(sandbox, user, before)


async def next_ephemeral(sandbox: Sandbox, user: str, before: int, timeout: float = 20.0) -> str:
    found = await sandbox.slack.wait_for(
        lambda: ephemerals(sandbox, user)[before] if len(ephemerals(sandbox, user)) > before else None, timeout
    )
    assert found is not None, f"no ephemeral answer for {user}"
    return full_text(found)


def full_text(message: Message) -> str:
    parts = [message.text or ""]
    for block in message.blocks or []:
        for key in ("text",):
            value = block.get(key)
            if isinstance(value, dict):
                parts.append(str(value.get("text", "")))
        for field in block.get("fields") or []:
            parts.append(str(field.get("text", "")))
        for element in block.get("elements") or []:
            if isinstance(element.get("text"), str):
                parts.append(element["text"])
            elif isinstance(element.get("text"), dict):
                parts.append(str(element["text"].get("text", "")))
    return "\n".join(parts)


async def click(sandbox: Sandbox, user: str, op: Operation, label: str) -> str:
    before = len(ephemerals(sandbox, user))
    assert op.card_ts is not None
    result = await sandbox.agent.click_label(user=user, channel=CHANNEL, label=label, message_ts=op.card_ts)
    assert result.status == 200, result
    return await next_ephemeral(sandbox, user, before)


async def operation(sandbox: Sandbox, ref: str) -> Operation:
    assert sandbox.runtime is not None
    op = await repo.get_operation(sandbox.runtime.db, operation_id=int(ref.lstrip("P")))
    assert op is not None and op.kind == OpKind.PUSH
    return op


async def eventually(check: Callable[[], Awaitable[T]], *, until: Callable[[T], bool], timeout: float = 10.0) -> T:
    """What ``check`` returns once ``until`` accepts it, or at the timeout (for the caller to assert
    on): a command's work runs after its HTTP answer."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if until(result) or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.05)


async def outbox_drained(sandbox: Sandbox, operation_id: int) -> bool:
    """Every Slack message owed for this operation has been sent."""
    assert sandbox.runtime is not None
    async with sandbox.runtime.db.session() as session:
        rows = (await session.exec(select(OutboxMessage).where(OutboxMessage.operation_id == operation_id))).all()
    return all(row.state == "sent" for row in rows)


async def wait_for_op(
    sandbox: Sandbox,
    ref: str,
    *,
    states: Iterable[str] | None = None,
    announced: bool = False,
    card: bool = False,
    timeout: float = 60.0,
    predicate: Any = None,
) -> Operation:
    wanted = set(states or [])
    deadline = time.monotonic() + timeout
    while True:
        op = await operation(sandbox, ref)
        if (
            (not wanted or op.state in wanted)
            and (not announced or op.announced_state == op.state)
            and (not card or op.card_ts is not None)
            and (predicate is None or predicate(op))
            and (not announced or await outbox_drained(sandbox, op.id or 0))
        ):
            return op
        if time.monotonic() > deadline:
            raise AssertionError(f"{ref} stayed {op.state} (announced {op.announced_state}), wanted {wanted}")
        await asyncio.sleep(0.05)


def ref_in(text: str) -> str:
    match = re.search(r"\b(P\d+)\b", text)
    assert match, text
    return match.group(1)


def thread(sandbox: Sandbox, op: Operation) -> list[Message]:
    assert op.card_ts is not None
    return sandbox.slack.thread_replies(CHANNEL, op.card_ts)


def completion_notices(sandbox: Sandbox, op: Operation) -> tuple[list[Message], list[Message]]:
    """(in the thread, in the notifications channel) for this operation."""
    in_thread = [m for m in thread(sandbox, op) if (m.metadata or {}).get("event_type") == "chatops_operation_finished"]
    notices = [m for m in sandbox.slack.messages.get(NOTIFY_CHANNEL, []) if f"push {op.ref} " in (m.text or "")]
    return in_thread, notices


def writes(calls: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Salesforce calls that change something (token requests excluded)."""
    return [
        (method, path)
        for method, path in calls
        if method in {"POST", "PATCH", "PUT", "DELETE"} and "/oauth2/" not in path
    ]


async def stale_approve(sandbox: Sandbox, user: str, card_ts: str, operation_id: int) -> str:
    """Press Approve as a client that still shows the old card would send it."""
    before = len(ephemerals(sandbox, user))
    await sandbox.agent.click(
        user=user, channel=CHANNEL, message_ts=card_ts, action_id="op_approve", value=str(operation_id)
    )
    return await next_ephemeral(sandbox, user, before)
