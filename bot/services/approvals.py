"""Approval rules (SPEC §8) and recording decisions.

A decision is stored as one row per (operation, person); the operation leaves
``awaiting_approval`` through one compare-and-set UPDATE, so a double click, two approvers at
once or two replicas handling the same click start the operation exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from bot.errors import NotAllowedError, NotFoundError, StateError
from bot.settings import ApprovalRule
from bot.store import repo
from bot.store.db import Database
from bot.store.models import Approval, Operation, OpState

if TYPE_CHECKING:  # access.py needs Directory from here
    from bot.services.access import AccessPolicy

DEFAULT_EXPIRY = timedelta(hours=24)


class Directory(Protocol):
    """Who is in a Slack user group; implemented over the Slack API outside the services."""

    async def usergroup_members(self, group_id: str) -> set[str] | None: ...


@dataclass(frozen=True)
class ApprovalRequirement:
    approvers: tuple[str, ...]  # user ids (U…/W…) and user-group ids (S…); empty = anyone
    count: int
    self_approval: bool
    expires_after: timedelta
    rule: str  # how it was chosen, shown on the card

    def to_data(self, *, now: datetime) -> dict[str, Any]:
        return {
            "approvers": list(self.approvers),
            "count": self.count,
            "self_approval": self.self_approval,
            "rule": self.rule,
            "expires_at": (now + self.expires_after).isoformat(),
        }


@dataclass(frozen=True)
class ApprovalFacts:
    """What rules can match on, for one requested action."""

    action: str  # push | deploy | quick_deploy | validate | sfp | fd_delete | fd_complete …
    org: str | None = None
    org_kinds: frozenset[str] = frozenset()  # kinds of org touched (a push may include several)
    package: str | None = None
    task_type: str | None = None


def _default_requires(facts: ApprovalFacts) -> bool:
    if facts.action in {"deploy", "quick_deploy", "push"}:
        return "production" in facts.org_kinds
    return facts.action in {"fd_delete", "fd_complete"}


def requirement_for(facts: ApprovalFacts, rules: list[ApprovalRule]) -> ApprovalRequirement | None:
    """The approval this action needs, or None.

    Rules for an action replace the default for that action only: configuring an sfp rule must
    not silently switch off approvals for production pushes.
    """
    own_rules = [rule for rule in rules if rule.action == facts.action]
    if not own_rules:
        if not _default_requires(facts):
            return None
        return ApprovalRequirement(
            approvers=(), count=1, self_approval=False, expires_after=DEFAULT_EXPIRY, rule="default policy"
        )
    for index, rule in enumerate(own_rules):
        if rule.org_kind is not None and rule.org_kind not in facts.org_kinds:
            continue
        if rule.org is not None and rule.org != facts.org:
            continue
        if rule.package is not None and rule.package != facts.package:
            continue
        if rule.task_type is not None and rule.task_type != facts.task_type:
            continue
        return ApprovalRequirement(
            approvers=tuple(rule.approvers),
            count=rule.count,
            self_approval=rule.self_approval,
            expires_after=rule.expires_after,
            rule=f"rule #{index + 1} for {rule.action}",
        )
    return None


@dataclass(frozen=True)
class Decision:
    operation: Operation
    outcome: str  # "recorded" (more approvals needed) | "approved" | "rejected"
    approvals: int
    needed: int


class ApprovalService:
    def __init__(self, *, db: Database, directory: Directory, access: AccessPolicy | None = None) -> None:
        self._db = db
        self._directory = directory
        self._access = access

    async def _may_approve(self, operation: Operation, requirement: dict[str, Any], user: str) -> bool:
        approvers: list[str] = requirement.get("approvers") or []
        if not approvers:
            # "Anyone but the requester" still means anyone allowed to run the command: someone
            # barred from /push by [access] must not be able to start a push by approving it.
            return self._access is None or await self._access.user_may(command=operation.kind, user=user)
        if user in approvers:
            return True
        for group in (entry for entry in approvers if entry.startswith("S")):
            members = await self._directory.usergroup_members(group)
            if members and user in members:
                return True
        return False

    async def decide(
        self, *, operation_id: int, user: str, approve: bool, reason: str = "", now: datetime | None = None
    ) -> Decision:
        now = now or datetime.now(UTC)
        operation = await repo.get_operation(self._db, operation_id=operation_id)
        if operation is None:
            raise NotFoundError("That operation no longer exists.")
        requirement = operation.data.get("approval") or {}
        if operation.state != OpState.AWAITING_APPROVAL:
            raise StateError(
                f"{operation.ref} is not waiting for approval any more (it is {operation.state.replace('_', ' ')})."
            )
        if operation.approval_expires_at and _aware(operation.approval_expires_at) <= now:
            raise StateError(f"The approval request for {operation.ref} has expired; request it again.")
        if user == operation.requester and not requirement.get("self_approval", False):
            if approve:
                raise NotAllowedError(f"You requested {operation.ref}, so someone else has to approve it.")
            raise NotAllowedError(f"You requested {operation.ref}; to withdraw it use `cancel {operation.ref}`.")
        if not await self._may_approve(operation, requirement, user):
            raise NotAllowedError(f"You are not an approver for {operation.ref} ({requirement.get('rule', 'policy')}).")
        # Wake the poller first: if this process dies between recording the decision and applying
        # it, the poller applies it (``settle``) on its next cycle instead of leaving it waiting.
        await repo.update_operation(
            self._db, operation_id=operation_id, expect_states=[OpState.AWAITING_APPROVAL], values={"next_poll_at": now}
        )
        recorded = await repo.add_approval(
            self._db,
            approval=Approval(
                operation_id=operation_id,
                approver=user,
                decision="approve" if approve else "reject",
                reason=reason[:500],
            ),
        )
        outcome, approvals, needed = await settle(self._db, operation, now=now)
        if not recorded and outcome not in {"approved", "rejected"}:
            # A double click: the first click's decision stands (and, if that click's process died
            # before applying it, settle() just applied it for them).
            raise StateError(f"You already decided on {operation.ref}.")
        if outcome == "late":
            raise StateError(f"{operation.ref} was decided a moment ago.")
        fresh = await repo.get_operation(self._db, operation_id=operation_id)
        assert fresh is not None
        return Decision(operation=fresh, outcome=outcome, approvals=approvals, needed=needed)


async def settle(db: Database, operation: Operation, *, now: datetime | None = None) -> tuple[str, int, int]:
    """Apply the decisions recorded for an operation waiting for approval.

    Returns (outcome, approvals, needed); outcome is "rejected" (any rejection wins), "approved"
    (enough approvals), "recorded" (more are needed) or "late" (someone else applied it first).
    Safe to call from any replica at any time: leaving ``awaiting_approval`` is one compare-and-set.
    """
    assert operation.id is not None
    now = now or datetime.now(UTC)
    decisions = await repo.approvals_for(db, operation_id=operation.id)
    approvers = [d.approver for d in decisions if d.decision == "approve"]
    needed = int((operation.data.get("approval") or {}).get("count", 1))
    rejection = next((d for d in decisions if d.decision == "reject"), None)
    if rejection is not None:
        state: str = OpState.REJECTED
        data = {**operation.data, "rejected_by": rejection.approver, "reject_reason": rejection.reason}
    elif len(approvers) >= needed:
        state, data = OpState.STARTING, {**operation.data, "approved_by": approvers}
    else:
        return "recorded", len(approvers), needed
    changed = await repo.update_operation(
        db,
        operation_id=operation.id,
        expect_states=[OpState.AWAITING_APPROVAL],
        values={"state": state, "next_poll_at": now, "data": data},
    )
    if not changed:
        return "late", len(approvers), needed
    return ("rejected" if state == OpState.REJECTED else "approved"), len(approvers), needed


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
