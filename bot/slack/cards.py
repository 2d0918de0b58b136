"""Pieces every status card shares: state labels and the approval section with its buttons.

Approve/Reject use the action ids ``op_approve``/``op_reject`` with the operation id as value,
for every kind of operation; handlers/approvals.py answers them.
"""

from __future__ import annotations

from collections.abc import Sequence

from bot.core.payloads import ApprovalState, common
from bot.core.when import slack_date
from bot.slack import blocks as bk
from bot.slack.blocks import Block
from bot.store.models import Operation, OpState

STATE_LABEL = {
    OpState.AWAITING_APPROVAL: "⏸️ Waiting for approval",
    OpState.REJECTED: "🚫 Rejected",
    OpState.EXPIRED: "⌛ Approval expired",
    OpState.STARTING: "⚙️ Creating in Salesforce",
    OpState.SCHEDULED: "🗓️ Scheduled",
    OpState.RUNNING: "🚀 Running",
    OpState.CANCELING: "✋ Canceling",
    OpState.SUCCEEDED: "✅ Succeeded",
    OpState.FAILED: "⚠️ Finished with failures",
    OpState.CANCELED: "✋ Canceled",
    OpState.ERROR: "❗ Could not run",
}


def waiver_text(requirement: ApprovalState | None) -> str | None:
    """The line that says an approval rule lowered the built-in minimum, and why (SPEC §13)."""
    if requirement is None or not requirement.waiver:
        return None
    lowered = "no approval needed" if requirement.count == 0 else "the requester may approve"
    return f"⚠️ Waiver ({requirement.rule}): {lowered}, because {bk.escape(requirement.waiver)}"


def waiver_blocks(op: Operation) -> list[Block]:
    text = waiver_text(common(op).approval)
    return [bk.context(text)] if text else []


def approval_blocks(op: Operation, approvals: Sequence[str], *, extra: Sequence[Block] = ()) -> list[Block]:
    """What the card shows while waiting: who may approve, who did, until when; Approve/Reject."""
    requirement = common(op).approval or ApprovalState()
    who = ", ".join(f"<!subteam^{a}>" if a.startswith("S") else f"<@{a}>" for a in requirement.approvers) or "anyone"
    count = requirement.count
    text = (
        f"Needs {count} approval{'s' if count > 1 else ''} from {who}"
        + ("" if requirement.self_approval else f" other than <@{op.requester}>")
        + f" ({requirement.rule})."
    )
    if approvals:
        text += "\nApproved so far: " + ", ".join(f"<@{user}>" for user in approvals)
    if op.approval_expires_at:
        text += f"\nExpires {slack_date(op.approval_expires_at)}."
    value = str(op.id)
    return [
        bk.section(text),
        bk.actions(
            [
                bk.button("Approve", action_id="op_approve", value=value, style="primary"),
                bk.button("Reject", action_id="op_reject", value=value, style="danger"),
                *extra,
            ],
            block_id=f"approval:{op.id}",
        ),
    ]
