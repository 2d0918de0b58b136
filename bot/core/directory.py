"""Who is in a Slack user group: what approvals and access rules ask, answered outside the core."""

from __future__ import annotations

from typing import Protocol


class Directory(Protocol):
    """Implemented over the Slack API (``bot.slack.web.SlackDirectory``); the core only asks."""

    async def usergroup_members(self, group_id: str) -> set[str] | None: ...
