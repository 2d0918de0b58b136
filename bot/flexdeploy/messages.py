"""Everything a person reads about FlexDeploy packages: packages, changes, request cards.

Pure functions from plain data to text and Block Kit; no I/O. Package names, descriptions,
paths and server messages come from users or FlexDeploy, so they all go through ``escape``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bot.clients.flexdeploy import Package
from bot.core.operations import OpEvent
from bot.core.payloads import ApprovalState
from bot.core.when import slack_date
from bot.flexdeploy.commands import FD_USAGE
from bot.flexdeploy.service import LONG_LIST, Applied, Pending
from bot.slack import blocks as bk
from bot.slack.blocks import Block
from bot.slack.cards import STATE_LABEL, approval_blocks, waiver_blocks, waiver_text
from bot.store.models import Operation, OpState

SHOWN_WHEN_LONG = 15  # files listed in the message when the full list goes into a file
STATUS_ICON = {"ACTIVE": "🟢", "INACTIVE": "⚪", "COMPLETED": "🏁"}
TYPE_LABEL = {"USER_MANAGED": "User managed", "DYNAMIC": "Dynamic (include/exclude)"}
FD_STATE_LABEL = {
    **STATE_LABEL,
    OpState.STARTING: "⚙️ Sending to FlexDeploy",
    OpState.FAILED: "❌ Failed",
}
ACTION_TITLE = {
    "delete": "Delete",
    "complete": "Complete",
    "status": "Set status of",
    "create": "Create",
    "add": "Add files to",
    "replace": "Replace files of",
}
WHAT_IT_MEANS = {
    "delete": "Deleting removes the package definition from FlexDeploy; builds made from it stay.",
    "complete": "A COMPLETED package can never be modified again and cannot be added to a release.",
}


def help_text() -> str:
    return bk.escape(FD_USAGE)


def _name(name: str) -> str:
    return f"`{bk.escape(name)}`"


def _status(status: str) -> str:
    return f"{STATUS_ICON.get(status, '•')} {bk.escape(status)}"


def status_note(status: str) -> str | None:
    if status == "COMPLETED":
        return "COMPLETED: FlexDeploy does not allow it to be modified any more."
    if status == "INACTIVE":
        return "INACTIVE: only ACTIVE packages can be added to a release."
    return None


def is_long(package: Package) -> bool:
    return len(package.files) > LONG_LIST


def package_blocks(package: Package, *, project_id: int) -> list[Block]:
    """Type, status, attributes, and the files in sequence order with their object types."""
    fields = [
        f"*Project*\n{project_id}",
        f"*Type*\n{TYPE_LABEL.get(package.package_type, bk.escape(package.package_type))}",
        f"*Status*\n{_status(package.package_status)}",
        f"*Files*\n{len(package.files):,}",
    ]
    if package.description:
        fields.append(f"*Description*\n{bk.escape(package.description)}")
    if package.package_type == "DYNAMIC":
        fields.append(f"*Include*\n`{bk.escape(package.include_path or '—')}`")
        fields.append(f"*Exclude*\n`{bk.escape(package.exclude_path or '—')}`")
    if package.test_level:
        fields.append(f"*Test level*\n{bk.escape(package.test_level)}")
    if package.tests:
        fields.append(f"*Tests*\n{bk.escape(package.tests.replace(',', ', '))}")
    if package.version_syntax:
        fields.append(f"*Version syntax*\n`{bk.escape(package.version_syntax)}`")
    blocks: list[Block] = [bk.header(f"📦 {package.name}"), bk.fields_section(fields)]
    files = list(package.files)
    if not files:
        empty = "No files match its include expression yet." if package.package_type == "DYNAMIC" else "No files yet."
        blocks.append(bk.context(empty))
    else:
        shown = files[:SHOWN_WHEN_LONG] if is_long(package) else files
        lines = [
            f"`{file.sequence_number if file.sequence_number is not None else '–'}` "
            f"{bk.escape(file.file_path)} · _{bk.escape(file.object_type or 'unknown type')}_"
            for file in shown
        ]
        title = "*Files in sequence order*" + (
            f" (first {len(shown)} of {len(files):,}; the full list is in the attached file)"
            if is_long(package)
            else ""
        )
        blocks.extend(_chunked([title, *lines]))
    note = status_note(package.package_status)
    if note:
        blocks.append(bk.context(note))
    return bk.limit_blocks(blocks)


def _chunked(lines: list[str], *, limit: int = bk.SECTION_TEXT_MAX - 100) -> list[Block]:
    """Sections of whole lines, each inside Slack's 3,000-character limit."""
    sections: list[Block] = []
    current: list[str] = []
    size = 0
    for line in lines:
        line = bk.clip(line, limit)
        if current and size + len(line) + 1 > limit:
            sections.append(bk.section("\n".join(current)))
            current, size = [], 0
        current.append(line)
        size += len(line) + 1
    if current:
        sections.append(bk.section("\n".join(current)))
    return sections


def show_message(package: Package, *, project_id: int) -> tuple[str, list[Block]]:
    # ``text`` is mrkdwn too (notifications, screen readers): names are escaped there as in the blocks.
    text = (
        f"{bk.escape(package.name)} (FlexDeploy project {project_id}): {bk.escape(package.package_status)}, "
        f"{len(package.files)} files"
    )
    return bk.clip(text, bk.MESSAGE_TEXT_MAX), package_blocks(package, project_id=project_id)


def file_comment(package: Package, *, project_id: int, user: str) -> str:
    return f"All {len(package.files):,} files of {_name(package.name)} (project {project_id}), for <@{user}>."


# -- changes made at once ---------------------------------------------------------------------------


def applied_headline(applied: Applied, *, user: str) -> str:
    change, before, after = applied.change, applied.change.before, applied.after
    where = f"{_name(change.package)} in FlexDeploy project {change.project_id}"
    if change.action == "create" and after is not None:
        return f"🆕 <@{user}> created {where} ({after.package_type}, {len(after.files):,} file(s))."
    if change.action == "add" and after is not None and before is not None:
        added = len(after.files) - len(before.files)
        text = f"➕ <@{user}> added {added:,} file(s) to {where}; it now has {len(after.files):,}."
        changed = _changed_attributes(before, after)
        if changed:
            text += f" Changed: {', '.join(changed)}."
        return text
    if change.action == "replace" and after is not None and before is not None:
        text = f"♻️ <@{user}> replaced the files of {where}: {len(before.files):,} → {len(after.files):,} file(s)."
        changed = _changed_attributes(before, after)
        if changed:
            text += f" Changed: {', '.join(changed)}."
        return text
    if change.action in {"status", "complete"} and after is not None:
        was = f" (was {before.package_status})" if before else ""
        return f"🔁 <@{user}> set {where} to {_status(after.package_status)}{was}."
    if change.action == "delete":
        return f"🗑️ <@{user}> deleted {where}."
    return f"<@{user}>: {bk.escape(change.describe())} done."


def _changed_attributes(before: Package, after: Package) -> list[str]:
    names = {
        "description": "description",
        "package_type": "type",
        "package_status": "status",
        "include_path": "include",
        "exclude_path": "exclude",
        "tests": "tests",
        "test_level": "test level",
        "version_syntax": "version syntax",
    }
    return [label for attr, label in names.items() if getattr(before, attr) != getattr(after, attr)]


def applied_message(applied: Applied, *, user: str) -> tuple[str, list[Block]]:
    """Posted in the channel: a change to a shared release artefact is news for the whole team."""
    headline = applied_headline(applied, user=user)
    blocks: list[Block] = [bk.section(headline)]
    waiver = waiver_text(ApprovalState.read(applied.waiver) if applied.waiver else None)
    if waiver:
        blocks.append(bk.context(waiver))
    if applied.after is not None:
        blocks.extend(package_blocks(applied.after, project_id=applied.change.project_id))
    return bk.clip(headline, bk.MESSAGE_TEXT_MAX), bk.limit_blocks(blocks)


def applied_ack(applied: Applied, *, notes: Sequence[str] = ()) -> str:
    change = applied.change
    if applied.absent:
        text = (
            f"{_name(change.package)} is not in FlexDeploy project {change.project_id} (any more); nothing to delete."
        )
    else:
        text = f"Done: {bk.escape(change.describe())}. It is posted in the channel for the team."
    return _with_notes(text, notes)


def pending_ack(pending: Pending, *, notes: Sequence[str] = ()) -> str:
    op = pending.operation
    if not pending.created:
        return f"That request was already received as {op.ref}."
    return _with_notes(
        f"{op.ref} ({bk.escape(op.summary)}) is waiting for approval; the card is in the channel. "
        f"`/fd cancel {op.ref}` withdraws it.",
        notes,
    )


def _with_notes(text: str, notes: Sequence[str]) -> str:
    return bk.clip("\n".join([text, *(f"• {bk.escape(note)}" for note in notes)]), bk.MESSAGE_TEXT_MAX)


# -- operations waiting for approval ----------------------------------------------------------------


def _before_text(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "not in FlexDeploy"
    kind, status = bk.escape(str(summary.get("type"))), _status(str(summary.get("status")))
    return f"{kind} · {status} · {summary.get('files')} file(s)"


def fd_card(op: Operation, *, approvals: Sequence[str] = ()) -> tuple[str, list[Block]]:
    """The one status message of a FlexDeploy request, edited in place."""
    params, data = op.params, op.data
    state = OpState(op.state)
    action = str(params.get("action"))
    title = f"FlexDeploy {op.ref} · {ACTION_TITLE.get(action, action)} {params.get('package')}"  # plain text
    fields = [
        f"*Status*\n{FD_STATE_LABEL[state]}",
        f"*Package*\n{_name(str(params.get('package')))}",
        f"*Project*\n{params.get('project_id')}",
        f"*Requested by*\n<@{op.requester}>",
        f"*Before*\n{_before_text(data.get('before'))}",
        f"*Requested*\n{slack_date(op.created_at)}",
    ]
    after = data.get("after")
    if after and state == OpState.SUCCEEDED:
        fields.append(f"*Now*\n{_before_text(after)}")
    blocks: list[Block] = [bk.header(title), bk.fields_section(fields)]
    if action in WHAT_IT_MEANS and not op.is_terminal:
        blocks.append(bk.context(WHAT_IT_MEANS[action]))
    blocks.extend(waiver_blocks(op))
    if state == OpState.AWAITING_APPROVAL:
        blocks.extend(approval_blocks(op, approvals, extra=[_cancel_button(op)]))
    if state == OpState.SUCCEEDED:
        blocks.append(bk.section(_done_text(op)))
    if state == OpState.REJECTED:
        reason = bk.escape(data.get("reject_reason") or "no reason given")
        blocks.append(bk.section(f"Rejected by <@{data.get('rejected_by')}>: {reason}. Nothing was changed."))
    if state == OpState.CANCELED and data.get("canceled_by"):
        blocks.append(bk.section(f"Withdrawn by <@{data['canceled_by']}>. Nothing was changed."))
    if state in {OpState.FAILED, OpState.ERROR} and data.get("error"):
        blocks.append(bk.section(f"❗ {bk.escape(data['error'])}"))
    if data.get("last_problem") and not op.is_terminal:
        blocks.append(bk.context(f"⚠️ FlexDeploy trouble, retrying automatically: {bk.escape(data['last_problem'])}"))
    context = [f"`{op.ref}`"]
    if data.get("approved_by"):
        context.append("approved by " + ", ".join(f"<@{user}>" for user in data["approved_by"]))
    blocks.append(bk.context(" · ".join(context)))
    # The header is plain text; the message ``text`` is mrkdwn, so the title is escaped there.
    text = f"{bk.escape(title)}: {FD_STATE_LABEL[state]}"
    return bk.clip(text, bk.MESSAGE_TEXT_MAX), bk.limit_blocks(blocks)


def _cancel_button(op: Operation) -> Block:
    return bk.button(
        "Cancel",
        action_id="fd_cancel",
        value=str(op.id),
        confirm=("Withdraw this request?", f"Withdraw {op.ref}? Nothing will be changed in FlexDeploy.", "Withdraw"),
    )


def _done_text(op: Operation) -> str:
    action = str(op.params.get("action"))
    name = _name(str(op.params.get("package")))
    project = op.params.get("project_id")
    if action == "delete":
        return f"🗑️ {name} is deleted from FlexDeploy project {project}."
    if action == "complete":
        return f"🏁 {name} is COMPLETED in project {project}; it can no longer be modified."
    return f"✅ Done: {bk.escape(op.summary)}."


def event_reply(op: Operation, event: OpEvent) -> str | None:
    if event.name == "expired":
        return "⌛ Nobody approved in time; the request expired and nothing was changed in FlexDeploy."
    if event.name == "error":
        return f"❗ {bk.escape(op.data.get('error', 'FlexDeploy did not make the change.'))}"
    return None  # success is announced by the completion notice


def completion_text(op: Operation) -> str:
    state = OpState(op.state)
    base = f"{FD_STATE_LABEL[state]}: FlexDeploy {op.ref} — {bk.escape(op.summary)}"
    if state == OpState.SUCCEEDED:
        return f"{base}\n{_done_text(op)}"
    if state == OpState.REJECTED:
        reason = bk.escape(op.data.get("reject_reason") or "no reason")
        return f"{base} (rejected by <@{op.data.get('rejected_by')}>: {reason}); nothing was changed."
    if state == OpState.CANCELED:
        who = op.data.get("canceled_by")
        return base + (f" (withdrawn by <@{who}>)" if who else "") + "; nothing was changed."
    if state == OpState.EXPIRED:
        return f"{base}; nobody approved in time, nothing was changed."
    if state in {OpState.FAILED, OpState.ERROR}:
        return f"{base}\n{bk.escape(op.data.get('error', ''))}"
    return base
