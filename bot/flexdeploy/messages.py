"""Everything a person reads about FlexDeploy packages: packages, changes, request cards.

Pure functions from plain data to text and Block Kit; no I/O. Package names, descriptions,
paths and server messages come from users or FlexDeploy, so they all go through ``escape``.
"""

from __future__ import annotations

from collections.abc import Sequence

from bot.clients.flexdeploy import Package
from bot.core.operations import OpEvent
from bot.core.when import slack_date
from bot.flexdeploy.commands import FD_USAGE
from bot.flexdeploy.payloads import FdData, FdParams, PackageSummary
from bot.flexdeploy.plan import LONG_LIST
from bot.flexdeploy.service import Outcome
from bot.slack import blocks as bk
from bot.slack.blocks import Block
from bot.slack.cards import STATE_LABEL, approval_blocks, waiver_blocks
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


# -- changes made without approval -----------------------------------------------------------------


def applied_headline(op: Operation) -> str:
    """What changed, in one line naming who asked: a change made without approval is news for the team."""
    params, data = FdParams.read(op.params), FdData.read(op.data)
    user, before, after = op.requester, data.before, data.after
    where = f"{_name(params.package)} in FlexDeploy project {params.project_id}"
    if params.action == "create" and after is not None:
        return f"🆕 <@{user}> created {where} ({after.package_type}, {after.files:,} file(s))."
    if params.action == "add" and after is not None and before is not None:
        text = f"➕ <@{user}> added {after.files - before.files:,} file(s) to {where}; it now has {after.files:,}."
        return text + _changed_text(before, after)
    if params.action == "replace" and after is not None and before is not None:
        text = f"♻️ <@{user}> replaced the files of {where}: {before.files:,} → {after.files:,} file(s)."
        return text + _changed_text(before, after)
    if params.action in {"status", "complete"} and after is not None:
        was = f" (was {before.package_status})" if before else ""
        return f"🔁 <@{user}> set {where} to {_status(after.package_status)}{was}."
    if params.action == "delete":
        return f"🗑️ <@{user}> deleted {where}."
    return f"<@{user}>: {bk.escape(op.summary)} done."


def _changed_text(before: PackageSummary, after: PackageSummary) -> str:
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
    changed = [label for attr, label in names.items() if getattr(before, attr) != getattr(after, attr)]
    return f" Changed: {', '.join(changed)}." if changed else ""


def applied_blocks(op: Operation) -> list[Block]:
    """The card of a change made without approval, once made: what changed, and the package now."""
    data = FdData.read(op.data)
    blocks: list[Block] = [bk.section(applied_headline(op))]
    blocks.extend(waiver_blocks(op))
    after = data.after_package()
    if after is not None:
        blocks.extend(package_blocks(after, project_id=FdParams.read(op.params).project_id))
    blocks.append(bk.context(f"`{op.ref}` · ✅ Done: {bk.escape(op.summary)}."))
    return bk.limit_blocks(blocks)


def submitted_ack(outcome: Outcome) -> str:
    """The requester's answer: the change is on its way, waits for approval, or needs nothing."""
    change, op = outcome.change, outcome.operation
    if op is None:
        text = (
            f"{_name(change.package)} is not in FlexDeploy project {change.project_id} (any more); nothing to delete."
        )
    elif not outcome.created:
        return f"That request was already received as {op.ref}."
    elif op.state == OpState.AWAITING_APPROVAL:
        text = (
            f"{op.ref} ({bk.escape(op.summary)}) is waiting for approval; the card is in the channel. "
            f"`/fd cancel {op.ref}` withdraws it."
        )
    else:
        text = (
            f"{op.ref} ({bk.escape(op.summary)}) is being sent to FlexDeploy; it is posted in the channel for the team."
        )
    return _with_notes(text, outcome.notes)


def _with_notes(text: str, notes: Sequence[str]) -> str:
    return bk.clip("\n".join([text, *(f"• {bk.escape(note)}" for note in notes)]), bk.MESSAGE_TEXT_MAX)


# -- operations waiting for approval ----------------------------------------------------------------


def _before_text(summary: PackageSummary | None) -> str:
    if summary is None:
        return "not in FlexDeploy"
    kind, status = bk.escape(summary.package_type), _status(summary.package_status)
    return f"{kind} · {status} · {summary.files} file(s)"


def fd_card(op: Operation, *, approvals: Sequence[str] = ()) -> tuple[str, list[Block]]:
    """The one status message of a FlexDeploy request, edited in place."""
    params, data = FdParams.read(op.params), FdData.read(op.data)
    state = OpState(op.state)
    title = f"FlexDeploy {op.ref} · {ACTION_TITLE.get(params.action, params.action)} {params.package}"  # plain text
    # The header is plain text; the message ``text`` is mrkdwn, so the title is escaped there.
    text = bk.clip(f"{bk.escape(title)}: {FD_STATE_LABEL[state]}", bk.MESSAGE_TEXT_MAX)
    if state == OpState.SUCCEEDED and not data.waited_for_approval:
        # Made at once: the card becomes the news for the team that the change used to be posted as.
        return bk.clip(applied_headline(op), bk.MESSAGE_TEXT_MAX), applied_blocks(op)
    fields = [
        f"*Status*\n{FD_STATE_LABEL[state]}",
        f"*Package*\n{_name(params.package)}",
        f"*Project*\n{params.project_id}",
        f"*Requested by*\n<@{op.requester}>",
        f"*Before*\n{_before_text(data.before)}",
        f"*Requested*\n{slack_date(op.created_at)}",
    ]
    if data.after is not None and state == OpState.SUCCEEDED:
        fields.append(f"*Now*\n{_before_text(data.after)}")
    blocks: list[Block] = [bk.header(title), bk.fields_section(fields)]
    if params.action in WHAT_IT_MEANS and not op.is_terminal:
        blocks.append(bk.context(WHAT_IT_MEANS[params.action]))
    blocks.extend(waiver_blocks(op))
    if state == OpState.AWAITING_APPROVAL:
        blocks.extend(approval_blocks(op, approvals, extra=[_cancel_button(op)]))
    if state == OpState.SUCCEEDED:
        blocks.append(bk.section(_done_text(op)))
    if state == OpState.REJECTED:
        reason = bk.escape(data.reject_reason or "no reason given")
        blocks.append(bk.section(f"Rejected by <@{data.rejected_by}>: {reason}. Nothing was changed."))
    if state == OpState.CANCELED and data.canceled_by:
        blocks.append(bk.section(f"Withdrawn by <@{data.canceled_by}>. Nothing was changed."))
    if state in {OpState.FAILED, OpState.ERROR} and data.error:
        blocks.append(bk.section(f"❗ {bk.escape(data.error)}"))
    if data.last_problem and not op.is_terminal:
        blocks.append(bk.context(f"⚠️ FlexDeploy trouble, retrying automatically: {bk.escape(data.last_problem)}"))
    context = [f"`{op.ref}`"]
    if data.approved_by:
        context.append("approved by " + ", ".join(f"<@{user}>" for user in data.approved_by))
    blocks.append(bk.context(" · ".join(context)))
    return text, bk.limit_blocks(blocks)


def _cancel_button(op: Operation) -> Block:
    return bk.button(
        "Cancel",
        action_id="fd_cancel",
        value=str(op.id),
        confirm=("Withdraw this request?", f"Withdraw {op.ref}? Nothing will be changed in FlexDeploy.", "Withdraw"),
    )


def _done_text(op: Operation) -> str:
    params = FdParams.read(op.params)
    name, project = _name(params.package), params.project_id
    if params.action == "delete":
        return f"🗑️ {name} is deleted from FlexDeploy project {project}."
    if params.action == "complete":
        return f"🏁 {name} is COMPLETED in project {project}; it can no longer be modified."
    return f"✅ Done: {bk.escape(op.summary)}."


def event_reply(op: Operation, event: OpEvent) -> str | None:
    if event.name == "expired":
        return "⌛ Nobody approved in time; the request expired and nothing was changed in FlexDeploy."
    if event.name == "error":
        return f"❗ {bk.escape(FdData.read(op.data).error or 'FlexDeploy did not make the change.')}"
    return None  # success is announced by the completion notice


def completion_text(op: Operation) -> str:
    state, data = OpState(op.state), FdData.read(op.data)
    base = f"{FD_STATE_LABEL[state]}: FlexDeploy {op.ref} — {bk.escape(op.summary)}"
    if state == OpState.SUCCEEDED:
        return f"{base}\n{_done_text(op)}"
    if state == OpState.REJECTED:
        reason = bk.escape(data.reject_reason or "no reason")
        return f"{base} (rejected by <@{data.rejected_by}>: {reason}); nothing was changed."
    if state == OpState.CANCELED:
        who = data.canceled_by
        return base + (f" (withdrawn by <@{who}>)" if who else "") + "; nothing was changed."
    if state == OpState.EXPIRED:
        return f"{base}; nobody approved in time, nothing was changed."
    if state in {OpState.FAILED, OpState.ERROR}:
        return f"{base}\n{bk.escape(data.error or '')}"
    return base
