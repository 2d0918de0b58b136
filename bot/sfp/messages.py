"""Everything a person reads about sfp server tasks: the card, thread replies, results, lists.

Pure functions from plain data to text or ``(text, blocks)``; no I/O. Anything that came from
the user or the sfp server goes through ``escape``, and through ``redact_text`` when it comes
straight from the sfp server (live status, errors); stored results were already redacted.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from bot.clients.sfp import Recurrence, TaskStatus, parse_time
from bot.core.operations import OpEvent
from bot.core.when import slack_date
from bot.redaction import redact, redact_text
from bot.sfp.payloads import (
    RunRecord,
    SfpData,
    SfpParams,
    duration_text,
    params_of,
    parse_iso,
)
from bot.sfp.requests import CancelOutcome, StopOutcome, Target
from bot.sfp.results import result_block_text, result_file_name, result_text, scalar
from bot.slack import blocks as bk
from bot.slack.blocks import Block
from bot.slack.cards import STATE_LABEL, approval_blocks, waiver_blocks
from bot.store.models import Operation, OpState

STOP_ACTION = "sfp_stop"
CANCEL_ACTION = "sfp_cancel"
MAX_RUNS_LISTED = 30
RUN_ICON = {"completed": "✅", "failed": "❌", "cancelled": "✋", "active": "🚀", "pending": "⏳"}


def _e(value: Any) -> str:
    return bk.escape(str(value))


def _when(value: Any) -> str | None:
    moment = parse_time(value) if not isinstance(value, datetime) else value
    return slack_date(moment) if moment else None


def state_label(op: Operation) -> str:
    state = OpState(op.state)
    data = SfpData.of(op)
    recurring = params_of(op).recurring
    if state == OpState.STARTING:
        return "⚙️ Submitting to the sfp server"
    if state == OpState.RUNNING:
        if recurring:
            return "🔁 Recurring"
        return "⏳ Queued on the sfp server" if data.status == "pending" else "🚀 Running"
    if state == OpState.CANCELING:
        if data.stop and not data.cancel_requested_by:
            return "✋ Stopping: no further runs"
        return "✋ Cancelling"
    if state == OpState.SUCCEEDED:
        return "✅ Ended" if recurring else "✅ Completed"
    if state == OpState.FAILED:
        return "⚠️ Ended with failed runs" if recurring else "❌ Failed"
    if state == OpState.CANCELED:
        return "✋ Cancelled"
    return STATE_LABEL[state]


def schedule_text(op: Operation) -> str:
    params = params_of(op)
    start = _when(params.scheduled_for)
    if params.every:
        text = f"every {duration_text(params.every)}"
        text += f" from {start}" if start else ""
        until = _when(params.until)
        return text + (f" until {until}" if until else "")
    return f"at {start}" if start else "now"


def data_text(data: dict[str, Any], *, limit: int = 600) -> str:
    if not data:
        return "_(no data)_"
    shown = redact(data)
    parts = [f"`{_e(key)}`={_e(scalar(value))}" for key, value in shown.items()]
    return bk.clip(" · ".join(parts), limit)


# -- the card ---------------------------------------------------------------------------------------


def sfp_card(op: Operation, *, approvals: Sequence[str] = ()) -> tuple[str, list[Block]]:
    """The one status message of a task, edited in place as it progresses."""
    params, data = params_of(op), SfpData.of(op)
    state = OpState(op.state)
    label = state_label(op)
    title = f"sfp task {op.ref} · {params.type}"
    fields = [
        f"*Status*\n{label}",
        f"*Requested by*\n<@{op.requester}>",
        f"*Schedule*\n{schedule_text(op)}",
        f"*Priority*\n{_e(params.priority or 'low')}",
    ]
    if params.retries is not None:
        fields.append(f"*Retries*\n{params.retries}")
    if params.shortcut:
        fields.append(f"*Via*\n`{_e(params.shortcut)}`")
    blocks: list[Block] = [
        bk.header(title),
        bk.fields_section(fields),
        bk.context(f"Data: {data_text(params.data)}"),
    ]

    if params.recurring:
        blocks.append(bk.section(_runs_summary(op, params, data)))
    elif state in {OpState.RUNNING, OpState.CANCELING, OpState.SCHEDULED} and op.external_id:
        blocks.append(bk.section(_progress_text(params, data)))
    if state == OpState.SUCCEEDED and not params.recurring:
        file_name = result_file_name(op)
        blocks.append(bk.section("*Result*\n" + result_block_text(data.stored_result, file_name=file_name)))
    if state == OpState.FAILED and data.task_error:
        blocks.append(bk.section(f"❌ {_e(data.task_error.message or 'The task failed.')}"))
    if state == OpState.ERROR and data.error:
        blocks.append(bk.section(f"❗ {_e(data.error)}"))
    if state == OpState.REJECTED:
        reason = _e(data.reject_reason or "no reason given")
        blocks.append(bk.section(f"Rejected by <@{data.rejected_by}>: {reason}"))
    if data.cancel_requested_by and state in {OpState.CANCELING, OpState.CANCELED}:
        blocks.append(bk.context(f"Cancelled by <@{data.cancel_requested_by}>."))
    elif data.stop:
        blocks.append(bk.context(f"✋ Stopped by <@{data.stop.by}> {_when(data.stop.stopped_at or data.stop.at)}."))
    if data.last_problem and not op.is_terminal:
        blocks.append(bk.context(f"⚠️ sfp server trouble, retrying automatically: {_e(data.last_problem)}"))

    blocks.extend(waiver_blocks(op))
    if state == OpState.AWAITING_APPROVAL:
        blocks.extend(approval_blocks(op, approvals, extra=[_cancel_button(op)]))
    elif state in {OpState.SCHEDULED, OpState.RUNNING}:
        buttons = [_stop_button(op)] if params.recurring else [_cancel_button(op)]
        blocks.append(bk.actions(buttons, block_id=f"sfp:{op.id}"))

    context = [f"`{op.ref}`"]
    if op.external_id:
        context.append(f"operation `{_e(op.external_id)}`")
    if data.approved_by:
        context.append("approved by " + ", ".join(f"<@{user}>" for user in data.approved_by))
    blocks.append(bk.context(" · ".join(context)))
    return f"{_e(title)}: {label}", bk.limit_blocks(blocks)  # the message text is mrkdwn, unlike the header


def _progress_text(params: SfpParams, data: SfpData) -> str:
    status = data.status or "pending"
    # In steps of 5 %: the card is edited when it changes, and Slack limits edits.
    progress = 5 * round((data.progress or 0) / 5)
    text = f"`{bk.progress_bar(progress, 100)}` {progress}% · {_e(status)}"
    if data.current_step:
        text += f" · {_e(data.current_step)}"
    attempts, retries = data.attempts_made, params.retries
    if attempts and retries is not None:
        text += f" · attempt {min(attempts + 1, retries + 1)} of {retries + 1}"
    return text


def _counts_text(counts: dict[str, int]) -> list[str]:
    return [f"{RUN_ICON[s]} {counts[s]} {s}" for s in ("completed", "failed", "cancelled") if counts.get(s)]


def _runs_summary(op: Operation, params: SfpParams, data: SfpData) -> str:
    lines = [" · ".join([f"*Runs so far:* {data.total_done}", *_counts_text(data.run_counts or {})])]
    current = data.current_run
    if current and not op.is_terminal:
        lines.append(
            f"Run #{current.number} is {_e(current.status)}"
            + (f" ({current.progress}%)" if current.status == "active" else "")
        )
    if not op.is_terminal and data.active is not False and op.state != OpState.CANCELING:
        nxt = _when(data.next_run_at)
        if nxt:
            lines.append(f"Next run {nxt}")
    end = _when(data.end_date or params.until)
    if end and not data.stop:
        lines.append(f"Ends {end}")
    return "\n".join(lines)


def _cancel_button(op: Operation) -> Block:
    return bk.button(
        "Cancel",
        action_id=CANCEL_ACTION,
        value=str(op.id),
        confirm=("Cancel this task?", f"Cancel sfp task {op.ref}?", "Cancel task"),
    )


def _stop_button(op: Operation) -> Block:
    return bk.button(
        "Stop",
        action_id=STOP_ACTION,
        value=str(op.id),
        style="danger",
        confirm=("Stop this recurring task?", f"No further runs of {op.ref} will start.", "Stop it"),
    )


# -- thread replies and completion ------------------------------------------------------------------


def event_reply(op: Operation, event: OpEvent) -> str | None:
    name, detail = event.name, event.detail
    if name == "scheduled":
        return (
            f"🗓️ Accepted by the sfp server as operation `{_e(op.external_id)}`; "
            f"it starts {_when(params_of(op).scheduled_for)}."
        )
    if name == "started":
        return "🚀 The sfp server started the task."
    if name == "retrying":
        attempt = int(detail.get("attempt") or 2)
        total = (params_of(op).retries or 0) + 1
        message = _e(detail.get("message") or "no message")
        return f"🔁 Attempt {attempt - 1} failed: {message}. The sfp server tries again (attempt {attempt} of {total})."
    if name == "run":
        return run_line(RunRecord.model_validate(detail))
    if name == "runs_backlog":
        return f"…and {int(detail.get('more') or 0)} more runs finished; `/sfp runs {op.ref}` lists them."
    if name == "ended":
        total = int(detail.get("total") or 0)
        if detail.get("reason") == "stopped":
            return f"✋ Stopped: no further runs. {total} run(s) in all."
        return f"🏁 Reached its end date: no further runs. {total} run(s) in all."
    if name == "expired":
        return "⌛ Nobody approved in time; the request expired and nothing was sent to the sfp server."
    # "error": the completion notice that follows says what went wrong; one message is enough.
    return None


def run_line(run: RunRecord) -> str:
    icon = RUN_ICON.get(run.status, "•")
    text = f"{icon} Run #{run.number} {_e(run.status)}"
    started, finished = parse_iso(run.started_at), parse_iso(run.finished_at)
    if started and finished:
        text += f" in {_elapsed(finished - started)}"
    if finished:
        text += f" ({slack_date(finished, style='{time_secs}')})"
    if run.message:
        text += f": {_e(bk.clip(run.message, 300))}"
    return text


def _elapsed(delta: timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 90:
        return f"{seconds}s"
    if seconds < 5400:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def completion_text(op: Operation) -> str:
    """Posted once when a task ends: in the thread and in the notifications channel."""
    state = OpState(op.state)
    params, data = params_of(op), SfpData.of(op)
    operation = f", operation `{_e(op.external_id)}`" if op.external_id else ""
    base = f"{state_label(op)}: sfp task {op.ref} ({_e(params.type)}{operation})"
    ended = state in {OpState.SUCCEEDED, OpState.FAILED, OpState.CANCELED}
    if params.recurring and ended and data.run_counts is not None:
        text = f"{base}: {data.total_done} run(s)"
        parts = _counts_text(data.run_counts)
        if parts:
            text += " — " + " · ".join(parts)
        if data.stop:
            text += f"\nStopped by <@{data.stop.by}>."
        elif data.cancel_requested_by:
            text += f"\nCancelled by <@{data.cancel_requested_by}>."
        if data.total_done:
            text += f"\nEvery run is listed in `sfp-{op.ref}-runs.csv`."
        return bk.clip(text, bk.MESSAGE_TEXT_MAX)
    if state == OpState.SUCCEEDED:
        result = result_block_text(data.stored_result, file_name=result_file_name(op))
        return bk.clip(f"{base}\n*Result*\n{result}", bk.MESSAGE_TEXT_MAX)
    if state == OpState.FAILED:
        error = data.task_error
        text = f"{base}: {_e((error.message if error else '') or 'no error message')}"
        if error and error.stack:
            text += f"\nThe stack trace is attached as `sfp-{op.ref}-error.txt`."
        return bk.clip(text, bk.MESSAGE_TEXT_MAX)
    if state == OpState.CANCELED:
        who = data.ended_by
        return base + (f" (by <@{who}>)" if who else "")
    if state == OpState.REJECTED:
        reason = _e(data.reject_reason or "no reason")
        return f"{base} (rejected by <@{data.rejected_by}>: {reason})"
    if state == OpState.ERROR:
        return bk.clip(f"{base}\n{_e(data.error or '')}", bk.MESSAGE_TEXT_MAX)
    return base


# -- ephemeral answers ------------------------------------------------------------------------------


def created_message(op: Operation, *, created: bool) -> str:
    if not created:
        return f"That request was already received as {op.ref}."
    if op.state == OpState.AWAITING_APPROVAL:
        return f"{op.ref} is waiting for approval; the card is in the channel."
    return f"{op.ref} is being submitted to the sfp server; follow the card in the channel."


def list_message(ops: Sequence[Operation]) -> str:
    if not ops:
        return (
            "No sfp tasks yet in this channel (nor yours elsewhere). "
            "Submit one with `/sfp submit <type> [key=value …]`."
        )
    lines = ["*Recent sfp tasks* (this channel, and yours elsewhere)"]
    for op in ops:
        params, data = params_of(op), SfpData.of(op)
        extra = ""
        if params.recurring:
            extra = f" · {data.total_done} run(s)"
        elif op.state in {OpState.RUNNING, OpState.CANCELING}:
            extra = f" · {data.progress or 0}%"
        lines.append(
            f"• `{op.ref}` {_e(params.type)} · {state_label(op)}{extra} · {schedule_text(op)}"
            f" · <@{op.requester}> · {slack_date(op.created_at)}"
        )
    return bk.clip("\n".join(lines), bk.SECTION_TEXT_MAX)


def status_blocks(op: Operation, live: TaskStatus | None) -> list[Block]:
    _, blocks = sfp_card(op)
    # An ephemeral copy must not carry live buttons: they belong to the channel card.
    blocks = [block for block in blocks if block.get("type") != "actions"]
    if live is not None:
        blocks.append(bk.context("Live from the sfp server: " + _live_text(live, recurring=params_of(op).recurring)))
    return blocks


def _live_text(status: TaskStatus, *, recurring: bool) -> str:
    text = f"{_e(status.status)} · {status.progress}%"
    if recurring:
        text = "latest run " + text
    if status.current_step:
        text += f" · {_e(redact_text(status.current_step))}"
    if status.error and status.error.message:
        text += f" · error: {_e(bk.clip(redact_text(status.error.message), 300))}"
    return text


def foreign_status_text(target: Target, status: TaskStatus) -> str:
    return f"*Status of {target.label}* (not submitted by this bot)\n" + _live_text(status, recurring=False)


def runs_text(target: Target, rec: Recurrence) -> str:
    lines = [f"*Runs of {target.label}*"]
    if not rec.instances:
        lines.append("No runs yet.")
    shown = rec.instances[-MAX_RUNS_LISTED:]
    if len(rec.instances) > len(shown):
        lines.append(f"…{len(rec.instances) - len(shown)} earlier run(s) not shown")
    for instance in shown:
        line = f"{RUN_ICON.get(instance.status, '•')} #{instance.number} {_e(instance.status)}"
        if instance.status == "active":
            line += f" ({instance.progress}%)"
        moment = instance.finished_at or instance.started_at or instance.scheduled_for
        if moment:
            line += f" · {slack_date(moment)}"
        if instance.error and instance.error.message:
            line += f" · {_e(bk.clip(redact_text(instance.error.message), 200))}"
        lines.append(line)
    if rec.stopped_at:
        lines.append(f"Stopped {slack_date(rec.stopped_at)}; no further runs.")
    elif rec.active is False:
        lines.append("Ended; no further runs.")
    elif rec.next_execution_at:
        lines.append(
            f"Next run {slack_date(rec.next_execution_at)}"
            + (f", ends {slack_date(rec.end_date)}" if rec.end_date else "")
        )
    return bk.clip("\n".join(lines), bk.MESSAGE_TEXT_MAX)


def stop_text(outcome: StopOutcome) -> str:
    label = outcome.target.label
    stopped = outcome.stopped
    if stopped is None:
        return f"✋ {label} is stopped: no further runs will start."
    text = f"✋ {label} is stopped: no further runs will start. {stopped.total_executions} run(s) so far"
    if stopped.last_execution_at:
        text += f", the last {slack_date(stopped.last_execution_at)}"
    text += "."
    if stopped.original_end_date:
        text += f" It would have run until {slack_date(stopped.original_end_date)}."
    return text


def cancel_text(outcome: CancelOutcome) -> str:
    return f"✋ {_e(outcome.text)}"


__all__ = [
    "cancel_text",
    "completion_text",
    "created_message",
    "event_reply",
    "foreign_status_text",
    "list_message",
    "result_text",
    "runs_text",
    "sfp_card",
    "status_blocks",
    "stop_text",
]
