"""Small Block Kit constructors that keep every value inside Slack's limits (SPEC §12)."""

from __future__ import annotations

from typing import Any

SECTION_TEXT_MAX = 3000
FIELD_TEXT_MAX = 2000
BUTTON_TEXT_MAX = 75
BUTTON_VALUE_MAX = 2000
MAX_FIELDS = 10
MAX_BLOCKS = 50
MAX_ACTIONS = 25
HEADER_MAX = 150
CONTEXT_ELEMENTS_MAX = 10
MESSAGE_TEXT_MAX = 3900  # fallback text; Slack truncates past 40,000 but notifications want it short

Block = dict[str, Any]


def escape(text: str) -> str:
    """Slack's three control characters; anything a user or Salesforce wrote goes through this,
    so that text such as ``<!channel>`` or ``<version>`` shows as typed instead of acting."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def header(text: str) -> Block:
    return {"type": "header", "text": {"type": "plain_text", "text": clip(text, HEADER_MAX), "emoji": True}}


def section(text: str, *, fields: list[str] | None = None, block_id: str | None = None) -> Block:
    block: Block = {"type": "section", "text": {"type": "mrkdwn", "text": clip(text, SECTION_TEXT_MAX)}}
    if fields:
        block["fields"] = [{"type": "mrkdwn", "text": clip(f, FIELD_TEXT_MAX)} for f in fields[:MAX_FIELDS]]
    if block_id:
        block["block_id"] = block_id[:255]
    return block


def fields_section(fields: list[str]) -> Block:
    return {
        "type": "section",
        "fields": [{"type": "mrkdwn", "text": clip(f, FIELD_TEXT_MAX)} for f in fields[:MAX_FIELDS]],
    }


def context(*texts: str) -> Block:
    return {
        "type": "context",
        "elements": [{"type": "mrkdwn", "text": clip(t, SECTION_TEXT_MAX)} for t in texts[:CONTEXT_ELEMENTS_MAX]],
    }


def divider() -> Block:
    return {"type": "divider"}


def button(
    text: str, *, action_id: str, value: str, style: str | None = None, confirm: tuple[str, str, str] | None = None
) -> Block:
    element: Block = {
        "type": "button",
        "text": {"type": "plain_text", "text": clip(text, BUTTON_TEXT_MAX), "emoji": True},
        "action_id": action_id[:255],
        "value": value[:BUTTON_VALUE_MAX],
    }
    if style:
        element["style"] = style
    if confirm:
        title, body, ok = confirm
        element["confirm"] = {
            "title": {"type": "plain_text", "text": clip(title, 100)},
            "text": {"type": "mrkdwn", "text": clip(body, 300)},
            "confirm": {"type": "plain_text", "text": clip(ok, 30)},
            "deny": {"type": "plain_text", "text": "Keep it"},
        }
    return element


def actions(elements: list[Block], *, block_id: str | None = None) -> Block:
    block: Block = {"type": "actions", "elements": elements[:MAX_ACTIONS]}
    if block_id:
        block["block_id"] = block_id[:255]
    return block


def limit_blocks(blocks: list[Block]) -> list[Block]:
    """Keep the first 49 blocks and say that the rest were left out."""
    if len(blocks) <= MAX_BLOCKS:
        return blocks
    return [*blocks[: MAX_BLOCKS - 1], context(f"…{len(blocks) - MAX_BLOCKS + 1} more blocks left out")]


def progress_bar(done: int, total: int, *, width: int = 20) -> str:
    if total <= 0:
        return "░" * width
    filled = min(width, round(width * done / total))
    return "█" * filled + "░" * (width - filled)
