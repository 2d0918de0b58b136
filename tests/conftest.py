"""Shared fixtures: a scrubbed environment and the sandbox (simulators + fake Slack + real bot)."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

SCRUBBED_PREFIXES = ("SLACK_", "SF_AUTH_URL_", "SFP_", "FLEXDEPLOY_")
SCRUBBED = {"DATABASE_URL", "CHATOPS_CONFIG", "PORT"}


@pytest.fixture(scope="session", autouse=True)
def postgres_per_worker() -> None:
    """Under pytest-xdist each worker gets a PostgreSQL database of its own (``test_gw0`` …),
    created on first use: the store tests drop and create tables, so workers must not share one."""
    url, worker = os.environ.get("CHATOPS_TEST_DATABASE_URL"), os.environ.get("PYTEST_XDIST_WORKER")
    if not url or not worker:
        return
    import psycopg

    base, _, name = url.rpartition("/")
    own = f"{name}_{worker}"
    conninfo = url.replace("postgresql+psycopg://", "postgresql://").replace("postgresql+asyncpg://", "postgresql://")
    with psycopg.connect(conninfo, autocommit=True) as connection:  # CREATE DATABASE needs autocommit
        if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (own,)).fetchone() is None:
            connection.execute(f'CREATE DATABASE "{own}"')
    os.environ["CHATOPS_TEST_DATABASE_URL"] = f"{base}/{own}"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test may see the developer's real Slack or Salesforce settings; and the logging set up
    by a test that runs the CLI in-process (a handler on that test's captured stderr) goes with it,
    or threads still logging later write to a closed file."""
    for name in list(os.environ):
        if name in SCRUBBED or name.startswith(SCRUBBED_PREFIXES):
            monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


# Tests wait on conditions, never on the clock, and most of what they wait for is Slack's
# one-message-per-second-per-channel pace: shortened here (no test asserts the one second itself;
# the pacing logic still runs, at a tenth of the interval). The poller's tick stays at a second:
# at 0.2 s it settles a double-clicked approval between the two clicks often enough that
# test_push_e2e's double click sees "decided a moment ago", an answer that test does not accept.
TEST_POLL_SECONDS = 1.0
TEST_POST_SPACING = 0.1


@pytest.fixture(autouse=True)
def quick_ticks(monkeypatch: pytest.MonkeyPatch) -> None:
    from bot.sandbox import embedded
    from bot.slack import outbox, web

    monkeypatch.setattr(embedded, "POLL_SECONDS", TEST_POLL_SECONDS)
    monkeypatch.setattr(outbox, "POST_INTERVAL", timedelta(seconds=TEST_POST_SPACING))
    monkeypatch.setattr(web, "POST_SPACING_SECONDS", TEST_POST_SPACING)


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[object]:
    from bot.sandbox.embedded import running_sandbox

    async with running_sandbox(workdir=tmp_path, job_seconds=0.01) as running:
        yield running


def postgres_url() -> str | None:
    return os.environ.get("CHATOPS_TEST_DATABASE_URL") or None
