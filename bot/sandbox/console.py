"""The interactive console that plays Slack in the embedded sandbox.

You type slash commands as one of the workspace's users, see the bot's messages as they arrive
(rendered by `bot.sandbox.render`), press buttons and fill modals. New and edited messages are
picked up from the `FakeSlack` event log by a background task, so a status card the poller edits
shows up as "✎ edited" while you wait at the prompt.

Works with a pipe as well as a terminal: input is read off the event loop (the bot runs on it),
and end of input waits for the bot to go quiet, then quits.
"""

from __future__ import annotations

import asyncio
import inspect
import shlex
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bot.sandbox.fake_slack import Event, FakeSlack, Message, View
from bot.sandbox.render import (
    Button,
    InputField,
    buttons_of,
    inputs_of,
    render_file,
    render_message,
    render_view,
)
from bot.sandbox.slack_user import SlackUserAgent, SlackUserError

InputFunc = Callable[[str], str] | Callable[[str], Awaitable[str]]
OutputFunc = Callable[[str], object]

POLL_S = 0.3
HELP = """\
Commands:
  /<command> [text]           run a slash command as the current user (e.g. /push list)
  as <user>                   act as another user
  users                       list the users you can act as
  click <n|label> [<msg#>]    press button n (or the one labelled so) on message #msg
                              (default: the newest message with that button)
  show [<msg#>]               show a message again, with its thread
  thread <msg#>               show the replies in a message's thread
  files                       list the files the bot shared
  help                        this text
  quit                        leave (end of input does the same)
When the bot opens a modal you are asked for each field; 'cancel' closes the modal."""


def _read_in_thread(func: Callable[[str], str], prompt: str) -> asyncio.Future[str]:
    """Call a blocking input function without blocking the event loop (the bot runs on it).

    A daemon thread rather than the loop's default executor: asyncio.run() joins executor
    threads on exit, and one stuck in input() after Ctrl-C would keep the process alive.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()

    def settle(result: str | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result or "")

    def work() -> None:
        try:
            result, error = func(prompt), None
        except BaseException as exc:  # EOFError above all; handed to the awaiting coroutine
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the loop is gone: nobody is waiting for this line any more

    threading.Thread(target=work, name="console-input", daemon=True).start()
    return future


class _Cancelled(Exception):
    """The user closed a modal by typing 'cancel'."""


@dataclass
class _Console:
    agent: SlackUserAgent
    slack: FakeSlack
    channel: str
    users: dict[str, str]
    input_func: InputFunc
    output: OutputFunc
    user: str = ""
    cursor: int = 0
    numbers: dict[tuple[str, str], int] = field(default_factory=dict)
    by_number: list[tuple[str, str]] = field(default_factory=list)
    pending_views: list[View] = field(default_factory=list)
    echo: bool = False

    # -- users -------------------------------------------------------------------------------

    @property
    def user_name(self) -> str:
        return str(self.slack.users.get(self.user, {}).get("name", self.user))

    def resolve_user(self, name: str) -> str | None:
        key = name.lstrip("@")
        if key in self.users:
            return self.users[key]
        if key in self.users.values():
            return key
        found = self.slack.user_by_name(key)
        return str(found["id"]) if found and not found["is_bot"] else None

    @property
    def prompt(self) -> str:
        # e.g. "alice@#releases> ": who you are and where you type.
        name = self.slack.channels.get(self.channel, {}).get("name", self.channel)
        return f"{self.user_name}@#{name}> "

    # -- output of bot activity ----------------------------------------------------------------

    def number_of(self, message: Message) -> int:
        key = (message.channel, message.ts)
        if key not in self.numbers:
            self.by_number.append(key)
            self.numbers[key] = len(self.by_number)
        return self.numbers[key]

    def message_by_number(self, number: int) -> Message | None:
        if not 1 <= number <= len(self.by_number):
            return None
        channel, ts = self.by_number[number - 1]
        return self.slack.find_message(channel, ts)

    def flags(self, message: Message, *, edited: bool) -> list[str]:
        flags: list[str] = []
        if message.channel != self.channel:
            info = self.slack.channels.get(message.channel, {})
            flags.append(f"in #{info.get('name', message.channel)}")
        if message.is_reply:
            parent = self.slack.find_message(message.channel, message.thread_ts or "")
            flags.append(f"↳ thread of #{self.number_of(parent)}" if parent else "↳ in thread")
        if message.reply_broadcast:
            flags.append("(also sent to the channel)")
        if message.ephemeral_for is not None:
            if message.ephemeral_for == self.user:
                flags.append("(only visible to you)")
            else:
                name = self.slack.users.get(message.ephemeral_for, {}).get("name", message.ephemeral_for)
                flags.append(f"(only visible to {name})")
        if edited:
            flags.append("✎ edited")
        return flags

    def show_message(self, message: Message, *, edited: bool = False) -> None:
        number = self.number_of(message)
        indent = "    " if message.is_reply else ""
        self.output(
            render_message(
                self.slack.message_payload(message),
                ctx=self.slack.render_context(self.user),
                number=number,
                flags=self.flags(message, edited=edited),
                indent=indent,
            )
        )

    def show_view(self, view: View, *, note: str = "") -> None:
        who = self.slack.users.get(view.user, {}).get("name", view.user)
        self.output(f"🗔 modal for {who}{note}")
        self.output(render_view(view.payload, ctx=self.slack.render_context(self.user)))

    def drain(self) -> None:
        """Print what happened since the last look, once per message per batch."""
        events, self.cursor = self.slack.events_since(self.cursor)
        # Collapse a batch: a message posted and then edited three times prints once, in its
        # current state; it counts as edited only if it was on screen before this batch.
        batch: dict[tuple[str, str], Event] = {}
        views: list[Event] = []
        for event in events:
            if event.view is not None:
                views.append(event)
            elif event.message is not None:
                batch[(event.message.channel, event.message.ts)] = event
        for key, event in batch.items():
            message = event.message
            assert message is not None
            if event.kind == "deleted" or message.deleted:
                if key in self.numbers:
                    self.output(f"🗑 #{self.numbers[key]} was deleted")
                continue
            if message.ephemeral_for is not None and message.ephemeral_for not in self.users.values():
                continue
            self.show_message(message, edited=key in self.numbers)
        for event in views:
            view = event.view
            assert view is not None
            if event.kind == "view_opened":
                self.pending_views.append(view)
                self.show_view(view)
            elif event.kind == "view_updated" and not view.closed:
                self.show_view(view, note=" (updated)")
            elif event.kind == "view_closed":
                self.pending_views = [v for v in self.pending_views if v.id != view.id]

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            self.drain()

    async def settle(self, *, quiet: float = POLL_S, limit: float = 1.5) -> None:
        # Give the bot a moment so its immediate answers print before the next prompt.
        await self.slack.wait_quiet(quiet=quiet, limit=limit)
        self.drain()

    # -- input -------------------------------------------------------------------------------

    async def read(self, prompt: str) -> str:
        if inspect.iscoroutinefunction(self.input_func):
            line = await self.input_func(prompt)
        else:
            line = await _read_in_thread(self.input_func, prompt)  # type: ignore[arg-type]
        assert isinstance(line, str)
        if self.echo:
            self.output(line)
        return line

    # -- commands ------------------------------------------------------------------------------

    async def run(self) -> None:
        name = self.slack.channels.get(self.channel, {}).get("name", self.channel)
        self.output(f"Sandbox Slack — you are {self.user_name} in #{name}.")
        self.output("Type a slash command such as /push list, or 'help'.")
        watcher = asyncio.create_task(self.watch())
        try:
            while True:
                await self.settle()
                try:
                    await self.fill_pending_views()
                    line = (await self.read(self.prompt)).strip()
                except EOFError:
                    await self.settle(quiet=1.0, limit=10.0)
                    break
                if not line:
                    continue
                if line in ("quit", "exit"):
                    break
                try:
                    await self.dispatch(line)
                except SlackUserError as exc:
                    self.output(f"⚠ {exc}")
        finally:
            watcher.cancel()
            try:
                await watcher
            except asyncio.CancelledError:
                pass
            self.drain()

    async def dispatch(self, line: str) -> None:
        if line.startswith("/"):
            command, _, text = line.partition(" ")
            result = await self.agent.command(user=self.user, channel=self.channel, command=command, text=text.strip())
            if not result.ok and not result.timed_out and result.status:
                self.output(f"⚠ the bot answered HTTP {result.status}")
            return
        word, _, rest = line.partition(" ")
        rest = rest.strip()
        if word == "as":
            uid = self.resolve_user(rest)
            if uid is None:
                self.output(f"⚠ no user {rest!r}; try 'users'")
                return
            self.user = uid
            self.output(f"now acting as {self.user_name} ({self.slack.users[uid]['tz']})")
        elif word == "users":
            for name, uid in self.users.items():
                mark = "*" if uid == self.user else " "
                tz = self.slack.users.get(uid, {}).get("tz", "?")
                self.output(f" {mark} {name:<10} {uid:<12} {tz}")
        elif word == "click":
            await self.click(rest)
        elif word == "show":
            self.show(rest)
        elif word == "thread":
            self.thread(rest)
        elif word == "files":
            self.files()
        elif word == "help":
            self.output(HELP)
        else:
            self.output(f"⚠ unknown command {word!r}; type 'help'")

    def parse_number(self, text: str) -> int | None:
        text = text.lstrip("#")
        return int(text) if text.isdigit() else None

    def visible(self, message: Message) -> bool:
        return message.ephemeral_for in (None, self.user)

    async def click(self, rest: str) -> None:
        try:
            tokens = shlex.split(rest)
        except ValueError:
            tokens = rest.split()
        if not tokens:
            self.output("⚠ usage: click <n|label> [<message#>]")
            return
        message_number: int | None = None
        if len(tokens) > 1 and self.parse_number(tokens[-1]) is not None:
            message_number = self.parse_number(tokens.pop())
        wanted = " ".join(tokens)
        target = self.find_button(wanted, message_number)
        if target is None:
            where = f" on #{message_number}" if message_number else ""
            self.output(f"⚠ no button {wanted!r}{where}")
            return
        message, button = target
        result = await self.agent.click(
            user=self.user,
            channel=message.channel,
            message_ts=message.ts,
            action_id=button.action_id,
            value=button.value,
            block_id=button.block_id,
            text=button.label,
        )
        if not result.ok:
            # Slack shows a warning sign next to the button when the app does not answer.
            reason = "did not answer in time" if result.timed_out else f"answered HTTP {result.status}"
            self.output(f"⚠ [{button.label}] failed: the bot {reason}")

    def find_button(self, wanted: str, message_number: int | None) -> tuple[Message, Button] | None:
        if message_number is not None:
            message = self.message_by_number(message_number)
            candidates = [message] if message is not None and self.visible(message) else []
        else:
            candidates = [m for key in reversed(self.by_number) if (m := self.slack.find_message(*key))]
            candidates = [m for m in candidates if self.visible(m)]
        number = self.parse_number(wanted)
        for message in candidates:
            buttons = buttons_of(self.slack.message_payload(message))
            for button in buttons:
                if button.label.strip().lower() == wanted.strip().lower():
                    return message, button
            if number is not None and buttons:
                if number <= len(buttons):
                    return message, buttons[number - 1]
                if message_number is not None:
                    return None
        return None

    def show(self, rest: str) -> None:
        number = self.parse_number(rest) if rest else len(self.by_number)
        message = self.message_by_number(number or 0)
        if message is None:
            self.output(f"⚠ no message #{rest}" if rest else "⚠ no messages yet")
            return
        if message.is_reply:
            parent = self.slack.find_message(message.channel, message.thread_ts or "")
            message = parent or message
        self.show_message(message)
        for reply in self.slack.thread_replies(message.channel, message.ts):
            if self.visible(reply):
                self.show_message(reply)

    def thread(self, rest: str) -> None:
        number = self.parse_number(rest)
        message = self.message_by_number(number or 0)
        if message is None:
            self.output("⚠ usage: thread <message#>")
            return
        replies = [r for r in self.slack.thread_replies(message.channel, message.thread_ts or message.ts)]
        if not replies:
            self.output(f"#{number} has no replies")
        for reply in replies:
            if self.visible(reply):
                self.show_message(reply)

    def files(self) -> None:
        shared = [f for f in self.slack.files.values() if f.content is not None]
        if not shared:
            self.output("no files yet")
        for stored in shared:
            where = ", ".join("#" + self.slack.channels.get(c, {}).get("name", c) for c in stored.channels) or "private"
            message = self.slack.find_message(stored.channels[0], stored.message_ts or "") if stored.channels else None
            if message is not None:
                where += f" (message #{self.number_of(message)})"
            lines = render_file(self.slack.file_payload(stored))
            self.output(f"{lines[0]} in {where}")
            for line in lines[1:]:
                self.output(line)

    # -- modals ----------------------------------------------------------------------------------

    async def fill_pending_views(self) -> None:
        while True:
            view = next((v for v in self.pending_views if v.user == self.user and not v.closed), None)
            if view is None:
                return
            self.pending_views.remove(view)
            await self.fill_view(view)
            await self.settle()

    async def ask(self, field_: InputField, error: str | None = None) -> str | None:
        if error:
            self.output(f"  ⚠ {field_.label}: {error}")
        if field_.options:
            for i, (text, _) in enumerate(field_.options, start=1):
                self.output(f"    {i}. {text}")
        extras = []
        if field_.optional:
            extras.append("optional")
        if field_.initial:
            extras.append(f"default {field_.initial}")
        if field_.hint:
            extras.append(field_.hint)
        suffix = f" ({'; '.join(extras)})" if extras else ""
        while True:
            raw = (await self.read(f"  {field_.label}{suffix}: ")).strip()
            if raw.lower() == "cancel":
                raise _Cancelled
            if raw and field_.options and raw.isdigit() and 1 <= int(raw) <= len(field_.options):
                raw = field_.options[int(raw) - 1][0]
            if raw or field_.optional or field_.initial:
                return raw or None
            self.output("  ⚠ this field is required (or type 'cancel' to close the modal)")

    async def fill_view(self, view: View) -> None:
        self.output(f"Fill in '{view.payload.get('title', {}).get('text', 'modal')}' ('cancel' closes it):")
        fields = inputs_of(view.payload)
        values: dict[str, str] = {}
        errors: dict[str, str] = {}
        to_ask = fields
        try:
            while True:
                for field_ in to_ask:
                    answer = await self.ask(field_, errors.get(field_.block_id))
                    if answer is None:
                        values.pop(field_.block_id, None)
                    else:
                        values[field_.block_id] = answer
                try:
                    result = await self.agent.submit_view(user=self.user, view_id=view.id, values=values)
                except SlackUserError as exc:
                    self.output(f"  ⚠ {exc}")
                    errors, to_ask = {}, fields
                    continue
                if result.errors:
                    errors = result.errors
                    to_ask = [f for f in fields if f.block_id in errors] or fields
                    continue
                if not result.ok:
                    self.output(f"  ⚠ the bot answered HTTP {result.status}; the modal stays open")
                    raise _Cancelled
                if not result.closed:
                    updated = self.slack.views.get(view.id)
                    if updated is not None and not updated.closed:
                        self.pending_views.append(updated)
                return
        except (_Cancelled, EOFError):
            # Closing the modal in Slack sends nothing to the app unless notify_on_close.
            self.slack.close_view(view.id)
            self.output("  modal closed")
            if sys.exc_info()[0] is EOFError:
                raise


async def run_console(
    *,
    agent: SlackUserAgent,
    slack: FakeSlack,
    channel: str,
    users: dict[str, str],
    input_func: InputFunc = input,
    output: OutputFunc = print,
) -> None:
    """Play Slack in a terminal (or from a pipe) until `quit` or end of input.

    `users` maps the names you can act as to Slack user ids, e.g. {"alice": "U0ALICE"}; the
    first one is the initial user. Empty means every human user of the fake Slack.
    """
    users = dict(users) or slack.people()
    console = _Console(
        agent=agent,
        slack=slack,
        channel=channel,
        users=dict(users),
        input_func=input_func,
        output=output,
        user=next(iter(users.values()), ""),
        cursor=len(slack.events),
        # When stdin is a pipe, input() does not echo the line; echo it for a readable transcript.
        echo=input_func is input and not sys.stdin.isatty(),
    )
    await console.run()
