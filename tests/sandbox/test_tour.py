"""Tour files, the console and rendering, against the same tiny Bolt app as test_fake_slack."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

import bot.sandbox.tour as tour_module
from bot.sandbox.console import run_console
from bot.sandbox.render import RenderContext, buttons_of, mrkdwn_to_text, render_message, render_view
from bot.sandbox.tour import TourParseError, parse_tour, run_tour
from tests.sandbox.test_fake_slack import CHANNEL, REASON_MODAL, Env, card_blocks, env  # noqa: F401

PASSING_TOUR = """\
# A full walk through the echo app.
as alice
/echo release-42
expect-ephemeral ^echo: release-42$
expect Echo card.*Echo: release-42 within 5s
set ref card_name Echo: (release-\\d+)
as bob
click Approve on Echo: {card_name}
expect Approved by @bob within 5s
expect thread: approved, deploying
expect-file result\\.csv within 5s
expect-file 00D000000000002,failed

as carol
/echo later
expect-ephemeral answered later for @carol
/echo modal
submit Reason="bad, very bad", Notify=Everyone
expect modal said: bad, very bad within 5s
"""

FAILING_TOUR = """\
as alice
/echo one

# this line is 5, and it is the one that fails
expect nothing like this within 0.5s
/echo never-run
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "walk.tour"
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------
# parsing


def test_parse_tour_grammar() -> None:
    steps = parse_tour(PASSING_TOUR)
    kinds = [s.kind for s in steps]
    assert kinds[:6] == ["as", "command", "expect_ephemeral", "expect", "set_ref", "as"]
    command = steps[1]
    assert (command.command, command.text, command.line) == ("/echo", "release-42", 3)
    assert steps[3].within == 5.0 and steps[3].pattern == "Echo card.*Echo: release-42"
    assert steps[2].within == 10.0
    click = steps[6]
    assert (click.label, click.on) == ("Approve", "Echo: {card_name}")
    submit = next(s for s in steps if s.kind == "submit")
    assert submit.values == (("Reason", "bad, very bad"), ("Notify", "Everyone"))

    more = parse_tour('click "Carry on" on card\nexpect done in #release-notifications within 2s\nsleep 0.5\n')
    assert (more[0].label, more[0].on) == ("Carry on", "card")
    assert (more[1].pattern, more[1].channel, more[1].within) == ("done", "#release-notifications", 2.0)
    assert more[2].seconds == 0.5


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("as alice\n\nfrobnicate now\n", 3, "unknown step 'frobnicate'"),
        ("# comment\nexpect (unclosed\n", 2, "bad regex"),
        ("set ref name no-group-here\n", 1, "needs a (group)"),
        ("as alice\nexpect {missing}\n", 2, "unknown ref {missing}"),
        ("as\n", 1, "expected: as <user>"),
        ("submit Reason\n", 1, "expected <field>=<value>"),
        ("sleep soon\n", 1, "expected: sleep <seconds>"),
        ("click\n", 1, "expected: click <label>"),
        ("/bad!name x\n", 1, "bad slash command name"),
    ],
)
def test_parse_errors_name_the_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(TourParseError) as error:
        parse_tour(text)
    assert error.value.line == line
    assert f"line {line}:" in str(error.value) and fragment in str(error.value)


def test_ref_defined_earlier_is_accepted() -> None:
    steps = parse_tour("set ref id (P-\\d+)\n/push status {id}\nexpect {id} done\n")
    assert [s.kind for s in steps] == ["set_ref", "command", "expect"]


# ------------------------------------------------------------------------------------------
# running


async def test_tour_passes_end_to_end(env: Env, tmp_path: Path) -> None:  # noqa: F811
    lines: list[str] = []
    ok = await run_tour(write(tmp_path, PASSING_TOUR), agent=env.agent, slack=env.slack, channel=CHANNEL,
                        output=lines.append)  # fmt: skip
    assert ok, "\n".join(lines)
    assert all(line.startswith("✓") for line in lines[:-1]), lines
    assert "✓ set ref card_name Echo: (release-\\d+)  → card_name = release-42" in lines
    assert "✓ click Approve on Echo: release-42" in lines, "refs are shown substituted"
    assert lines[-1] == "tour passed: 17 steps"


async def test_tour_failure_reports_the_line_and_stops(env: Env, tmp_path: Path) -> None:  # noqa: F811
    lines: list[str] = []
    ok = await run_tour(write(tmp_path, FAILING_TOUR), agent=env.agent, slack=env.slack, channel=CHANNEL,
                        output=lines.append)  # fmt: skip
    assert not ok
    failure = next(line for line in lines if line.startswith("✗"))
    assert failure.startswith("✗ expect nothing like this within 0.5s (line 5): no message matched")
    # The relevant messages are shown under the failure, rendered.
    assert any("Echo: one" in line for line in lines[lines.index(failure) + 1 :])
    assert not any("never-run" in line for line in lines)
    assert [c for c in env.slack.calls if c[0] == "chat.postMessage"][-1][1]["text"] == "card for one"


async def test_tour_fails_on_missing_button_and_parse_error(
    env: Env,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lines: list[str] = []
    path = write(tmp_path, "as alice\n/echo x\nclick Launch\n")
    # Shorten the 10 s wait for a button so the test stays quick.
    monkeypatch.setattr(tour_module, "DEFAULT_FIND_S", 0.5)
    assert not await run_tour(path, agent=env.agent, slack=env.slack, channel=CHANNEL, output=lines.append)
    assert any(line.startswith("✗ click Launch (line 3): no button 'Launch'") for line in lines), lines

    lines.clear()
    bad = write(tmp_path, "as alice\nexpect-ephemeral (\n")
    assert not await run_tour(bad, agent=env.agent, slack=env.slack, channel=CHANNEL, output=lines.append)
    assert len(lines) == 1 and lines[0].startswith(f"✗ {bad}:2: line 2: bad regex")


# ------------------------------------------------------------------------------------------
# console


def scripted(lines: list[str]) -> tuple[list[str], object]:
    prompts: list[str] = []
    feed: Iterator[str] = iter(lines)

    def input_func(prompt: str) -> str:
        prompts.append(prompt)
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    return prompts, input_func


async def test_console_plays_slack_from_a_pipe(env: Env) -> None:  # noqa: F811
    prompts, input_func = scripted(
        ["help", "/echo hi", "click Approve", "show 1", "files", "as bob", "users", "/echo modal", "good reason", "2"]
    )
    out: list[str] = []
    await run_console(agent=env.agent, slack=env.slack, channel=CHANNEL,
                      users={"alice": "U0ALICE", "bob": "U0BOB"}, input_func=input_func,  # type: ignore[arg-type]
                      output=out.append)  # fmt: skip
    text = "\n".join(out)
    assert prompts[0] == "alice@#releases> "
    assert "bob@#releases> " in prompts
    assert "echo: hi" in text and "(only visible to you)" in text
    assert "[1 Approve] [2 Reject]" in text
    assert "✎ edited" in text and "Approved by @alice" in text
    assert "#3 chatops" in text and "↳ thread of #1" in text
    assert "(message #4)" in text, "files are tied to the message that shared them"
    assert "📎 result.csv (" in text and "00D000000000001,ok" in text
    assert "now acting as bob (Europe/Berlin)" in text
    assert "┌─ Reject" in text and "  Reason: " in prompts
    assert any(p.startswith("  Notify (optional)") for p in prompts)
    assert env.slack.channel_messages(CHANNEL)[-1].text == "modal said: good reason"


# ------------------------------------------------------------------------------------------
# rendering


CTX = RenderContext(
    user_names={"U0ALICE": "alice", "U0BOT": "chatops"},
    channel_names={"C0RELEASES": "releases"},
    tz="Asia/Tokyo",
    now=datetime(2023, 11, 14, 14, 0, tzinfo=UTC),
)


def test_mrkdwn_dates_mentions_and_links() -> None:
    # 1700000000 is 2023-11-14 22:13:20 UTC, i.e. 07:13 on Nov 15 in Tokyo, where "now" is
    # still Nov 14 (23:00).
    text = (
        "<!date^1700000000^{date_short_pretty} {time}|fallback> by <@U0ALICE> in <#C0RELEASES>: <https://x.test|*log*>"
    )
    assert mrkdwn_to_text(text, ctx=CTX) == "tomorrow 7:13 AM by @alice in #releases: log"
    ny = RenderContext(tz="America/New_York", now=CTX.now)
    assert mrkdwn_to_text("<!date^1700000000^{date_num} {time_secs}|x>", ctx=ny) == "2023-11-14 5:13:20 PM"
    assert mrkdwn_to_text("<!date^1700000000^{date_long}|x>", ctx=ny) == "Tuesday, November 14th, 2023"
    assert mrkdwn_to_text("<!date^1700000000^{ago}|x>", ctx=ny) == "in 8 hours"
    assert mrkdwn_to_text("my_package_name *bold* `*code*` &lt;x&gt; :rocket:", ctx=CTX) == (
        "my_package_name bold `*code*` <x> 🚀"
    )


def test_render_message_and_modal() -> None:
    message = {
        "user": "U0BOT",
        "ts": "1700000000.000100",
        "text": "fallback",
        "blocks": [
            *card_blocks("v1"),
            {"type": "divider"},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": "requested by <@U0ALICE>"}]},
            {"type": "section", "fields": [{"type": "mrkdwn", "text": "*Status:*\nRunning"}]},
        ],
        "files": [{"name": "f.csv", "size": 30, "preview": "a,b\n1,2", "lines": 2}],
    }
    rendered = render_message(message, ctx=CTX, number=3, flags=["✎ edited"])
    assert rendered.splitlines()[0] == "#3 chatops · 7:13 AM  ✎ edited"
    assert "  ━━ Echo card ━━" in rendered
    assert "  Echo: v1 at 7:13 AM" in rendered
    assert "  [1 Approve] [2 Reject]" in rendered
    assert "  › requested by @alice" in rendered
    assert "    Status: Running" in rendered
    assert "  📎 f.csv (30 bytes)" in rendered and "     1,2" in rendered
    assert "fallback" not in rendered, "text is only a fallback when there are blocks"
    assert [(b.number, b.label, b.action_id) for b in buttons_of(message)] == [
        (1, "Approve", "approve"),
        (2, "Reject", "reject"),
    ]
    modal = render_view(REASON_MODAL, ctx=CTX)
    assert modal.splitlines()[0].startswith("┌─ Reject ")
    assert "│ Reason *: []" in modal and "│ Notify (optional): []" in modal
    assert "│ [Cancel]  [Reject]" in modal
