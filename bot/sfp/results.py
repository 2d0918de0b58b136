"""How a task's result reads in Slack: nested JSON as bullets, long ones cut to a preview.

Results stored by the bot were redacted when they were stored; a result read live from the sfp
server is redacted here before it is shown.
"""

from __future__ import annotations

import json
import re
from typing import Any

from bot.clients.sfp import TaskStatus, parse_time
from bot.core.when import slack_date
from bot.redaction import redact, redact_text
from bot.sfp.payloads import is_long_result
from bot.sfp.requests import Target
from bot.slack import blocks as bk
from bot.store.models import Operation, OpState

PREVIEW_LINES = 12
_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}")


def _e(value: Any) -> str:
    return bk.escape(str(value))


def scalar(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


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
            shown = ", ".join(_e(scalar(item)) for item in value[:20])
            more = f" … (+{len(value) - 20})" if len(value) > 20 else ""
            lines.append(f"{indent}{bullet} {label}{shown or '_(none)_'}{more}")
            return
        lines.append(f"{indent}{bullet} {label}{len(value)} item(s)")
        for item in value[:10]:
            if isinstance(item, dict):
                compact = ", ".join(f"{_e(k)}={_e(scalar(v))}" for k, v in list(item.items())[:6])
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
    return _e(bk.clip(scalar(value), 500))


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
