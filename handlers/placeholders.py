"""Commands listed in the manifest whose capability is not built yet answer honestly."""

from __future__ import annotations

from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncApp

from bot.slack.messages import NOT_YET


def register(app: AsyncApp) -> None:
    for name, text in NOT_YET.items():

        async def answer(ack: AsyncAck, command: dict[str, Any], _text: str = text) -> None:
            await ack(text=f":construction: {_text} `/push` works today.")

        app.command(name)(answer)
