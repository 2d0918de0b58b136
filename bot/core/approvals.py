"""Approval rules (SPEC §8) and recording decisions.

A decision is stored as one row per (operation, person); the operation leaves
``awaiting_approval`` through one compare-and-set UPDATE, so a double click, two approvers at
once or two replicas handling the same click start the operation exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from bot.core.access import AccessPolicy
from bot.core.directory import Directory
from bot.core.payloads import ApprovalState, common, with_common
from bot.core.when import aware
from bot.errors import NotAllowedError, NotFoundError, StateError
from bot.settings import ApprovalRule
from bot.store import repo
from bot.store.db import Database
from bot.store.models import Approval, Operation, OpState

DEFAULT_EXPIRY = timedelta(hours=24)


@dataclass(frozen=True)
class ApprovalRequirement:
    approvers: tuple[str, ...]  # user ids (U…/W…) and user-group ids (S…); empty = anyone
    count: int  # 0 only under an explicit waiver: the operation starts without approval
    self_approval: bool
    expires_after: timedelta
    rule: str  # how it was chosen, shown on the card
    waiver: str | None = None  # why a rule lowers the built-in minimum; shown on the card, audited
    # People who may not approve although they did not request it, with why (e.g. the requester
    # of the validation a quick deploy would deploy: four eyes on the change, not on the click).
    excluded: tuple[tuple[str, str], ...] = ()

    @property
    def needed(self) -> bool:
        return self.count > 0

    def to_state(self, *, now: datetime) -> ApprovalState:
        return ApprovalState(
            approvers=list(self.approvers),
            count=self.count,
            self_approval=self.self_approval,
            rule=self.rule,
            expires_at=(now + self.expires_after).isoformat(),
            waiver=self.waiver or None,
            excluded=dict(self.excluded),
        )

    def to_data(self, *, now: datetime) -> dict[str, Any]:
        """The stored form (``data.approval``) of ``to_state``."""
        return self.to_state(now=now).dump()


@dataclass(frozen=True)
class ApprovalFacts:
    """What rules can match on, for one requested action."""

    action: str  # push | deploy | quick_deploy | validate | sfp | fd_delete | fd_complete …
    org: str | None = None
    org_kinds: frozenset[str] = frozenset()  # kinds of org touched (a push may include several)
    package: str | None = None
    task_type: str | None = None


def minimum_applies(facts: ApprovalFacts) -> bool:
    """The built-in minimum: one approval by someone other than the requester, whatever the rules."""
    if facts.action in {"deploy", "quick_deploy", "push"}:
        return "production" in facts.org_kinds
    return facts.action in {"fd_delete", "fd_complete"}


def _matches(rule: ApprovalRule, facts: ApprovalFacts) -> bool:
    return (
        rule.action == facts.action
        and (rule.org_kind is None or rule.org_kind in facts.org_kinds)
        and (rule.org is None or rule.org == facts.org)
        and (rule.package is None or rule.package == facts.package)
        and (rule.task_type is None or rule.task_type == facts.task_type)
    )


def _from_rule(rule: ApprovalRule, number: int) -> ApprovalRequirement:
    return ApprovalRequirement(
        approvers=tuple(rule.approvers),
        count=rule.count,
        self_approval=rule.self_approval,
        expires_after=rule.expires_after,
        rule=f"rule #{number} for {rule.action}",
        waiver=rule.waiver,
    )


def requirement_for(facts: ApprovalFacts, rules: list[ApprovalRule]) -> ApprovalRequirement | None:
    """The approval this action needs, or None when it needs none.

    Fails closed. Where the built-in minimum applies, the first matching rule that keeps it (at
    least one approval, not by the requester) decides, among rules without an ``org_kind`` or with
    ``org_kind = "production"``; a rule that lowers it (``count = 0`` or
    ``self_approval``, each only with a ``waiver``) decides only when no matching rule keeps it;
    no matching rule at all means the minimum itself, never "no approval". Elsewhere the first
    matching rule decides, and no rule means no approval. Quick deploys with no approvers of
    their own are approved by the org's deploy approvers.
    """
    matching = [(number, rule) for number, rule in enumerate(rules, start=1) if _matches(rule, facts)]
    requirement: ApprovalRequirement | None = None
    if minimum_applies(facts):
        # A push to production and sandbox orgs also matches org_kind = "sandbox", but a rule
        # written for sandboxes must not decide who approves the production part.
        matching = [(n, rule) for n, rule in matching if rule.org_kind in (None, "production")]
        keeping = [(n, rule) for n, rule in matching if rule.count >= 1 and not rule.self_approval]
        waived = [(n, rule) for n, rule in matching if rule.waiver is not None]
        if keeping:
            requirement = _from_rule(keeping[0][1], keeping[0][0])
        elif waived:
            requirement = _from_rule(waived[0][1], waived[0][0])
        else:
            requirement = ApprovalRequirement(
                approvers=(), count=1, self_approval=False, expires_after=DEFAULT_EXPIRY, rule="built-in minimum"
            )
    elif matching:
        requirement = _from_rule(matching[0][1], matching[0][0])
    if requirement is None:
        return None
    if facts.action == "quick_deploy" and requirement.needed and not requirement.approvers:
        deploy = requirement_for(replace(facts, action="deploy"), rules)
        if deploy is not None and deploy.approvers:
            requirement = replace(requirement, approvers=deploy.approvers, rule=f"{requirement.rule}, deploy approvers")
    return requirement


def production_approvers_missing(facts: ApprovalFacts, requirement: ApprovalRequirement | None) -> str | None:
    """Why a production action cannot be requested yet: nobody is named to approve it.

    "Anyone but the requester" is not enough for production (SPEC §13): the answer names the
    setting to add. None when the request may go ahead.
    """
    if facts.action not in {"deploy", "quick_deploy", "push"} or "production" not in facts.org_kinds:
        return None
    if requirement is None or not requirement.needed or requirement.approvers:
        return None
    action = "deploy" if facts.action == "quick_deploy" else facts.action
    what = {"push": "push upgrades that include production orgs"}.get(
        facts.action, f"{facts.action.replace('_', ' ')}s to production"
    )
    return (
        f"Nobody is configured to approve {what}, so this request is refused. "
        f'Ask an admin to add approvers = ["U…"] to an [[approval]] rule with action = "{action}", '
        'org_kind = "production" in the bot\'s configuration.'
    )


async def audit_waiver(
    db: Database, *, actor: str, channel: str, operation_ref: str, approval: ApprovalState | None
) -> None:
    """A rule that lowered the built-in minimum leaves its own audit row when the operation is
    requested, so that an export shows every operation that ran under a waiver, and why."""
    if approval is None or not approval.waiver:
        return
    lowered = "no approval" if approval.count == 0 else "self-approval allowed"
    await repo.audit(
        db,
        actor=actor,
        channel=channel,
        operation_ref=operation_ref,
        action="approval.waived",
        detail=f"{approval.rule}: {approval.waiver}"[:500],
        outcome=lowered,
    )


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

    async def _may_approve(self, operation: Operation, requirement: ApprovalState, user: str) -> bool:
        approvers = requirement.approvers
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
        requirement = common(operation).approval or ApprovalState()
        if operation.state != OpState.AWAITING_APPROVAL:
            raise StateError(
                f"{operation.ref} is not waiting for approval any more (it is {operation.state.replace('_', ' ')})."
            )
        if operation.approval_expires_at and aware(operation.approval_expires_at) <= now:
            raise StateError(f"The approval request for {operation.ref} has expired; request it again.")
        if user == operation.requester and not requirement.self_approval:
            if approve:
                raise NotAllowedError(f"You requested {operation.ref}, so someone else has to approve it.")
            raise NotAllowedError(f"You requested {operation.ref}; to withdraw it use `cancel {operation.ref}`.")
        if user in requirement.excluded and not requirement.self_approval:
            raise NotAllowedError(f"You {requirement.excluded[user]}, so someone else has to approve {operation.ref}.")
        if not await self._may_approve(operation, requirement, user):
            raise NotAllowedError(f"You are not an approver for {operation.ref} ({requirement.rule}).")
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
    needed = (common(operation).approval or ApprovalState()).count
    rejection = next((d for d in decisions if d.decision == "reject"), None)
    if rejection is not None:
        state: str = OpState.REJECTED
        data = with_common(operation, rejected_by=rejection.approver, reject_reason=rejection.reason)
    elif len(approvers) >= needed:
        state, data = OpState.STARTING, with_common(operation, approved_by=approvers)
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
