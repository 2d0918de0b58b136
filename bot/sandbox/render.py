"""Render Slack messages and modals as readable terminal text.

The sandbox console and the tour runner show what a Slack user would see, so these functions
turn Block Kit JSON (as the fake Slack stores it, in Slack's own wire shape) into plain lines:
headers, section text and fields, context, dividers, numbered buttons (`[1 Approve]`), files
with the first lines of their preview, and modal inputs.

Everything here is pure: no I/O, no clock unless `RenderContext.now` is left unset, so the
same message renders identically for a given viewer. Slack mrkdwn is converted the way the
Slack client would show it to that viewer: `<!date^...>` in the viewer's time zone,
`<@U123>` as the user's name, `<url|text>` as the text.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

JSON = dict[str, Any]

# How many lines of a file preview (e.g. a CSV of push failures) are worth showing inline.
FILE_PREVIEW_LINES = 5

# A handful of emoji the bot is likely to use; unknown shortcodes stay as `:name:`, which is
# still readable, so this table is a nicety rather than a complete mapping.
_EMOJI: dict[str, str] = {
    "white_check_mark": "✅",
    "heavy_check_mark": "✔️",
    "x": "❌",
    "warning": "⚠️",
    "hourglass": "⌛",
    "hourglass_flowing_sand": "⏳",
    "rocket": "🚀",
    "no_entry": "⛔",
    "no_entry_sign": "🚫",
    "lock": "🔒",
    "stopwatch": "⏱️",
    "clock3": "🕒",
    "information_source": "ℹ️",
    "arrows_counterclockwise": "🔄",
    "repeat": "🔁",
    "package": "📦",
    "memo": "📝",
    "thumbsup": "👍",
    "+1": "👍",
    "thumbsdown": "👎",
    "-1": "👎",
    "red_circle": "🔴",
    "large_green_circle": "🟢",
    "large_yellow_circle": "🟡",
    "large_blue_circle": "🔵",
    "white_circle": "⚪",
    "black_square_button": "🔲",
    "tada": "🎉",
    "bell": "🔔",
    "calendar": "📅",
    "bar_chart": "📊",
    "paperclip": "📎",
    "skull": "💀",
    "fire": "🔥",
    "construction": "🚧",
    "stop_button": "⏹️",
    "zap": "⚡",
    "eyes": "👀",
}


@dataclass(frozen=True)
class RenderContext:
    """Who is looking: names to show for ids, and the viewer's time zone for `<!date>`."""

    user_names: Mapping[str, str] = field(default_factory=dict)
    channel_names: Mapping[str, str] = field(default_factory=dict)
    tz: str = "UTC"
    # Fixed "now" for {date_pretty}/{ago}; None means the real clock (tests pin it).
    now: datetime | None = None


@dataclass(frozen=True)
class Button:
    """A clickable button of a message, numbered in display order starting at 1."""

    number: int
    label: str
    action_id: str
    block_id: str | None
    value: str | None
    url: str | None = None
    style: str | None = None


@dataclass(frozen=True)
class InputField:
    """One input block of a modal, reduced to what a person filling it needs to know."""

    block_id: str
    action_id: str
    label: str
    element_type: str
    optional: bool
    multiline: bool = False
    placeholder: str | None = None
    hint: str | None = None
    initial: str | None = None
    # (text, value) pairs for selects, radio buttons and checkboxes.
    options: tuple[tuple[str, str], ...] = ()
    min_length: int | None = None
    max_length: int | None = None


# --------------------------------------------------------------------------------------------
# mrkdwn


_TOKEN = re.compile(r"<([^<>\n]+)>")
_EMOJI_CODE = re.compile(r":([a-z0-9_+\-]+):")
_CODE_SPLIT = re.compile(r"(```.*?```|`[^`\n]*`)", re.DOTALL)
# Slack only treats markers as formatting at word boundaries, so `my_package_name` or
# `2*3*4` stay untouched.
_BOLD = re.compile(r"(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![\w*])")
_ITALIC = re.compile(r"(?<![\w_])_(?=\S)([^_\n]+?)(?<=\S)_(?![\w_])")
_STRIKE = re.compile(r"(?<![\w~])~(?=\S)([^~\n]+?)(?<=\S)~(?![\w~])")


def _zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def _ordinal(n: int) -> str:
    if 10 <= n % 100 <= 20:
        suffix = "th"
    else:
        suffix = {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _clock(moment: datetime, *, seconds: bool) -> str:
    hour = moment.hour % 12 or 12
    ampm = "AM" if moment.hour < 12 else "PM"
    if seconds:
        return f"{hour}:{moment.minute:02d}:{moment.second:02d} {ampm}"
    return f"{hour}:{moment.minute:02d} {ampm}"


def _pretty_day(day: date, today: date) -> str | None:
    if day == today:
        return "today"
    if day == today - timedelta(days=1):
        return "yesterday"
    if day == today + timedelta(days=1):
        return "tomorrow"
    return None


def _ago(moment: datetime, now: datetime) -> str:
    delta = (now - moment).total_seconds()
    future = delta < 0
    delta = abs(delta)
    if delta < 60:
        amount, unit = int(delta), "second"
    elif delta < 3600:
        amount, unit = int(delta // 60), "minute"
    elif delta < 86400:
        amount, unit = int(delta // 3600), "hour"
    elif delta < 86400 * 30:
        amount, unit = int(delta // 86400), "day"
    elif delta < 86400 * 365:
        amount, unit = int(delta // (86400 * 30)), "month"
    else:
        amount, unit = int(delta // (86400 * 365)), "year"
    if amount == 0 and unit == "second":
        return "just now"
    words = f"{amount} {unit}{'' if amount == 1 else 's'}"
    return f"in {words}" if future else f"{words} ago"


def format_slack_date(epoch: int | float, fmt: str, *, ctx: RenderContext) -> str:
    """Expand the tokens of a `<!date^epoch^fmt>` as the Slack client does for this viewer."""
    zone = _zone(ctx.tz)
    moment = datetime.fromtimestamp(epoch, tz=zone)
    now = (ctx.now or datetime.now(UTC)).astimezone(zone)
    long_date = f"{moment:%B} {_ordinal(moment.day)}, {moment.year}"
    short_date = f"{moment:%b} {moment.day}, {moment.year}"
    full_date = f"{moment:%A}, {long_date}"
    pretty = _pretty_day(moment.date(), now.date())
    tokens = {
        "date_num": f"{moment:%Y-%m-%d}",
        "date": long_date,
        "date_short": short_date,
        "date_long": full_date,
        "date_pretty": pretty or long_date,
        "date_short_pretty": pretty or short_date,
        "date_long_pretty": pretty or full_date,
        "time": _clock(moment, seconds=False),
        "time_secs": _clock(moment, seconds=True),
        "ago": _ago(moment, now),
    }
    return re.sub(r"\{(\w+)\}", lambda m: tokens.get(m.group(1), m.group(0)), fmt)


def _replace_token(body: str, ctx: RenderContext) -> str:
    target, _, label = body.partition("|")
    if target.startswith("@"):
        user_id = target[1:]
        return "@" + (ctx.user_names.get(user_id) or label or user_id)
    if target.startswith("#"):
        channel_id = target[1:]
        return "#" + (label or ctx.channel_names.get(channel_id) or channel_id)
    if target.startswith("!date^"):
        parts = target.split("^")
        try:
            epoch = float(parts[1])
            fmt = parts[2]
        except (IndexError, ValueError):
            return label or body
        return format_slack_date(epoch, fmt, ctx=ctx)
    if target.startswith("!subteam^"):
        return label or "@" + target.removeprefix("!subteam^")
    if target in ("!here", "!channel", "!everyone"):
        return "@" + target[1:]
    if target.startswith("!"):
        return label or target[1:]
    if target.startswith("mailto:") and not label:
        return target.removeprefix("mailto:")
    return label or target


def _emphasis(segment: str) -> str:
    segment = _BOLD.sub(r"\1", segment)
    segment = _ITALIC.sub(r"\1", segment)
    return _STRIKE.sub(r"\1", segment)


def emoji(text: str) -> str:
    """Replace known `:shortcode:` emoji with the character, leave the others alone."""
    return _EMOJI_CODE.sub(lambda m: _EMOJI.get(m.group(1), m.group(0)), text)


def mrkdwn_to_text(text: str, *, ctx: RenderContext) -> str:
    """Convert Slack mrkdwn to what a reader sees (formatting markers dropped, code kept)."""
    text = _TOKEN.sub(lambda m: _replace_token(m.group(1), ctx), text)
    parts = _CODE_SPLIT.split(text)
    # Odd indexes are code spans: Slack shows them verbatim, so only format the rest.
    out = [part if i % 2 else emoji(_emphasis(part)) for i, part in enumerate(parts)]
    return html.unescape("".join(out))


def text_of(obj: Any, *, ctx: RenderContext) -> str:
    """Text of a composition text object (plain_text or mrkdwn), or '' if absent."""
    if not isinstance(obj, Mapping):
        return "" if obj is None else str(obj)
    raw = str(obj.get("text", ""))
    if obj.get("type") == "mrkdwn":
        return mrkdwn_to_text(raw, ctx=ctx)
    return emoji(raw) if obj.get("emoji", True) else raw


# --------------------------------------------------------------------------------------------
# buttons and inputs


def _button_from(element: Mapping[str, Any], block_id: str | None, number: int) -> Button:
    label = str((element.get("text") or {}).get("text", ""))
    return Button(
        number=number,
        label=label,
        action_id=str(element.get("action_id", "")),
        block_id=block_id,
        value=element.get("value"),
        url=element.get("url"),
        style=element.get("style"),
    )


def _interactive_elements(blocks: Sequence[Mapping[str, Any]]) -> Iterable[tuple[str | None, JSON]]:
    for block in blocks:
        block_id = block.get("block_id")
        if block.get("type") == "actions":
            for element in block.get("elements") or []:
                yield block_id, element
        elif block.get("type") == "section" and isinstance(block.get("accessory"), Mapping):
            yield block_id, block["accessory"]


def buttons_of(message: Mapping[str, Any]) -> list[Button]:
    """All buttons of a message (actions blocks and section accessories), numbered from 1."""
    buttons: list[Button] = []
    for block_id, element in _interactive_elements(message.get("blocks") or []):
        if element.get("type") == "button":
            buttons.append(_button_from(element, block_id, len(buttons) + 1))
    return buttons


def _options(element: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    options: list[Mapping[str, Any]] = list(element.get("options") or [])
    for group in element.get("option_groups") or []:
        options.extend(group.get("options") or [])
    return tuple((str((o.get("text") or {}).get("text", "")), str(o.get("value", ""))) for o in options)


def _initial(element: Mapping[str, Any]) -> str | None:
    for key in (
        "initial_value",
        "initial_date",
        "initial_time",
        "initial_user",
        "initial_conversation",
        "initial_channel",
    ):
        if element.get(key) is not None:
            return str(element[key])
    if isinstance(element.get("initial_option"), Mapping):
        return str((element["initial_option"].get("text") or {}).get("text", ""))
    if element.get("initial_options"):
        return ", ".join(str((o.get("text") or {}).get("text", "")) for o in element["initial_options"])
    return None


def inputs_of(view: Mapping[str, Any]) -> list[InputField]:
    """The input blocks of a modal, in order."""
    fields: list[InputField] = []
    for block in view.get("blocks") or []:
        if block.get("type") != "input" or not isinstance(block.get("element"), Mapping):
            continue
        element = block["element"]
        placeholder = element.get("placeholder")
        hint = block.get("hint")
        fields.append(
            InputField(
                block_id=str(block.get("block_id", "")),
                action_id=str(element.get("action_id", "")),
                label=str((block.get("label") or {}).get("text", "")),
                element_type=str(element.get("type", "")),
                optional=bool(block.get("optional", False)),
                multiline=bool(element.get("multiline", False)),
                placeholder=str(placeholder.get("text")) if isinstance(placeholder, Mapping) else None,
                hint=str(hint.get("text")) if isinstance(hint, Mapping) else None,
                initial=_initial(element),
                options=_options(element),
                min_length=element.get("min_length"),
                max_length=element.get("max_length"),
            )
        )
    return fields


# --------------------------------------------------------------------------------------------
# blocks


def _element_label(element: Mapping[str, Any], *, ctx: RenderContext, number: int | None) -> str:
    kind = element.get("type")
    if kind == "button":
        label = text_of(element.get("text"), ctx=ctx)
        return f"[{number} {label}]" if number is not None else f"[{label}]"
    if kind == "overflow":
        return "[⋯ " + " | ".join(text for text, _ in _options(element)) + "]"
    if kind and str(kind).endswith("select"):
        chosen = _initial(element)
        placeholder = text_of(element.get("placeholder"), ctx=ctx)
        return f"[▾ {chosen or placeholder or 'select'}]"
    if kind == "datepicker":
        return f"[📅 {element.get('initial_date') or 'pick a date'}]"
    if kind == "image":
        return f"🖼 {element.get('alt_text', '')}"
    return f"[{kind}]"


def _indent(text: str, prefix: str) -> list[str]:
    return [prefix + line if line else prefix.rstrip() for line in text.split("\n")]


def _rich_text(elements: Sequence[Any], *, ctx: RenderContext) -> str:
    # rich_text nests sections/lists/quotes of leaf elements; flatten to text, one paragraph each.
    out: list[str] = []
    for element in elements:
        if not isinstance(element, Mapping):
            continue
        kind = element.get("type")
        if kind in ("rich_text_section", "rich_text_preformatted", "rich_text_quote"):
            out.append("".join(_rich_leaf(leaf, ctx=ctx) for leaf in element.get("elements") or []))
        elif kind == "rich_text_list":
            for item in element.get("elements") or []:
                out.append("• " + "".join(_rich_leaf(leaf, ctx=ctx) for leaf in item.get("elements") or []))
    return "\n".join(out)


def _rich_leaf(leaf: Mapping[str, Any], *, ctx: RenderContext) -> str:
    kind = leaf.get("type")
    if kind == "text":
        return str(leaf.get("text", ""))
    if kind == "link":
        return str(leaf.get("text") or leaf.get("url", ""))
    if kind == "user":
        uid = str(leaf.get("user_id", ""))
        return "@" + ctx.user_names.get(uid, uid)
    if kind == "channel":
        cid = str(leaf.get("channel_id", ""))
        return "#" + ctx.channel_names.get(cid, cid)
    if kind == "emoji":
        return emoji(f":{leaf.get('name', '')}:")
    if kind == "date":
        return format_slack_date(float(leaf.get("timestamp", 0)), str(leaf.get("format", "{date}")), ctx=ctx)
    return str(leaf.get("text", ""))


def render_blocks(blocks: Sequence[Mapping[str, Any]], *, ctx: RenderContext, number_buttons: bool = True) -> list[str]:
    """Lines for a list of blocks; buttons numbered across the whole list, as `buttons_of` does."""
    lines: list[str] = []
    counter = 0

    def next_number() -> int | None:
        nonlocal counter
        if not number_buttons:
            return None
        counter += 1
        return counter

    for block in blocks:
        kind = block.get("type")
        if kind == "header":
            lines.append(f"━━ {text_of(block.get('text'), ctx=ctx)} ━━")
        elif kind == "section":
            text = text_of(block.get("text"), ctx=ctx)
            accessory = block.get("accessory")
            suffix = ""
            if isinstance(accessory, Mapping):
                number = next_number() if accessory.get("type") == "button" else None
                suffix = _element_label(accessory, ctx=ctx, number=number)
            if text:
                text_lines = text.split("\n")
                if suffix:
                    text_lines[0] = f"{text_lines[0]}  {suffix}"
                lines.extend(text_lines)
            elif suffix:
                lines.append(suffix)
            for item in block.get("fields") or []:
                # Fields are usually "*Label*\nvalue": one line "Label value" reads best.
                lines.append("  " + " ".join(part.strip() for part in text_of(item, ctx=ctx).split("\n")))
        elif kind == "context":
            parts = [
                text_of(el, ctx=ctx)
                if el.get("type") in ("mrkdwn", "plain_text")
                else _element_label(el, ctx=ctx, number=None)
                for el in block.get("elements") or []
            ]
            lines.extend(_indent(" · ".join(p for p in parts if p), "  › "))
        elif kind == "divider":
            lines.append("─" * 40)
        elif kind == "actions":
            labels = []
            for element in block.get("elements") or []:
                number = next_number() if element.get("type") == "button" else None
                labels.append(_element_label(element, ctx=ctx, number=number))
            lines.append(" ".join(labels))
        elif kind == "image":
            title = text_of(block.get("title"), ctx=ctx)
            lines.append(f"🖼 {title or block.get('alt_text', '')}")
        elif kind == "input":
            label = text_of(block.get("label"), ctx=ctx)
            element = block.get("element") or {}
            optional = " (optional)" if block.get("optional") else " *"
            shown = _initial(element) or text_of(element.get("placeholder"), ctx=ctx) or ""
            lines.append(f"{label}{optional}: [{shown}]")
            if block.get("hint"):
                lines.append(f"  › {text_of(block.get('hint'), ctx=ctx)}")
        elif kind == "rich_text":
            lines.extend(_rich_text(block.get("elements") or [], ctx=ctx).split("\n"))
        elif kind == "markdown":
            lines.extend(mrkdwn_to_text(str(block.get("text", "")), ctx=ctx).split("\n"))
        elif kind == "file":
            lines.append(f"📎 remote file {block.get('external_id', '')}")
        else:
            lines.append(f"[{kind} block]")
    return lines


def render_file(file: Mapping[str, Any], *, preview_lines: int = FILE_PREVIEW_LINES) -> list[str]:
    """`📎 name (N bytes)` followed by the first lines of its text preview, if any."""
    name = file.get("name") or file.get("title") or file.get("id", "file")
    lines = [f"📎 {name} ({file.get('size', 0)} bytes)"]
    preview = file.get("preview")
    if isinstance(preview, str) and preview:
        shown = preview.split("\n")
        for line in shown[:preview_lines]:
            lines.append("   " + line)
        total = file.get("lines")
        if isinstance(total, int) and total > preview_lines:
            lines.append(f"   … {total - preview_lines} more lines")
    return lines


def render_message_body(message: Mapping[str, Any], *, ctx: RenderContext) -> str:
    """What Slack shows for a message: blocks if there are any, otherwise text; then files.

    Slack uses `text` only as the notification fallback when blocks are present, so it is not
    shown then.
    """
    blocks = message.get("blocks") or []
    lines = render_blocks(blocks, ctx=ctx) if blocks else []
    if not blocks and message.get("text"):
        lines = mrkdwn_to_text(str(message["text"]), ctx=ctx).split("\n")
    for file in message.get("files") or []:
        lines.extend(render_file(file))
    return "\n".join(lines)


def searchable_text(message: Mapping[str, Any], *, ctx: RenderContext) -> str:
    """Text that tours and searches match against: the fallback text plus the rendered body."""
    parts = []
    if message.get("text"):
        parts.append(mrkdwn_to_text(str(message["text"]), ctx=ctx))
    body = render_message_body(message, ctx=ctx)
    if body:
        parts.append(body)
    return "\n".join(parts)


def format_ts(ts: str, *, ctx: RenderContext) -> str:
    """A message timestamp as the viewer's local clock time."""
    try:
        moment = datetime.fromtimestamp(float(ts), tz=_zone(ctx.tz))
    except (TypeError, ValueError):
        return ts
    return _clock(moment, seconds=False)


def render_message(
    message: Mapping[str, Any],
    *,
    ctx: RenderContext,
    number: int | None = None,
    flags: Sequence[str] = (),
    indent: str = "",
) -> str:
    """A message with a header line (`#3 chatops · 10:32 AM  ✎ edited`) and its indented body."""
    author_id = str(message.get("user") or message.get("bot_id") or "")
    author = ctx.user_names.get(author_id, message.get("username") or author_id or "slack")
    head = f"#{number} " if number is not None else ""
    when = format_ts(str(message.get("ts", "")), ctx=ctx)
    header = f"{indent}{head}{author} · {when}"
    if flags:
        header += "  " + "  ".join(flags)
    body = render_message_body(message, ctx=ctx)
    lines = [header, *(_indent(body, indent + "  ") if body else [])]
    return "\n".join(lines)


def render_view(view: Mapping[str, Any], *, ctx: RenderContext) -> str:
    """A modal: title bar, its blocks (inputs numbered), and its submit/close buttons."""
    title = text_of(view.get("title"), ctx=ctx)
    lines = [f"┌─ {title} " + "─" * max(4, 36 - len(title))]
    for line in render_blocks(view.get("blocks") or [], ctx=ctx, number_buttons=False):
        lines.append("│ " + line)
    submit = text_of(view.get("submit"), ctx=ctx)
    close = text_of(view.get("close"), ctx=ctx) or "Cancel"
    footer = f"[{close}]" + (f"  [{submit}]" if submit else "")
    lines.append("│ " + footer)
    lines.append("└" + "─" * 40)
    return "\n".join(lines)
