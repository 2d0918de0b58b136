"""The sfp Tasks API client against the simulated sfp server, over real HTTP on 127.0.0.1.

Faults are the simulator's own knobs (forced status codes, dropped connections, a changed
token), never patches of the client: what is tested is what the bot would do on the wire.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from pydantic import SecretStr

from bot.clients.retry import RetryPolicy
from bot.clients.sfp import SfpClient, TaskSpec
from bot.errors import AmbiguousWriteError, ApiError, AuthError, TaskNotFoundError, TransientError
from bot.redaction import redact
from bot.sandbox.sfp_server import SfpServerSim
from bot.sfp.commands import SfpRef, SfpSubmit, parse_sfp
from bot.sfp.payloads import is_long_result

FAST = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02)
CHECK = TaskSpec(type="checkReviewEnvironment", data={"env": "rev1"})


@pytest.fixture
async def sim() -> AsyncIterator[SfpServerSim]:
    server = SfpServerSim(task_seconds=0.2, queue_seconds=0.0, time_speedup=600.0)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


def client_for(sim: SfpServerSim, session: aiohttp.ClientSession, *, token: str | None = None) -> SfpClient:
    return SfpClient(session=session, base_url=sim.url, token=SecretStr(token or sim.token), retry=FAST)


async def until(predicate: object, *, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)


async def test_submit_status_result_and_the_wire_format(sim: SfpServerSim, session: aiohttp.ClientSession) -> None:
    client = client_for(sim, session)
    when = datetime.now(UTC) + timedelta(seconds=0.3)
    spec = TaskSpec(type="checkReviewEnvironment", data={"env": "rev1"}, scheduled_for=when, max_retries=1)
    submitted = await client.submit(spec)
    assert submitted.type == "checkReviewEnvironment" and submitted.operation_id.isdigit()
    assert sim.bodies[0]["scheduleType"] == "scheduled" and sim.bodies[0]["retryConfig"] == {"maxRetries": 1}
    assert sim.bodies[0]["scheduledFor"].endswith("Z")
    assert ("POST", "/sfp/api/tasks") in sim.calls

    first = await client.status(submitted.operation_id)
    assert first.status == "pending" and first.progress == 0 and not first.has_result
    await until(lambda: sim.status_of(submitted.operation_id)["status"] == "completed")
    result = await client.result(submitted.operation_id)
    assert result.status == "completed" and result.progress == 100 and result.result["status"] == "InUse"


async def test_http_answers_map_to_the_error_tree(sim: SfpServerSim, session: aiohttp.ClientSession) -> None:
    client = client_for(sim, session)
    with pytest.raises(TaskNotFoundError) as not_found:
        await client.status("999")
    assert not_found.value.status == 404 and "not found" in not_found.value.message

    with pytest.raises(ApiError) as refused:
        await client.submit(TaskSpec(type="noSuchType", data={}))
    assert refused.value.status == 400 and refused.value.message.startswith("type must be one of")

    wrong = client_for(sim, session, token="not-the-token")
    with pytest.raises(AuthError) as auth:
        await wrong.status("1")
    assert "SFP_TOKEN" in auth.value.message and "[sfp] url" in auth.value.message
    assert sim.token not in str(auth.value) and sim.token not in repr(wrong)

    submitted = await client.submit(CHECK)
    with pytest.raises(TaskNotFoundError):  # not recurring: 404, as documented
        await client.stop_recurring(submitted.operation_id)
    with pytest.raises(ValueError):  # nothing odd reaches the URL path
        await client.status("../admin")


async def test_retries_only_what_is_safe_to_repeat(sim: SfpServerSim, session: aiohttp.ClientSession) -> None:
    client = client_for(sim, session)
    # Refused before any work: repeated, and one task results.
    sim.force("POST", r"^/sfp/api/tasks$", 503)
    await client.submit(CHECK)
    assert len(sim.bodies) == 1 and len(sim.tasks) == 1

    # A 5xx after the work, or a dropped connection: never repeated.
    sim.force("POST", r"^/sfp/api/tasks$", 500, after=True)
    with pytest.raises(AmbiguousWriteError):
        await client.submit(CHECK)
    sim.force("POST", r"^/sfp/api/tasks$", 0, after=True)
    with pytest.raises(AmbiguousWriteError):
        await client.submit(CHECK)
    assert len(sim.bodies) == 3 and len(sim.tasks) == 3

    # Reads are repeated through a 500; past the attempts it is a TransientError.
    sim.force("GET", r"/status$", 500, times=2)
    assert (await client.status("1000000001")).status
    sim.force("GET", r"/status$", 502, times=3)
    with pytest.raises(TransientError):
        await client.status("1000000001")


async def test_no_server_is_a_transient_error(session: aiohttp.ClientSession) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = SfpClient(session=session, base_url=f"http://127.0.0.1:{port}", token=SecretStr("t" * 20), retry=FAST)
    with pytest.raises(TransientError) as error:
        await client.submit(CHECK)  # never connected: safe, so not "ambiguous"
    assert not isinstance(error.value, AmbiguousWriteError)


async def test_recurring_runs_stop_and_cancel(sim: SfpServerSim, session: aiohttp.ClientSession) -> None:
    client = client_for(sim, session)
    end = datetime.now(UTC) + timedelta(hours=1)
    spec = TaskSpec(type="checkReviewEnvironment", data={"env": "rev1"}, every_ms=60_000, end_date=end)
    submitted = await client.submit(spec)
    assert sim.bodies[0]["recurrenceConfig"]["every"] == 60_000
    await until(lambda: len(sim.task(submitted.operation_id).instances) >= 2)
    runs = await client.recurring_instances(submitted.operation_id)
    assert runs.active is True and [i.number for i in runs.instances][:2] == [1, 2]
    assert runs.end_date is not None and abs((runs.end_date - end).total_seconds()) < 1

    stopped = await client.stop_recurring(submitted.operation_id)
    assert stopped.total_executions >= 2 and stopped.original_end_date is not None
    with pytest.raises(ApiError) as again:
        await client.stop_recurring(submitted.operation_id)
    assert again.value.status == 400 and "already stopped" in again.value.message
    assert (await client.recurring_instances(submitted.operation_id)).active is False

    sim.durations["transitionReviewEnvironment"] = 30.0
    slow = await client.submit(TaskSpec(type="transitionReviewEnvironment", data={}))
    assert (await client.cancel(slow.operation_id)).message == "Task cancelled successfully"
    assert (await client.status(slow.operation_id)).status == "cancelled"
    with pytest.raises(ApiError) as late:
        await client.cancel(slow.operation_id)
    assert late.value.status == 400


# -- the grammar and result handling the client relies on -------------------------------------------


def test_key_value_pairs_become_typed_task_data() -> None:
    parsed = parse_sfp('submit checkReviewEnvironment env=rev1 note="two words" wait:=300 flags:=[1,2] on:=true')
    assert isinstance(parsed, SfpSubmit)
    assert parsed.data == {"env": "rev1", "note": "two words", "wait": 300, "flags": [1, 2], "on": True}
    assert parse_sfp("status s12") == SfpRef(action="status", ref="S12")
    # Bare digits stay as typed: the service tries the task S7 first, then an operationId "7".
    assert parse_sfp("runs 7") == SfpRef(action="runs", ref="7")
    assert parse_sfp("stop op:abc-1:2") == SfpRef(action="stop", operation_id="abc-1:2")


def test_results_lose_their_credentials_before_anyone_sees_them() -> None:
    result = {
        "environmentDetails": {"sfdxAuthUrl": "force://a:b:c@x", "accessToken": "00Dxx!abc", "loginUrl": "https://x"},
        "note": "use Bearer abcdef123456 to call it",
        "items": [{"password": "hunter2", "name": "a"}],
    }
    cleaned = redact(result)
    assert cleaned["environmentDetails"] == {
        "sfdxAuthUrl": "[redacted]",
        "accessToken": "[redacted]",
        "loginUrl": "https://x",
    }
    assert "abcdef123456" not in cleaned["note"] and cleaned["items"][0] == {"password": "[redacted]", "name": "a"}
    assert not is_long_result({"a": 1}) and is_long_result({"rows": list(range(100))})
