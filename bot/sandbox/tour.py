"""Scripted tours: drive the bot through the sandbox's Slack and check what it shows.

A tour file is line based; blank lines and lines starting with `#` are ignored. Each other
line is one step (`{name}` anywhere is replaced by a value captured with `set ref`; inside
regular expressions the value is matched literally):

    as <user>                                  act as this user from now on (name or id)
    /<command> [text]                          run a slash command in the tour's channel
    expect-ephemeral <regex> [within <N>s]     an ephemeral answer to the last command/click/submit
                                               (ack body, response_url post or chat.postEphemeral)
                                               matches; default wait 10 s
    expect <regex> [in <channel>] [within <N>s]
                                               some message or thread reply posted during the tour
                                               matches in its current state (text + blocks
                                               rendered); default wait 30 s
    expect-file <regex> [in <channel>] [within <N>s]
                                               a file shared during the tour whose name or content
                                               matches; default wait 30 s
    click <label> [on <regex>]                 press the button with this label (case-insensitive;
                                               quote it if it contains " on ") on the newest
                                               message that has one, or whose text matches
                                               <regex>; waits up to 10 s for it to appear
    submit <field>=<value>[, <field>=<value>]  fill the newest open modal of the current user
                                               (fields by label or block_id; quote values with
                                               commas) and submit it; waits up to 10 s for it
    set ref <name> <regex> [within <N>s]       capture group 1 of <regex> from the newest matching
                                               message (or ephemeral of the current user); 10 s
    sleep <seconds>                            wait

Regexes are Python `re`, searched with DOTALL and MULTILINE, against text as rendered for the
current user (mrkdwn formatting removed, `<!date>` in their time zone, `<@U..>` as names).
`<channel>` is `#name` or a channel id.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bot.sandbox.fake_slack import FakeSlack, Message, View
from bot.sandbox.render import RenderContext, buttons_of, render_file, render_message, searchable_text
from bot.sandbox.slack_user import SlackUserAgent, SlackUserError

StepKind = Literal["as", "command", "expect_ephemeral", "expect", "expect_file", "click", "submit", "set_ref", "sleep"]

DEFAULT_EXPECT_S = 30.0
DEFAULT_EPHEMERAL_S = 10.0
DEFAULT_FIND_S = 10.0

_REF = re.compile(r"\{([A-Za-z_]\w*)\}")
_WITHIN = re.compile(r"^(?P<rest>.*?)\s+within\s+(?P<n>\d+(?:\.\d+)?)s$")
_IN_CHANNEL = re.compile(r"^(?P<rest>.*?)\s+in\s+(?P<channel>#[\w.-]+|[CDG][A-Z0-9]+)$")
_FLAGS = re.DOTALL | re.MULTILINE


class TourParseError(ValueError):
    """A tour line that cannot be understood; `line` is 1-based."""

    def __init__(self, line: int, message: str, text: str) -> None:
        super().__init__(f"line {line}: {message}: {text!r}")
        self.line = line
        self.text = text


@dataclass(frozen=True)
class Step:
    """One tour step; which fields are set depends on `kind`."""

    line: int
    kind: StepKind
    source: str
    user: str = ""
    command: str = ""
    text: str = ""
    pattern: str = ""
    within: float = 0.0
    channel: str | None = None
    label: str = ""
    on: str | None = None
    values: tuple[tuple[str, str], ...] = ()
    name: str = ""
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------
# parsing


def _split_within(rest: str, default: float) -> tuple[str, float]:
    match = _WITHIN.match(rest)
    if match:
        return match.group("rest"), float(match.group("n"))
    return rest, default


def _split_channel(rest: str) -> tuple[str, str | None]:
    match = _IN_CHANNEL.match(rest)
    if match:
        return match.group("rest"), match.group("channel")
    return rest, None


def _check_regex(pattern: str, *, refs: set[str], line: int, source: str, groups: int = 0) -> None:
    for name in _REF.findall(pattern):
        if name not in refs:
            raise TourParseError(line, f"unknown ref {{{name}}} (capture it first with 'set ref {name} ...')", source)
    if not pattern:
        raise TourParseError(line, "missing regex", source)
    try:
        compiled = re.compile(_REF.sub("x", pattern), _FLAGS)
    except re.error as exc:
        raise TourParseError(line, f"bad regex ({exc})", source) from exc
    if compiled.groups < groups:
        raise TourParseError(line, "regex needs a (group) to capture", source)


def _check_refs(text: str, *, refs: set[str], line: int, source: str) -> None:
    for name in _REF.findall(text):
        if name not in refs:
            raise TourParseError(line, f"unknown ref {{{name}}} (capture it first with 'set ref {name} ...')", source)


def _split_values(text: str, *, line: int, source: str) -> tuple[tuple[str, str], ...]:
    # `a=1, b="x, y"`: commas inside double quotes belong to the value.
    items: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
            current.append(char)
        elif char == "," and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if quoted:
        raise TourParseError(line, "unbalanced quote", source)
    items.append("".join(current))
    values: list[tuple[str, str]] = []
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise TourParseError(line, f"expected <field>=<value>, got {item.strip()!r}", source)
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        values.append((key, value))
    return tuple(values)


def _parse_line(lineno: int, source: str, refs: set[str]) -> Step:
    if source.startswith("/"):
        command, _, text = source.partition(" ")
        if not re.fullmatch(r"/[\w.-]+", command):
            raise TourParseError(lineno, "bad slash command name", source)
        _check_refs(text, refs=refs, line=lineno, source=source)
        return Step(lineno, "command", source, command=command, text=text.strip())
    keyword, _, rest = source.partition(" ")
    rest = rest.strip()
    if keyword == "as":
        if not rest or " " in rest:
            raise TourParseError(lineno, "expected: as <user>", source)
        return Step(lineno, "as", source, user=rest)
    if keyword in ("expect", "expect-file", "expect-ephemeral"):
        default = DEFAULT_EPHEMERAL_S if keyword == "expect-ephemeral" else DEFAULT_EXPECT_S
        pattern, within = _split_within(rest, default)
        channel = None
        if keyword != "expect-ephemeral":
            pattern, channel = _split_channel(pattern)
        _check_regex(pattern, refs=refs, line=lineno, source=source)
        kind: StepKind = "expect"
        if keyword == "expect-file":
            kind = "expect_file"
        elif keyword == "expect-ephemeral":
            kind = "expect_ephemeral"
        return Step(lineno, kind, source, pattern=pattern, within=within, channel=channel)
    if keyword == "click":
        label, on = rest, None
        quoted = re.fullmatch(r'"([^"]+)"(?:\s+on\s+(.+))?', rest)
        if quoted:
            label, on = quoted.group(1), quoted.group(2)
        elif " on " in rest:
            label, _, on = rest.partition(" on ")
        label = label.strip()
        if not label:
            raise TourParseError(lineno, "expected: click <label> [on <regex>]", source)
        _check_refs(label, refs=refs, line=lineno, source=source)
        if on is not None:
            on = on.strip()
            _check_regex(on, refs=refs, line=lineno, source=source)
        return Step(lineno, "click", source, label=label, on=on)
    if keyword == "submit":
        if not rest:
            raise TourParseError(lineno, "expected: submit <field>=<value>[, ...]", source)
        values = _split_values(rest, line=lineno, source=source)
        for key, value in values:
            _check_refs(key + value, refs=refs, line=lineno, source=source)
        return Step(lineno, "submit", source, values=values)
    if keyword == "set":
        match = re.fullmatch(r"ref\s+([A-Za-z_]\w*)\s+(.+)", rest)
        if not match:
            raise TourParseError(lineno, "expected: set ref <name> <regex-with-one-group>", source)
        pattern, within = _split_within(match.group(2).strip(), DEFAULT_FIND_S)
        _check_regex(pattern, refs=refs, line=lineno, source=source, groups=1)
        return Step(lineno, "set_ref", source, name=match.group(1), pattern=pattern, within=within)
    if keyword == "sleep":
        try:
            seconds = float(rest.removesuffix("s"))
        except ValueError:
            raise TourParseError(lineno, "expected: sleep <seconds>", source) from None
        if seconds < 0:
            raise TourParseError(lineno, "sleep needs a non-negative number", source)
        return Step(lineno, "sleep", source, seconds=seconds)
    known = "as, /<command>, expect, expect-ephemeral, expect-file, click, submit, set ref, sleep"
    raise TourParseError(lineno, f"unknown step {keyword!r} (known: {known})", source)


def parse_tour(text: str) -> list[Step]:
    """Parse a tour; raises `TourParseError` naming the first bad line."""
    steps: list[Step] = []
    refs: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), start=1):
        source = raw.strip()
        if not source or source.startswith("#"):
            continue
        step = _parse_line(lineno, source, refs)
        if step.kind == "set_ref":
            refs.add(step.name)
        steps.append(step)
    return steps


# --------------------------------------------------------------------------------------------
# running


class _StepFailed(Exception):
    def __init__(self, why: str, details: list[str] | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.details = details or []


@dataclass
class _Run:
    agent: SlackUserAgent
    slack: FakeSlack
    channel: str
    output: Callable[[str], object]
    user: str = ""
    refs: dict[str, str] = field(default_factory=dict)
    start_seq: int = 0
    interaction_seq: int = 0

    # -- helpers ---------------------------------------------------------------------------

    def subst(self, text: str, *, regex: bool) -> str:
        def value(match: re.Match[str]) -> str:
            captured = self.refs.get(match.group(1))
            if captured is None:
                return match.group(0)
            return re.escape(captured) if regex else captured

        return _REF.sub(value, text)

    def ctx(self) -> RenderContext:
        return self.slack.render_context(self.user)

    def channel_id(self, channel: str | None) -> str:
        if channel is None:
            return self.channel
        if channel.startswith("#"):
            for cid, info in self.slack.channels.items():
                if info["name"] == channel[1:]:
                    return cid
            raise _StepFailed(f"no channel {channel}")
        return channel

    def since_start(self, channel: str) -> list[Message]:
        return [m for m in self.slack.channel_messages(channel, viewer=self.user) if m.history[0].seq >= self.start_seq]

    def render(self, messages: list[Message], *, limit: int = 5) -> list[str]:
        ctx = self.ctx()
        lines: list[str] = []
        for message in messages[-limit:]:
            flags = ["(only visible to you)"] if message.ephemeral_for else []
            if message.is_reply:
                flags.append("(thread reply)")
            rendered = render_message(self.slack.message_payload(message), ctx=ctx, flags=flags, indent="    ")
            lines.extend(rendered.split("\n"))
        return lines or ["    (no messages)"]

    def text_of(self, message: Message) -> str:
        return searchable_text(self.slack.message_payload(message), ctx=self.ctx())

    # -- steps -----------------------------------------------------------------------------

    async def run_step(self, step: Step) -> str | None:
        """Run one step; returns an optional note for the ✓ line, raises _StepFailed."""
        handler = getattr(self, f"step_{step.kind}")
        return await handler(step)  # type: ignore[no-any-return]

    async def step_as(self, step: Step) -> str | None:
        user = self.slack.user_by_name(self.subst(step.user, regex=False))
        if user is None:
            known = ", ".join(u["name"] for u in self.slack.users.values() if not u["is_bot"])
            raise _StepFailed(f"no user {step.user!r} (known: {known})")
        self.user = user["id"]
        return None

    async def step_command(self, step: Step) -> str | None:
        self.interaction_seq = len(self.slack.events)
        result = await self.agent.command(
            user=self.user, channel=self.channel, command=step.command, text=self.subst(step.text, regex=False)
        )
        if not result.ok:
            why = "the bot did not answer within 3 s" if result.timed_out else f"the bot answered HTTP {result.status}"
            raise _StepFailed(why, [f"    {result.body[:500]}"] if result.body else [])
        return None

    async def step_expect_ephemeral(self, step: Step) -> str | None:
        pattern = re.compile(self.subst(step.pattern, regex=True), _FLAGS)

        def answers() -> list[Message]:
            return [
                m
                for m in self.slack.channel_messages(self.channel, viewer=self.user)
                if m.history[-1].seq >= self.interaction_seq
                and (m.ephemeral_for == self.user or m.source in ("ack", "response_url"))
            ]

        def found() -> Message | None:
            return next((m for m in reversed(answers()) if pattern.search(self.text_of(m))), None)

        if await self.slack.wait_for(found, step.within) is None:
            raise _StepFailed(f"no ephemeral answer matched within {step.within:g}s", self.render(answers()))
        return None

    async def step_expect(self, step: Step) -> str | None:
        pattern = re.compile(self.subst(step.pattern, regex=True), _FLAGS)
        channel = self.channel_id(step.channel)

        def candidates() -> list[Message]:
            return [m for m in self.since_start(channel) if m.ephemeral_for is None]

        def found() -> Message | None:
            return next((m for m in reversed(candidates()) if pattern.search(self.text_of(m))), None)

        if await self.slack.wait_for(found, step.within) is None:
            raise _StepFailed(
                f"no message matched within {step.within:g}s; newest messages:", self.render(candidates())
            )
        return None

    async def step_expect_file(self, step: Step) -> str | None:
        pattern = re.compile(self.subst(step.pattern, regex=True), _FLAGS)
        channel = self.channel_id(step.channel)

        def shared() -> list[str]:
            return [f["id"] for m in self.since_start(channel) for f in m.files]

        def found() -> str | None:
            for file_id in reversed(shared()):
                stored = self.slack.files.get(file_id)
                if stored and (pattern.search(stored.name) or pattern.search(stored.text() or "")):
                    return file_id
            return None

        if await self.slack.wait_for(found, step.within) is None:
            details = [
                "    " + line
                for file_id in shared()
                for line in render_file(self.slack.file_payload(self.slack.files[file_id]))
            ]
            raise _StepFailed(f"no file matched within {step.within:g}s", details or ["    (no files shared)"])
        return None

    async def step_click(self, step: Step) -> str | None:
        label = self.subst(step.label, regex=False)
        on = re.compile(self.subst(step.on, regex=True), _FLAGS) if step.on else None

        def target() -> tuple[Message, str] | None:
            for message in reversed(self.since_start(self.channel)):
                if on is not None and not on.search(self.text_of(message)):
                    continue
                for button in buttons_of(self.slack.message_payload(message)):
                    if button.label.strip().lower() == label.strip().lower():
                        return message, button.label
            return None

        found = await self.slack.wait_for(target, DEFAULT_FIND_S)
        if found is None:
            with_buttons = [m for m in self.since_start(self.channel) if m.blocks and buttons_of({"blocks": m.blocks})]
            where = f" on a message matching /{step.on}/" if step.on else ""
            raise _StepFailed(f"no button {label!r}{where}", self.render(with_buttons))
        message, _ = found
        self.interaction_seq = len(self.slack.events)
        result = await self.agent.click_label(user=self.user, channel=self.channel, label=label, message_ts=message.ts)
        if not result.ok:
            raise _StepFailed(f"the bot answered the click with HTTP {result.status}", [f"    {result.body[:500]}"])
        return None

    async def step_submit(self, step: Step) -> str | None:
        def open_view() -> View | None:
            view = self.slack.latest_view_for(self.user)
            if view is None:
                return None
            opened = next((e.seq for e in self.slack.events if e.kind == "view_opened" and e.view is view), -1)
            return view if opened >= self.start_seq else None

        view = await self.slack.wait_for(open_view, DEFAULT_FIND_S)
        if view is None:
            raise _StepFailed("no modal is open for this user")
        values = {self.subst(k, regex=False): self.subst(v, regex=False) for k, v in step.values}
        self.interaction_seq = len(self.slack.events)
        try:
            result = await self.agent.submit_view(user=self.user, view_id=view.id, values=values)
        except SlackUserError as exc:
            raise _StepFailed(str(exc)) from exc
        if result.errors:
            details = [f"    {block}: {message}" for block, message in result.errors.items()]
            raise _StepFailed("the modal refused the input", details)
        if result.status != 200:
            raise _StepFailed(
                f"the bot answered the submission with HTTP {result.status}", [f"    {result.body[:500]}"]
            )
        return None

    async def step_set_ref(self, step: Step) -> str | None:
        pattern = re.compile(self.subst(step.pattern, regex=True), _FLAGS)

        def capture() -> str | None:
            for message in reversed(self.since_start(self.channel)):
                match = pattern.search(self.text_of(message))
                if match and match.group(1) is not None:
                    return match.group(1)
            return None

        value = await self.slack.wait_for(capture, step.within)
        if value is None:
            raise _StepFailed(
                f"no message matched within {step.within:g}s", self.render(self.since_start(self.channel))
            )
        self.refs[step.name] = value
        return f"{step.name} = {value}"

    async def step_sleep(self, step: Step) -> str | None:
        await asyncio.sleep(step.seconds)
        return None


async def run_tour(
    path: Path,
    *,
    agent: SlackUserAgent,
    slack: FakeSlack,
    channel: str,
    output: Callable[[str], object] = print,
) -> bool:
    """Run the tour in `path` against the bot; prints one line per step, stops at the first failure."""
    try:
        # Read off the event loop: the bot and the fake Slack share it.
        text = await asyncio.to_thread(Path(path).read_text, encoding="utf-8")
        steps = parse_tour(text)
    except TourParseError as exc:
        output(f"✗ {path}:{exc.line}: {exc}")
        return False
    except OSError as exc:
        output(f"✗ cannot read tour {path}: {exc}")
        return False
    first_user = next((uid for uid, u in slack.users.items() if not u["is_bot"]), "")
    run = _Run(
        agent=agent,
        slack=slack,
        channel=channel,
        output=output,
        user=first_user,
        start_seq=len(slack.events),
        interaction_seq=len(slack.events),
    )
    for step in steps:
        shown = run.subst(step.source, regex=False)
        try:
            note = await run.run_step(step)
        except _StepFailed as exc:
            output(f"✗ {shown} (line {step.line}): {exc.why}")
            for line in exc.details:
                output(line)
            return False
        except SlackUserError as exc:
            output(f"✗ {shown} (line {step.line}): {exc}")
            return False
        output(f"✓ {shown}" + (f"  → {note}" if note else ""))
    output(f"tour passed: {len(steps)} steps")
    return True


__all__ = ["Step", "TourParseError", "parse_tour", "run_tour"]
