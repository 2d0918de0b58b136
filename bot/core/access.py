"""``[access]`` rules: who may run which command, from which channel (SPEC §9), and who may read
or cancel one operation (SPEC §13).

Reading an operation (status, result, runs, its line in a list) is for its channel, or for the
people it belongs to wherever they are: its requester, its approvers and ``[access] admins``.
Canceling or stopping it is for those people only, whatever the channel. An sfp task the bot did
not submit (``op:<id>``) belongs to nobody here, so only admins may touch it: with the bot's
token anyone could otherwise read or cancel any task on the sfp server, CI's included.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from bot.core.directory import Directory
from bot.core.payloads import common
from bot.errors import NotAllowedError
from bot.settings import AccessConfig
from bot.store.models import Operation

# Ids as Slack writes them; only ids of this shape are put in a mention.
_SLACK_ID = re.compile(r"^[A-Z0-9]{2,30}$")


# -- refusals (the wording of every access refusal, side by side) ---------------------------------


def _command_channels_refusal(command: str, channels: Iterable[str]) -> str:
    return f"`/{command}` can only be used in these channels: {', '.join(channels)}."


def _command_user_refusal(command: str) -> str:
    return f"You are not allowed to use `/{command}`; ask a release manager."


def _look_elsewhere(operation: Operation) -> str:
    """Where to ask about an operation, and nothing else about it: no state, no result."""
    channel = f"<#{operation.channel}>" if _SLACK_ID.match(operation.channel) else "another channel"
    requester = f"<@{operation.requester}>" if _SLACK_ID.match(operation.requester) else "its requester"
    return f"{operation.ref} runs in {channel}; ask there or ask its requester {requester}."


def _cancel_refusal(operation: Operation, verb: str) -> str:
    return f"Only the requester of {operation.ref}, its approvers or a bot admin (`[access] admins`) can {verb} it."


def _foreign_refusal(what: str) -> str:
    return (
        f"{what} was not submitted by this bot; only a bot admin (`[access] admins`) can read, cancel "
        "or stop it. Use the bot's own ref (`S12`) for tasks submitted here."
    )


def _groups(entries: Iterable[str]) -> list[str]:
    """The user-group ids (S…) of a list that mixes user and group ids."""
    return [entry for entry in entries if entry.startswith("S")]


# -- the policy ------------------------------------------------------------------------------------


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
            raise NotAllowedError(_command_channels_refusal(command.lstrip("/"), rule.channels))
        if not await self.user_may(command=command, user=user):
            raise NotAllowedError(_command_user_refusal(command.lstrip("/")))

    async def user_may(self, *, command: str, user: str) -> bool:
        """Whether the rule for ``command`` (if any) lets ``user`` in, wherever they are."""
        rule = self._rules.rule_for(command)
        if rule is None or (not rule.users and not rule.usergroups) or user in rule.users:
            return True
        return await self._in_groups(user, rule.usergroups)

    # -- one operation -------------------------------------------------------------------------

    async def check_read(self, operation: Operation, *, user: str, channel: str) -> None:
        """Raise NotAllowedError (saying where to look) unless ``user`` may read ``operation`` here."""
        if channel == operation.channel or await self._owns(operation, user):
            return
        raise NotAllowedError(_look_elsewhere(operation), markup=True)

    async def check_cancel(self, operation: Operation, *, user: str, verb: str = "cancel") -> None:
        """Raise NotAllowedError unless ``user`` may cancel (or stop) ``operation``, from anywhere."""
        if not await self._owns(operation, user):
            raise NotAllowedError(_cancel_refusal(operation, verb))

    async def check_foreign(self, *, user: str, what: str) -> None:
        """Something on an external system that is no operation of ours: admins only."""
        if not await self.is_admin(user):
            raise NotAllowedError(_foreign_refusal(what))

    async def is_admin(self, user: str) -> bool:
        admins = self._rules.admins
        return user in admins or await self._in_groups(user, _groups(admins))

    async def _owns(self, operation: Operation, user: str) -> bool:
        """The requester, the approvers (listed or members of a listed group, and whoever
        approved it under an "anyone but the requester" rule), and admins."""
        if user == operation.requester or await self.is_admin(user):
            return True
        state = common(operation)
        approvers = state.approval.approvers if state.approval else []
        approved_by = state.approved_by
        return user in approvers or user in approved_by or await self._in_groups(user, _groups(approvers))

    async def _in_groups(self, user: str, groups: Iterable[str]) -> bool:
        for group in groups:
            members = await self._directory.usergroup_members(group)
            if members and user in members:
                return True
        return False
