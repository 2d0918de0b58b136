"""Acknowledgements go out before work: the HTTP answer never waits for a slow org, and work
spawned during a burst starts only once the burst's requests are answered."""

from __future__ import annotations

import asyncio

from bot.sandbox.embedded import Sandbox
from handlers.ack_first import AckFirst
from tests.helpers import CHANNEL, ephemerals, next_ephemeral


async def test_the_answer_to_a_command_does_not_wait_for_a_slow_org(sandbox: Sandbox) -> None:
    sandbox.packaging.latency = 1.0  # every Salesforce call of the dry run below takes a second
    before = len(ephemerals(sandbox, "U0ALICE"))
    result = await sandbox.agent.command(
        user="U0ALICE", channel=CHANNEL, command="/push", text="create Acme Billing@1.4.0 --orgs all --dry-run"
    )
    assert result.status == 200 and not result.timed_out
    assert len(ephemerals(sandbox, "U0ALICE")) == before  # acknowledged; the plan is still being read
    assert "Dry run" in await next_ephemeral(sandbox, "U0ALICE", before)


async def test_work_waits_for_the_requests_being_answered_unless_it_must_be_prompt() -> None:
    gate = AckFirst(settle=0.05, max_wait=5.0)
    order: list[str] = []

    async def record(name: str) -> None:
        order.append(name)

    with gate.acking():  # a request is being dispatched
        gate.spawn(record("work"))
        gate.spawn(record("open a modal"), promptly=True)
        await asyncio.sleep(0.3)
        order.append("answered")
    await gate.drain(timeout=5.0)
    assert order == ["open a modal", "answered", "work"]


async def test_steady_traffic_cannot_starve_work() -> None:
    gate = AckFirst(settle=0.05, max_wait=0.2)
    done = asyncio.Event()

    async def work() -> None:
        done.set()

    with gate.acking():  # a request that is never answered
        gate.spawn(work())
        await asyncio.wait_for(done.wait(), 5.0)  # ran anyway, once max_wait had passed


async def test_shutdown_lets_acknowledged_work_finish() -> None:
    gate = AckFirst(settle=0.0)
    finished: list[int] = []

    async def work(n: int) -> None:
        await asyncio.sleep(0.1)
        finished.append(n)

    for n in range(5):
        gate.spawn(work(n))
    await gate.drain(timeout=5.0)
    assert sorted(finished) == [0, 1, 2, 3, 4]
