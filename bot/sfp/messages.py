"""Everything a person reads about sfp server tasks: the card, thread replies, results, lists.

Pure functions from plain data to text or ``(text, blocks)``; no I/O. Anything that came from
the user or the sfp server goes through ``escape``, and through ``redact_text`` when it comes
straight from the sfp server (live status, errors); stored results were already redacted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from bot.clients.sfp import Recurrence, TaskStatus, parse_time
from bot.core.operations import OpEvent
from bot.core.when import slack_date
from bot.redaction import REDACTED, redact, redact_text
from bot.sfp.service import (
    CancelOutcome,
    StopOutcome,
    Target,
    duration_text,
    is_long_result,
    is_recurring,
    result_json,
    stored_result,
)
from bot.slack import blocks as bk
from bot.slack.blocks import Block
from bot.slack.cards import STATE_LABEL, approval_blocks, waiver_blocks
from bot.store.models import Operation, OpState

STOP_ACTION = "sfp_stop"
CANCEL_ACTION = "sfp_cancel"
PREVIEW_LINES = 12
MAX_RUNS_LISTED = 30
_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}")
RUN_ICON = {"completed": "✅", "failed": "❌", "cancelled": "✋", "active": "🚀", "pending": "⏳"}


def _e(value: Any) -> str:
    return bk.escape(str(value))


def _when(value: Any) -> str | None:
    moment = parse_time(value) if not isinstance(value, datetime) else value
    return slack_date(moment) if moment else None


def state_label(op: Operation) -> str:
    state = OpState(op.state)
    data = op.data
    recurring = is_recurring(op)
    if state == OpState.STARTING:
        return "⚙️ Submitting to the sfp server"
    if state == OpState.RUNNING:
        if recurring:
            return "🔁 Recurring"
        return "⏳ Queued on the sfp server" if data.get("status") == "pending" else "🚀 Running"
    if state == OpState.CANCELING:
        if data.get("stop") and not data.get("cancel_requested_by"):
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
    params = op.params
    start = _when(params.get("scheduled_for"))
    every = params.get("every_seconds")
    if every:
        text = f"every {duration_text(timedelta(seconds=int(every)))}"
        text += f" from {start}" if start else ""
        until = _when(params.get("until"))
        return text + (f" until {until}" if until else "")
    return f"at {start}" if start else "now"


def data_text(data: dict[str, Any], *, limit: int = 600) -> str:
    if not data:
        return "_(no data)_"
    shown = redact(data)
    parts = [f"`{_e(key)}`={_e(_scalar(value))}" for key, value in shown.items()]
    return bk.clip(" · ".join(parts), limit)


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


# -- results ----------------------------------------------------------------------------------------


def render_result(result: Any) -> str:
    """A result as readable lines: keys in bold, nesting as indented bullets, lists counted."""
    if result is None:
        return "_(the task returned no result)_"
    if isinstance(result, str):
        return f"```{_e(result)}```" if result else "_(empty)_"
    lines: list[str] = []
    _render_value(result, lines, depth=0, key=None)
    return "\n".join(lines) if lines else "_(empty)_"


def _render_value(value: Any, lines: list[str], *, depth: int, key: str | None) -> None:
    indent = "    " * depth
    bullet = "•" if depth == 0 else "◦"
    label = f"*{_e(key)}*: " if key is not None else ""
    if isinstance(value, dict):
        if key is not None:
            lines.append(f"{indent}{bullet} *{_e(key)}*:" if value else f"{indent}{bullet} {label}_(none)_")
            depth += 1
        if depth > 3:
            lines.append(f"{'    ' * depth}◦ `{_e(bk.clip(json.dumps(value, default=str), 300))}`")
            return
        for sub_key, sub in value.items():
            _render_value(sub, lines, depth=depth, key=str(sub_key))
    elif isinstance(value, list):
        if all(not isinstance(item, dict | list) for item in value):
            shown = ", ".join(_e(_scalar(item)) for item in value[:20])
            more = f" … (+{len(value) - 20})" if len(value) > 20 else ""
            lines.append(f"{indent}{bullet} {label}{shown or '_(none)_'}{more}")
            return
        lines.append(f"{indent}{bullet} {label}{len(value)} item(s)")
        for item in value[:10]:
            if isinstance(item, dict):
                compact = ", ".join(f"{_e(k)}={_e(_scalar(v))}" for k, v in list(item.items())[:6])
                lines.append(f"{indent}    ◦ {bk.clip(compact, 300)}")
            else:
                lines.append(f"{indent}    ◦ `{_e(bk.clip(json.dumps(item, default=str), 300))}`")
        if len(value) > 10:
            lines.append(f"{indent}    ◦ … {len(value) - 10} more")
    else:
        lines.append(f"{indent}{bullet} {label}{_leaf(value)}")


def _leaf(value: Any) -> str:
    if value is None:
        return "_(none)_"
    if isinstance(value, str) and _TIMESTAMP.match(value) and (moment := parse_time(value)) is not None:
        return slack_date(moment)  # each reader sees it in their own time zone
    return _e(bk.clip(_scalar(value), 500))


def result_block_text(result: Any, *, file_name: str | None) -> str:
    """Short results in full; long ones as a preview pointing at the attached file."""
    rendered = render_result(result)
    if not is_long_result(result):
        return bk.clip(rendered, 2800)
    preview = "\n".join(rendered.split("\n")[:PREVIEW_LINES])
    where = f"the full result is attached as `{file_name}`" if file_name else "the full result is in the card's thread"
    return bk.clip(preview, 2500) + f"\n_…{where}._"


def result_file_name(op: Operation) -> str:
    return f"sfp-{op.ref}-result.json"


# -- the card ---------------------------------------------------------------------------------------


def sfp_card(op: Operation, *, approvals: Sequence[str] = ()) -> tuple[str, list[Block]]:
    """The one status message of a task, edited in place as it progresses."""
    params, data = op.params, op.data
    state = OpState(op.state)
    label = state_label(op)
    title = f"sfp task {op.ref} · {params.get('type')}"
    fields = [
        f"*Status*\n{label}",
        f"*Requested by*\n<@{op.requester}>",
        f"*Schedule*\n{schedule_text(op)}",
        f"*Priority*\n{_e(params.get('priority') or 'low')}",
    ]
    if params.get("retries") is not None:
        fields.append(f"*Retries*\n{int(params['retries'])}")
    if params.get("shortcut"):
        fields.append(f"*Via*\n`{_e(params['shortcut'])}`")
    blocks: list[Block] = [
        bk.header(title),
        bk.fields_section(fields),
        bk.context(f"Data: {data_text(params.get('data') or {})}"),
    ]

    if is_recurring(op):
        blocks.append(bk.section(_runs_summary(op)))
    elif state in {OpState.RUNNING, OpState.CANCELING, OpState.SCHEDULED} and op.external_id:
        blocks.append(bk.section(_progress_text(op)))
    if state == OpState.SUCCEEDED and not is_recurring(op):
        result = stored_result(data)
        blocks.append(bk.section("*Result*\n" + result_block_text(result, file_name=result_file_name(op))))
    if state == OpState.FAILED and data.get("task_error"):
        blocks.append(bk.section(f"❌ {_e((data['task_error'] or {}).get('message') or 'The task failed.')}"))
    if state == OpState.ERROR and data.get("error"):
        blocks.append(bk.section(f"❗ {_e(data['error'])}"))
    if state == OpState.REJECTED:
        reason = _e(data.get("reject_reason") or "no reason given")
        blocks.append(bk.section(f"Rejected by <@{data.get('rejected_by')}>: {reason}"))
    if data.get("cancel_requested_by") and state in {OpState.CANCELING, OpState.CANCELED}:
        blocks.append(bk.context(f"Cancelled by <@{data['cancel_requested_by']}>."))
    elif data.get("stop"):
        stop = data["stop"]
        blocks.append(
            bk.context(f"✋ Stopped by <@{stop.get('by')}> {_when(stop.get('stopped_at') or stop.get('at'))}.")
        )
    if data.get("last_problem") and not op.is_terminal:
        blocks.append(bk.context(f"⚠️ sfp server trouble, retrying automatically: {_e(data['last_problem'])}"))

    blocks.extend(waiver_blocks(op))
    if state == OpState.AWAITING_APPROVAL:
        blocks.extend(approval_blocks(op, approvals, extra=[_cancel_button(op)]))
    elif state in {OpState.SCHEDULED, OpState.RUNNING}:
        buttons = [_stop_button(op)] if is_recurring(op) else [_cancel_button(op)]
        blocks.append(bk.actions(buttons, block_id=f"sfp:{op.id}"))

    context = [f"`{op.ref}`"]
    if op.external_id:
        context.append(f"operation `{_e(op.external_id)}`")
    if data.get("approved_by"):
        context.append("approved by " + ", ".join(f"<@{user}>" for user in data["approved_by"]))
    blocks.append(bk.context(" · ".join(context)))
    return f"{_e(title)}: {label}", bk.limit_blocks(blocks)  # the message text is mrkdwn, unlike the header


def _progress_text(op: Operation) -> str:
    data = op.data
    status = str(data.get("status") or "pending")
    # In steps of 5 %: the card is edited when it changes, and Slack limits edits.
    progress = 5 * round(int(data.get("progress") or 0) / 5)
    text = f"`{bk.progress_bar(progress, 100)}` {progress}% · {_e(status)}"
    if data.get("current_step"):
        text += f" · {_e(data['current_step'])}"
    attempts = data.get("attempts_made")
    retries = op.params.get("retries")
    if attempts and retries is not None:
        text += f" · attempt {min(int(attempts) + 1, int(retries) + 1)} of {int(retries) + 1}"
    return text


def _runs_summary(op: Operation) -> str:
    data = op.data
    counts = data.get("run_counts") or {}
    done = sum(int(n) for n in counts.values())
    parts = [f"*Runs so far:* {done}"]
    for status in ("completed", "failed", "cancelled"):
        if counts.get(status):
            parts.append(f"{RUN_ICON[status]} {counts[status]} {status}")
    lines = [" · ".join(parts)]
    current = data.get("current_run")
    if current and not op.is_terminal:
        lines.append(
            f"Run #{current.get('number')} is {_e(current.get('status'))}"
            + (f" ({int(current.get('progress') or 0)}%)" if current.get("status") == "active" else "")
        )
    if not op.is_terminal and data.get("active", True) and op.state != OpState.CANCELING:
        nxt = _when(data.get("next_run_at"))
        if nxt:
            lines.append(f"Next run {nxt}")
    end = _when(data.get("end_date") or op.params.get("until"))
    if end and not data.get("stop"):
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
            f"it starts {_when(op.params.get('scheduled_for'))}."
        )
    if name == "started":
        return "🚀 The sfp server started the task."
    if name == "retrying":
        attempt = int(detail.get("attempt") or 2)
        total = int(op.params.get("retries") or 0) + 1
        message = _e(detail.get("message") or "no message")
        return f"🔁 Attempt {attempt - 1} failed: {message}. The sfp server tries again (attempt {attempt} of {total})."
    if name == "run":
        return run_line(detail)
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


def run_line(detail: dict[str, Any]) -> str:
    status = str(detail.get("status") or "")
    icon = RUN_ICON.get(status, "•")
    text = f"{icon} Run #{detail.get('number')} {_e(status)}"
    started, finished = parse_time(detail.get("started_at")), parse_time(detail.get("finished_at"))
    if started and finished:
        text += f" in {_elapsed(finished - started)}"
    if finished:
        text += f" ({slack_date(finished, style='{time_secs}')})"
    if detail.get("message"):
        text += f": {_e(bk.clip(str(detail['message']), 300))}"
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
    data = op.data
    operation = f", operation `{_e(op.external_id)}`" if op.external_id else ""
    base = f"{state_label(op)}: sfp task {op.ref} ({_e(op.params.get('type'))}{operation})"
    if is_recurring(op) and state in {OpState.SUCCEEDED, OpState.FAILED, OpState.CANCELED} and "run_counts" in data:
        counts = data.get("run_counts") or {}
        total = sum(int(n) for n in counts.values())
        text = f"{base}: {total} run(s)"
        parts = [f"{RUN_ICON[s]} {counts[s]} {s}" for s in ("completed", "failed", "cancelled") if counts.get(s)]
        if parts:
            text += " — " + " · ".join(parts)
        if data.get("stop"):
            text += f"\nStopped by <@{data['stop'].get('by')}>."
        elif data.get("cancel_requested_by"):
            text += f"\nCancelled by <@{data['cancel_requested_by']}>."
        if total:
            text += f"\nEvery run is listed in `sfp-{op.ref}-runs.csv`."
        return bk.clip(text, bk.MESSAGE_TEXT_MAX)
    if state == OpState.SUCCEEDED:
        result = stored_result(data)
        return bk.clip(
            f"{base}\n*Result*\n{result_block_text(result, file_name=result_file_name(op))}", bk.MESSAGE_TEXT_MAX
        )
    if state == OpState.FAILED:
        error = data.get("task_error") or {}
        text = f"{base}: {_e(error.get('message') or 'no error message')}"
        if error.get("stack"):
            text += f"\nThe stack trace is attached as `sfp-{op.ref}-error.txt`."
        return bk.clip(text, bk.MESSAGE_TEXT_MAX)
    if state == OpState.CANCELED:
        who = data.get("cancel_requested_by") or (data.get("stop") or {}).get("by")
        return base + (f" (by <@{who}>)" if who else "")
    if state == OpState.REJECTED:
        reason = _e(data.get("reject_reason") or "no reason")
        return f"{base} (rejected by <@{data.get('rejected_by')}>: {reason})"
    if state == OpState.ERROR:
        return bk.clip(f"{base}\n{_e(data.get('error', ''))}", bk.MESSAGE_TEXT_MAX)
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
        extra = ""
        if is_recurring(op):
            counts = op.data.get("run_counts") or {}
            extra = f" · {sum(int(n) for n in counts.values())} run(s)"
        elif op.state in {OpState.RUNNING, OpState.CANCELING}:
            extra = f" · {int(op.data.get('progress') or 0)}%"
        lines.append(
            f"• `{op.ref}` {_e(op.params.get('type'))} · {state_label(op)}{extra} · {schedule_text(op)}"
            f" · <@{op.requester}> · {slack_date(op.created_at)}"
        )
    return bk.clip("\n".join(lines), bk.SECTION_TEXT_MAX)


def status_blocks(op: Operation, live: TaskStatus | None) -> list[Block]:
    _, blocks = sfp_card(op)
    # An ephemeral copy must not carry live buttons: they belong to the channel card.
    blocks = [block for block in blocks if block.get("type") != "actions"]
    if live is not None:
        blocks.append(bk.context("Live from the sfp server: " + _live_text(live, recurring=is_recurring(op))))
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


def result_text(target: Target, status: TaskStatus) -> str:
    if status.status == "completed":
        op = target.operation
        file_name = result_file_name(op) if op is not None and op.state == OpState.SUCCEEDED else None
        result = redact(status.result)
        if file_name is None and is_long_result(result):
            rendered = render_result(result).split("\n")
            shown = "\n".join(rendered[:PREVIEW_LINES])
            return bk.clip(
                f"*Result of {target.label}*\n{shown}\n_…{len(rendered) - PREVIEW_LINES} more line(s); "
                "the sfp server has the rest._",
                bk.MESSAGE_TEXT_MAX,
            )
        return bk.clip(
            f"*Result of {target.label}*\n{result_block_text(result, file_name=file_name)}", bk.MESSAGE_TEXT_MAX
        )
    if status.status == "failed":
        message = redact_text(status.error.message) if status.error else "no error message"
        return f"❌ {target.label} failed: {_e(bk.clip(message, 500))}"
    if status.status == "cancelled":
        return f"✋ {target.label} was cancelled; there is no result."
    return f"{target.label} has no result yet: it is {_e(status.status)} ({status.progress}%)."


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
    "REDACTED",
    "cancel_text",
    "completion_text",
    "created_message",
    "event_reply",
    "foreign_status_text",
    "list_message",
    "render_result",
    "result_json",
    "result_text",
    "runs_text",
    "sfp_card",
    "status_blocks",
    "stop_text",
]
