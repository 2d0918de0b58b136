"""Everything a person reads about pushes: the status card, thread replies, plans, lists.

Pure functions from plain data to ``(text, blocks)``; no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bot.core.operations import OpEvent
from bot.core.when import slack_date
from bot.push.payloads import JobStatusCounts, PushData, PushParams, PushSummary
from bot.push.plans import PushPlan, RetryPlan
from bot.slack import blocks as bk
from bot.slack.blocks import Block
from bot.slack.cards import STATE_LABEL, approval_blocks, waiver_blocks
from bot.store.models import Operation, OpState

MAX_LISTED_REFUSALS = 20


def _n(value: Any) -> str:
    return f"{int(value or 0):,}"


def push_card(op: Operation, *, approvals: Sequence[str] = ()) -> tuple[str, list[Block]]:
    """The one status message of a push, edited in place as it progresses."""
    params, data = PushParams.read(op.params), PushData.of(op)
    state = OpState(op.state)
    title = f"Push {op.ref} · {params.package} {params.version}"  # header: plain text
    fields = [
        f"*Status*\n{STATE_LABEL[state]}",
        f"*Orgs*\n{_n(data.plan.total)} ({params.orgs})",
        f"*Requested by*\n<@{op.requester}>",
    ]
    if op.scheduled_for:
        fields.append(f"*Starts*\n{slack_date(op.scheduled_for)}")
    else:
        fields.append(f"*Requested*\n{slack_date(op.created_at)}")
    if params.retry_of:
        fields.append(f"*Retry of*\n{params.retry_of}")
    blocks: list[Block] = [bk.header(title), bk.fields_section(fields)]

    if data.summary:
        blocks.append(bk.section(_summary_text(data.summary)))
    elif data.counts:
        blocks.append(bk.section(_progress_text(data.counts)))
    if data.jobs and data.jobs.refused:
        blocks.append(
            bk.context(f"Salesforce refused {_n(data.jobs.refused)} org(s) when creating jobs — see the thread.")
        )

    blocks.extend(waiver_blocks(op))
    if state == OpState.AWAITING_APPROVAL:
        blocks.extend(approval_blocks(op, approvals, extra=[_cancel_button(op)]))
    elif state == OpState.SCHEDULED:
        blocks.append(bk.actions([_cancel_button(op)], block_id=f"push:{op.id}"))
    if state == OpState.REJECTED:
        reason = bk.escape(data.reject_reason or "no reason given")
        blocks.append(bk.section(f"Rejected by <@{data.rejected_by}>: {reason}"))
    if state == OpState.CANCELED and data.canceled_by:
        blocks.append(bk.section(f"Canceled by <@{data.canceled_by}>."))
    if state == OpState.ERROR and data.error:
        blocks.append(bk.section(f"❗ {bk.escape(data.error)}"))
    if data.last_problem and data.transient_failures >= 3 and not op.is_terminal:
        # One failed call is retried quietly; say something only when it keeps failing.
        blocks.append(bk.context(f"⚠️ Salesforce trouble, retrying automatically: {bk.escape(data.last_problem)}"))
    context = [f"`{op.ref}`"]
    if op.external_id:
        context.append(f"request {_request_link(op)}")
    if data.approved_by:
        context.append("approved by " + ", ".join(f"<@{user}>" for user in data.approved_by))
    blocks.append(bk.context(" · ".join(context)))
    text = f"{bk.escape(title)}: {STATE_LABEL[state]}"  # the message text is mrkdwn, unlike the header
    return text, bk.limit_blocks(blocks)


def _progress_text(counts: JobStatusCounts) -> str:
    total, done = counts.total, counts.done
    percent = round(100 * done / total) if total else 0
    return (
        f"`{bk.progress_bar(done, total)}` {percent}% · {_n(done)}/{_n(total)} done\n"
        f"✅ {_n(counts.succeeded)} succeeded · ❌ {_n(counts.failed)} failed"
        f" · 🔄 {_n(counts.in_progress)} in progress · ⏳ {_n(counts.pending + counts.created)} waiting"
    )


def _summary_text(summary: PushSummary) -> str:
    lines = [
        f"✅ {_n(summary.succeeded)} succeeded · ❌ {_n(summary.failed)} failed"
        + (f" · ✋ {_n(summary.canceled)} canceled" if summary.canceled else "")
        + f" · {_n(summary.total)} jobs"
    ]
    if summary.groups:
        lines.append("*Failures by error:*")
        for group in summary.groups:
            message = bk.escape(bk.clip(group.message, 160))
            varies = " _(the numbers differ from org to org; each is in the CSV)_" if group.numbers_vary else ""
            lines.append(
                f"• {_n(group.count)} × *{bk.escape(group.type)}* — {bk.escape(group.title)}: {message}{varies}"
            )
        more = summary.group_count - len(summary.groups)
        if more > 0:
            lines.append(f"…and {more} other error kinds (all in the CSV)")
    if summary.without_error_record:
        lines.append(f"{_n(summary.without_error_record)} failed job(s) had no error record in Salesforce.")
    return "\n".join(lines)


def _cancel_button(op: Operation) -> Block:
    return bk.button(
        "Cancel",
        action_id="push_cancel",
        value=str(op.id),
        confirm=("Cancel this push?", f"Cancel push {op.ref}? Nothing will be upgraded.", "Cancel push"),
    )


def event_reply(op: Operation, event: OpEvent) -> str | None:
    """The thread reply for a state change that matters, or None."""
    name, detail = event.name, event.detail
    if name == "jobs_created":
        text = f"Created {_n(detail.get('created'))} push job(s)."
        failures = detail.get("bulk_failures") or []
        for index, failure in enumerate(failures):
            last_given_up = detail.get("bulk_gave_up") and index == len(failures) - 1
            then = (
                "the orgs still without one are listed below"
                if last_given_up
                else "only orgs without one were sent again"
            )
            text += f"\n⚠️ {bk.escape(bk.clip(str(failure), 300))}. The push jobs it created were kept; {then}."
        refused = detail.get("refused") or []
        if refused:
            text += f" Salesforce refused {_n(detail.get('refused_total'))} org(s); the rest go on:"
            for org_key, reason in refused[:MAX_LISTED_REFUSALS]:
                text += f"\n• `{org_key}` — {bk.escape(bk.clip(str(reason), 200))}"
            more = int(detail.get("refused_total", 0)) - min(len(refused), MAX_LISTED_REFUSALS)
            if more > 0:
                text += f"\n…and {more} more."
        return text
    if name == "scheduled":
        return f"🗓️ Scheduled: Salesforce starts the upgrade {slack_date(op.scheduled_for or op.created_at)}."
    if name == "started":
        return "🚀 Started: the push request is Pending in Salesforce."
    if name == "in_progress":
        return "🔄 Salesforce is upgrading orgs now."
    if name == "expired":
        return "⌛ Nobody approved in time; the request expired and nothing was pushed."
    if name == "error":
        return f"❗ {bk.escape(PushData.of(op).error or 'The push could not be carried out.')}"
    if name == "canceled":
        return "✋ The push request was canceled in Salesforce."
    return None


def _request_link(op: Operation) -> str:
    """The push request id, linked to its page in the packaging org when the bot recorded one."""
    url = PushData.of(op).request_url or ""
    if url.startswith(("https://", "http://")) and "|" not in url and ">" not in url:
        return f"<{url}|{op.external_id}>"
    return f"`{op.external_id}`"


def completion_text(op: Operation) -> str:
    """Posted once when a push ends: in the thread and in the notifications channel."""
    state = OpState(op.state)
    params, data = PushParams.read(op.params), PushData.of(op)
    base = f"{STATE_LABEL[state]}: push {op.ref} of {bk.escape(params.package)} {params.version}"
    if op.external_id:
        base += f" · request {_request_link(op)}"
    if data.summary:
        return f"{base}\n{_summary_text(data.summary)}"
    if state == OpState.REJECTED:
        reason = bk.escape(data.reject_reason or "no reason")
        return f"{base} (rejected by <@{data.rejected_by}>: {reason})"
    if state == OpState.CANCELED:
        return base + (f" (canceled by <@{data.canceled_by}>)" if data.canceled_by else "")
    if state == OpState.ERROR:
        return f"{base}\n{bk.escape(data.error or '')}"
    return base


def plan_message(plan: PushPlan, *, dry_run: bool) -> str:
    version = plan.version
    lines = [
        f"*{'Dry run — nothing created. ' if dry_run else ''}"
        f"Plan for {bk.escape(version.package_name)} {version.label}*"
        f" (`{version.id}`), orgs: {plan.selection}",
        f"{len(plan.targets):,} org(s) would be upgraded:",
    ]
    for from_version, org_type, count in plan.by_version_and_type()[:30]:
        lines.append(f"• {count:,} {org_type} org(s) on {from_version}")
    if plan.skipped:
        lines.append("Left out: " + ", ".join(f"{n:,} {why}" for why, n in plan.skipped.most_common()))
    if plan.not_eligible:
        lines.append(f"{len(plan.not_eligible):,} listed org(s) are not eligible:")
        lines.extend(f"• `{org_id}` — {bk.escape(why)}" for org_id, why in plan.not_eligible[:20])
        if len(plan.not_eligible) > 20:
            lines.append(f"…and {len(plan.not_eligible) - 20} more")
    return bk.clip("\n".join(lines), bk.SECTION_TEXT_MAX)


def retry_message(retry: RetryPlan, *, dry_run: bool) -> str:
    lines = [
        plan_message(retry.plan, dry_run=dry_run)
        if retry.plan.targets
        else f"Nothing to retry from {retry.previous.ref}."
    ]
    if retry.left_out:
        lines.append(f"Left out of the retry of {retry.previous.ref} ({sum(retry.left_out.values()):,} org(s)):")
        lines.extend(f"• {n:,} — {why}" for why, n in retry.left_out.most_common())
    return bk.clip("\n".join(lines), bk.SECTION_TEXT_MAX)


def created_message(op: Operation, *, created: bool) -> str:
    if not created:
        return f"That request was already received as {op.ref}."
    if op.state == OpState.AWAITING_APPROVAL:
        return f"{op.ref} is waiting for approval; the card is in the channel."
    return f"{op.ref} is starting; follow the card in the channel."


def list_message(ops: Sequence[Operation]) -> str:
    if not ops:
        return "No pushes yet in this channel (nor yours elsewhere). Start one with `/push create <version>`."
    lines = ["*Recent pushes* (this channel, and yours elsewhere)"]
    for op in ops:
        params, data = PushParams.read(op.params), PushData.of(op)
        extra = ""
        if data.summary:
            extra = f" · ✅ {_n(data.summary.succeeded)} ❌ {_n(data.summary.failed)}"
        elif data.counts:
            extra = f" · {data.counts.done:,}/{data.counts.total:,} done"
        lines.append(
            f"• `{op.ref}` {bk.escape(params.package)} {params.version} → "
            f"{_n(data.plan.total)} orgs · {STATE_LABEL[OpState(op.state)]}{extra}"
            f" · <@{op.requester}> · {slack_date(op.created_at)}"
        )
    return bk.clip("\n".join(lines), bk.SECTION_TEXT_MAX)


def status_blocks(op: Operation) -> list[Block]:
    _, blocks = push_card(op)
    # An ephemeral copy must not carry live buttons: they belong to the channel card.
    return [block for block in blocks if block.get("type") != "actions"]
