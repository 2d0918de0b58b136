"""Shared fixtures: a scrubbed environment and the sandbox (simulators + fake Slack + real bot)."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

SCRUBBED_PREFIXES = ("SLACK_", "SF_AUTH_URL_", "SFP_", "FLEXDEPLOY_")
SCRUBBED = {"DATABASE_URL", "CHATOPS_CONFIG", "PORT"}


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


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[object]:
    from bot.sandbox.embedded import running_sandbox

    async with running_sandbox(workdir=tmp_path, job_seconds=0.01) as running:
        yield running


def postgres_url() -> str | None:
    return os.environ.get("CHATOPS_TEST_DATABASE_URL") or None
