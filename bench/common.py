"""Shared pieces: percentile, a temporary SQLite database, the packaging-org settings."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from pydantic import SecretStr

from bot.sandbox.salesforce_org import SalesforceOrgSim, build_auth_url
from bot.settings import ApprovalRule, OrgConfig, Settings


def percentile(samples: Sequence[float], fraction: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index]


def packaging_settings(sim: SalesforceOrgSim, workdir: Path, **overrides: object) -> Settings:
    """A bot configured with one packaging org and no approvals (benchmarks measure the machinery)."""
    # Approvals fail closed, so turning them off takes an explicit waiver (shown on every card).
    never = ApprovalRule(action="push", count=0, waiver="benchmarks measure the machinery, not approvals")
    values: dict[str, object] = {
        "slack_bot_token": SecretStr("xoxb-bench"),
        "slack_signing_secret": SecretStr("bench-signing-secret"),
        "database_url": f"sqlite:///{workdir / 'bench.db'}",
        "orgs": {"packaging": OrgConfig(kind="production", packaging=True, auth_url=SecretStr(build_auth_url(sim)))},
        "approval": [never],
    }
    values.update(overrides)
    return Settings.model_validate(values)
