"""``[access]`` rules: who may run which command, from which channel (SPEC §9)."""

from __future__ import annotations

from bot.errors import NotAllowedError
from bot.services.approvals import Directory
from bot.settings import AccessConfig


class AccessPolicy:
    def __init__(self, *, rules: AccessConfig, directory: Directory) -> None:
        self._rules = rules
        self._directory = directory

    async def check(self, *, command: str, user: str, channel: str) -> None:
        """Raise NotAllowedError unless ``user`` may run ``command`` (e.g. "push") in ``channel``."""
        rule = self._rules.rule_for(command)
        if rule is None:
            return
        if rule.channels and channel not in rule.channels:
            allowed = ", ".join(rule.channels)
            raise NotAllowedError(f"`/{command.lstrip('/')}` can only be used in these channels: {allowed}.")
        if not await self.user_may(command=command, user=user):
            raise NotAllowedError(f"You are not allowed to use `/{command.lstrip('/')}`; ask a release manager.")

    async def user_may(self, *, command: str, user: str) -> bool:
        """Whether the rule for ``command`` (if any) lets ``user`` in, wherever they are."""
        rule = self._rules.rule_for(command)
        if rule is None or (not rule.users and not rule.usergroups) or user in rule.users:
            return True
        for group in rule.usergroups:
            members = await self._directory.usergroup_members(group)
            if members and user in members:
                return True
        return False
