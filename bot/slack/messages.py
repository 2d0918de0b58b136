"""Messages shared by every command: errors, refusals, approvals, generic help."""

from __future__ import annotations

from bot.errors import ChatOpsError, UpstreamError, UserError
from bot.slack import blocks as bk


def error_text(error: ChatOpsError) -> str:
    """The ephemeral message for an error: what went wrong, then how to use the command."""
    if isinstance(error, UserError):
        text = f":warning: {error.message if error.markup else bk.escape(error.message)}"
        if error.usage:
            text += f"\n\n{bk.escape(error.usage)}"
        return bk.clip(text, bk.MESSAGE_TEXT_MAX)
    if isinstance(error, UpstreamError):
        system = {"salesforce": "Salesforce", "slack": "Slack", "sfp": "The sfp server"}.get(
            error.system, error.system or "An upstream system"
        )
        return f":x: {system} did not accept that: {bk.escape(bk.clip(error.message, 300))}"
    return ":x: Something went wrong on our side; it has been logged."


def unexpected_error_text() -> str:
    return ":x: Something went wrong on our side; it has been logged. Nothing was changed."


def foreign_workspace_text() -> str:
    return ":no_entry: This bot serves only the workspace it is installed in; nothing was done."


def approval_ack(ref: str, outcome: str, approvals: int, needed: int) -> str:
    if outcome == "approved":
        return f"You approved {ref}; it is starting."
    if outcome == "rejected":
        return f"You rejected {ref}."
    return f"Your approval of {ref} is recorded ({approvals}/{needed})."


def approval_thread_text(user: str, outcome: str, reason: str = "") -> str:
    if outcome == "rejected":
        return f"🚫 Rejected by <@{user}>: {bk.escape(reason) or 'no reason given'}"
    if outcome == "approved":
        return f"✅ Approved by <@{user}>. Starting it…"
    return f"👍 <@{user}> approved; more approvals are needed."


def reject_modal(operation_id: int, ref: str) -> dict[str, object]:
    return {
        "type": "modal",
        "callback_id": "reject_reason",
        "private_metadata": str(operation_id),
        "title": {"type": "plain_text", "text": f"Reject {ref}"[:24]},
        "submit": {"type": "plain_text", "text": "Reject"},
        "close": {"type": "plain_text", "text": "Back"},
        "blocks": [
            {
                "type": "input",
                "block_id": "reason",
                "label": {"type": "plain_text", "text": "Reason"},
                "element": {"type": "plain_text_input", "action_id": "reason", "multiline": True, "max_length": 500},
            }
        ],
    }
