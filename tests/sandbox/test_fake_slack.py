"""FakeSlack and SlackUserAgent against a tiny real Bolt AsyncApp served over HTTP.

The app below is a stand-in for the bot: `/echo` acks, posts a card with buttons, answers via
response_url or opens a modal; Approve edits the card, replies in its thread and uploads a CSV
there with files_upload_v2; Reject opens a modal whose submission edits the card. Everything
goes over real HTTP: agent → Bolt (signed), Bolt's AsyncWebClient → FakeSlack.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncRespond, AsyncSay
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.sandbox.fake_slack import FakeSlack, Message
from bot.sandbox.slack_user import SlackUserAgent

SECRET = "test-signing-secret"
CHANNEL = "C0RELEASES"

REASON_MODAL: dict[str, Any] = {
    "type": "modal",
    "callback_id": "reject_modal",
    "title": {"type": "plain_text", "text": "Reject"},
    "submit": {"type": "plain_text", "text": "Reject"},
    "close": {"type": "plain_text", "text": "Cancel"},
    "blocks": [
        {
            "type": "input",
            "block_id": "reason",
            "label": {"type": "plain_text", "text": "Reason"},
            "element": {"type": "plain_text_input", "action_id": "reason_input", "multiline": True},
        },
        {
            "type": "input",
            "block_id": "notify",
            "optional": True,
            "label": {"type": "plain_text", "text": "Notify"},
            "element": {
                "type": "static_select",
                "action_id": "notify_select",
                "options": [
                    {"text": {"type": "plain_text", "text": "Everyone"}, "value": "all"},
                    {"text": {"type": "plain_text", "text": "Nobody"}, "value": "none"},
                ],
            },
        },
    ],
}


def card_blocks(text: str) -> list[dict[str, Any]]:
    return [
        {"type": "header", "text": {"type": "plain_text", "text": "Echo card"}},
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*Echo:* {text} at <!date^1700000000^{{time}}|then>"}},
        {
            "type": "actions",
            "block_id": "decide",
            "elements": [
                {"type": "button", "action_id": "approve", "value": text, "style": "primary",
                 "text": {"type": "plain_text", "text": "Approve"}},
                {"type": "button", "action_id": "reject", "value": text, "style": "danger",
                 "text": {"type": "plain_text", "text": "Reject"}},
            ],
        },
    ]  # fmt: skip


def build_app(slack: FakeSlack) -> AsyncApp:
    client = AsyncWebClient(token=slack.bot_token, base_url=slack.api_url)
    app = AsyncApp(client=client, signing_secret=SECRET)

    @app.command("/echo")
    async def echo(ack: AsyncAck, body: dict[str, Any], say: AsyncSay, respond: AsyncRespond) -> None:
        text = body["text"]
        if text == "modal":
            await ack()
            await client.views_open(trigger_id=body["trigger_id"], view=REASON_MODAL)
            return
        if text == "later":
            await ack()
            await respond(f"answered later for <@{body['user_id']}>")
            return
        await ack(f"echo: {text}")
        await say(text=f"card for {text}", blocks=card_blocks(text))

    @app.action("approve")
    async def approve(ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        channel = body["container"]["channel_id"]
        ts = body["container"]["message_ts"]
        approved = [{"type": "section", "text": {"type": "mrkdwn", "text": f"Approved by <@{body['user']['id']}>"}}]
        await client.chat_update(channel=channel, ts=ts, text="approved", blocks=approved)
        await client.chat_postMessage(channel=channel, thread_ts=ts, text="thread: approved, deploying")
        await client.files_upload_v2(
            channel=channel,
            thread_ts=ts,
            filename="result.csv",
            content="org_id,status\n00D000000000001,ok\n00D000000000002,failed\n",
            initial_comment="results attached",
        )

    @app.action("reject")
    async def reject(ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        view = dict(
            REASON_MODAL, private_metadata=f"{body['container']['channel_id']}|{body['container']['message_ts']}"
        )
        await client.views_open(trigger_id=body["trigger_id"], view=view)

    @app.view("reject_modal")
    async def rejected(ack: AsyncAck, view: dict[str, Any]) -> None:
        reason = view["state"]["values"]["reason"]["reason_input"]["value"]
        if len(reason) < 3:
            await ack(response_action="errors", errors={"reason": "Say a bit more"})
            return
        await ack()
        if view["private_metadata"]:
            channel, ts = view["private_metadata"].split("|")
            # Text only: Slack drops the card's blocks, which the test checks.
            await client.chat_update(channel=channel, ts=ts, text=f"rejected: {reason}")
        else:
            await client.chat_postMessage(channel=CHANNEL, text=f"modal said: {reason}")

    return app


@dataclass
class Env:
    slack: FakeSlack
    agent: SlackUserAgent
    session: aiohttp.ClientSession
    bot_url: str


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    slack = FakeSlack()
    await slack.start()
    app = build_app(slack)

    async def events(request: web.Request) -> web.Response:
        return await to_aiohttp_response(await app.async_dispatch(await to_bolt_request(request)))

    web_app = web.Application()
    web_app.router.add_post("/slack/events", events)
    server = TestServer(web_app, host="127.0.0.1")
    await server.start_server()
    session = aiohttp.ClientSession()
    bot_url = str(server.make_url("/slack/events"))
    agent = SlackUserAgent(bot_url=bot_url, signing_secret=SECRET, slack=slack, session=session)
    try:
        yield Env(slack=slack, agent=agent, session=session, bot_url=bot_url)
    finally:
        await session.close()
        await server.close()
        await slack.stop()


@pytest.fixture
async def client() -> AsyncIterator[tuple[FakeSlack, AsyncWebClient]]:
    """FakeSlack alone, with the Web API client the bot uses."""
    slack = FakeSlack()
    await slack.start()
    try:
        yield slack, AsyncWebClient(token=slack.bot_token, base_url=slack.api_url)
    finally:
        await slack.stop()


async def wait_message(slack: FakeSlack, predicate: Any, timeout: float = 5.0) -> Message:
    def find() -> Message | None:
        return next((m for m in reversed(slack.messages.get(CHANNEL, [])) if predicate(m)), None)

    found = await slack.wait_for(find, timeout)
    assert found is not None, [(m.text, m.ephemeral_for) for m in slack.messages.get(CHANNEL, [])]
    return found


async def post_card(env: Env, text: str = "hello") -> Message:
    result = await env.agent.command(user="alice", channel=CHANNEL, command="/echo", text=text)
    assert result.ok, result
    return await wait_message(env.slack, lambda m: m.blocks and m.ephemeral_for is None)


# ------------------------------------------------------------------------------------------
# signed requests through Bolt


async def test_slash_command_is_accepted_by_bolt_and_ack_shown_as_ephemeral(env: Env) -> None:
    result = await env.agent.command(user="alice", channel=CHANNEL, command="/echo", text="hello")

    assert result.status == 200
    assert result.text == "echo: hello"
    ack = result.ack_message
    assert ack is not None and ack.ephemeral_for == "U0ALICE" and ack.source == "ack"
    card = await wait_message(env.slack, lambda m: m.ephemeral_for is None)
    assert card.user == "U0BOT" and card.text == "card for hello"
    assert [b["block_id"] for b in card.blocks][2] == "decide"
    # Slack fills in block ids the app left out.
    assert all(b.get("block_id") for b in card.blocks)
    assert env.slack.calls_to("auth.test"), "Bolt verifies the token on its first request"


async def test_bad_signature_and_stale_timestamp_are_refused_by_bolt(env: Env) -> None:
    wrong = SlackUserAgent(bot_url=env.bot_url, signing_secret="not-the-secret", slack=env.slack, session=env.session)
    result = await wrong.command(user="alice", channel=CHANNEL, command="/echo", text="x")
    assert result.status == 401
    notice = result.ack_message
    assert notice is not None and "failed with the error" in notice.text

    status, _ = await env.agent.post(b"command=%2Fecho&text=x", timestamp=int(time.time()) - 600)
    assert status == 401


async def test_retry_headers_are_sent(env: Env) -> None:
    result = await env.agent.command(user="bob", channel=CHANNEL, command="/echo", text="again", retry_num=1)
    assert result.ok
    assert env.agent.sign(b"x", timestamp=1)["X-Slack-Request-Timestamp"] == "1"


async def test_click_updates_card_replies_in_thread_and_uploads_file(env: Env) -> None:
    card = await post_card(env)

    click = await env.agent.click_label(user="bob", channel=CHANNEL, label="approve")
    assert click.ok
    assert click.action["action_id"] == "approve" and click.action["block_id"] == "decide"

    file_message = await wait_message(env.slack, lambda m: bool(m.files))
    assert card.edited and card.text == "approved"
    assert "Approved by <@U0BOB>" in card.blocks[0]["text"]["text"]
    assert [v.text for v in card.history] == ["card for hello", "approved"]

    replies = env.slack.thread_replies(CHANNEL, card.ts)
    assert [r.text for r in replies] == ["thread: approved, deploying", "results attached"]
    assert card.thread_ts == card.ts
    assert file_message.thread_ts == card.ts

    stored = env.slack.files[file_message.files[0]["id"]]
    assert stored.name == "result.csv"
    assert stored.text() is not None and stored.text().startswith("org_id,status")  # type: ignore[union-attr]
    assert file_message.files[0]["preview"].splitlines()[1] == "00D000000000001,ok"
    methods = [name for name, _ in env.slack.calls]
    assert methods.index("files.getUploadURLExternal") < methods.index("files.completeUploadExternal")

    # The block_actions payload carried the stored message, as Slack sends it.
    assert env.slack.events_since(0)[1] == len(env.slack.events)


async def test_modal_open_and_submission_with_errors_then_success(env: Env) -> None:
    card = await post_card(env, "risky")
    await env.agent.click_label(user="carol", channel=CHANNEL, label="Reject", message_ts=card.ts)

    view = await env.agent.wait_for_view(user="carol", timeout=5)
    assert view is not None and view.callback_id == "reject_modal"
    assert view.payload["id"].startswith("V") and view.payload["state"] == {"values": {}}

    refused = await env.agent.submit_view(user="carol", view_id=view.id, values={"Reason": "no"})
    assert refused.errors == {"reason": "Say a bit more"} and not refused.closed

    missing = await env.agent.submit_view(user="carol", view_id=view.id, values={})
    assert missing.status == 0 and missing.errors == {"reason": "This field is required."}

    done = await env.agent.submit_view(
        user="carol", view_id=view.id, values={"reason": "tests are red", "Notify": "nobody"}
    )
    assert done.ok and done.closed

    await env.slack.wait_for(lambda: card.text.startswith("rejected"), 5)
    assert card.text == "rejected: tests are red"
    assert card.blocks == [], "chat.update with text only removes the blocks"


async def test_trigger_id_is_single_use_and_expires(client: tuple[FakeSlack, AsyncWebClient]) -> None:
    slack, web_client = client
    trigger = slack.issue_trigger_id("U0ALICE")
    opened = await web_client.views_open(trigger_id=trigger, view=REASON_MODAL)
    assert opened["view"]["callback_id"] == "reject_modal"
    assert slack.latest_view_for("U0ALICE") is not None

    with pytest.raises(SlackApiError) as used:
        await web_client.views_open(trigger_id=trigger, view=REASON_MODAL)
    assert used.value.response["error"] == "expired_trigger_id"

    with pytest.raises(SlackApiError) as unknown:
        await web_client.views_open(trigger_id="123.456.nope", view=REASON_MODAL)
    assert unknown.value.response["error"] == "invalid_trigger_id"

    slack.trigger_ttl = 0.0
    late = slack.issue_trigger_id("U0ALICE")
    with pytest.raises(SlackApiError) as expired:
        await web_client.views_open(trigger_id=late, view=REASON_MODAL)
    assert expired.value.response["error"] == "expired_trigger_id"

    long_title = dict(REASON_MODAL, title={"type": "plain_text", "text": "x" * 25})
    slack.trigger_ttl = 3.0
    with pytest.raises(SlackApiError) as invalid:
        await web_client.views_open(trigger_id=slack.issue_trigger_id("U0ALICE"), view=long_title)
    assert invalid.value.response["error"] == "invalid_arguments"


async def test_response_url_from_bolt_respond_is_ephemeral(env: Env) -> None:
    result = await env.agent.command(user="dave", channel=CHANNEL, command="/echo", text="later")
    assert result.ok and result.body == ""
    message = await wait_message(env.slack, lambda m: m.source == "response_url")
    assert message.ephemeral_for == "U0DAVE"
    assert message.text == "answered later for <@U0DAVE>"


async def test_response_url_replace_delete_and_five_uses(env: Env) -> None:
    card = await post_card(env)
    url = env.slack.response_url_for(channel=CHANNEL, user="U0ALICE", kind="actions", message_ts=card.ts)

    async with env.session.post(url, json={"text": "replaced", "replace_original": True}) as resp:
        assert resp.status == 200 and await resp.text() == "ok"
    assert card.text == "replaced" and card.blocks == [] and card.edited

    async with env.session.post(url, json={"text": "for everyone", "response_type": "in_channel"}) as resp:
        assert resp.status == 200
    assert env.slack.channel_messages(CHANNEL)[-1].text == "for everyone"

    async with env.session.post(url, json={"delete_original": True}) as resp:
        assert resp.status == 200
    assert env.slack.find_message(CHANNEL, card.ts) is None

    for _ in range(2):
        async with env.session.post(url, json={"text": "again"}) as resp:
            assert resp.status == 200
    async with env.session.post(url, json={"text": "sixth"}) as resp:
        assert resp.status == 404 and await resp.text() == "used_url"


# ------------------------------------------------------------------------------------------
# Web API directly


async def test_auth_unknown_method_and_form_bodies(client: tuple[FakeSlack, AsyncWebClient]) -> None:
    slack, web_client = client
    auth = await web_client.auth_test()
    assert auth["user_id"] == "U0BOT" and auth["team_id"] == "T0SANDBOX"

    bad = AsyncWebClient(token="xoxb-wrong", base_url=slack.api_url)
    with pytest.raises(SlackApiError) as invalid:
        await bad.auth_test()
    assert invalid.value.response["error"] == "invalid_auth"

    with pytest.raises(SlackApiError) as unknown:
        await web_client.api_call("chat.nope")
    assert unknown.value.response["error"] == "unknown_method"

    # Form-encoded, with blocks as a JSON string, as older clients send them.
    form = await web_client.api_call(
        "chat.postMessage",
        data={"channel": CHANNEL, "text": "form", "blocks": json.dumps(card_blocks("f"))},
    )
    assert form["message"]["blocks"][0]["type"] == "header"
    assert ("chat.postMessage", {"channel": CHANNEL, "text": "form", "blocks": json.dumps(card_blocks("f"))}) in [
        (m, p) for m, p in slack.calls
    ]


async def test_rate_limit_answers_429_with_retry_after(client: tuple[FakeSlack, AsyncWebClient]) -> None:
    slack, web_client = client
    slack.rate_limit_next("chat.update", 1, retry_after=7)
    posted = await web_client.chat_postMessage(channel=CHANNEL, text="x")
    with pytest.raises(SlackApiError) as limited:
        await web_client.chat_update(channel=CHANNEL, ts=posted["ts"], text="y")
    assert limited.value.response.status_code == 429
    assert limited.value.response.headers["Retry-After"] == "7"
    assert limited.value.response["error"] == "ratelimited"
    updated = await web_client.chat_update(channel=CHANNEL, ts=posted["ts"], text="y")
    assert updated["text"] == "y"


@pytest.mark.parametrize(
    ("blocks", "pointer"),
    [
        ([{"type": "divider"}] * 51, "/blocks"),
        ([{"type": "section", "text": {"type": "mrkdwn", "text": "x" * 3001}}], "/blocks/0/text/text"),
        ([{"type": "section", "fields": [{"type": "mrkdwn", "text": "f"}] * 11}], "/blocks/0/fields"),
        (
            [{"type": "actions", "elements": [
                {"type": "button", "action_id": f"a{i}", "text": {"type": "plain_text", "text": "b"}}
                for i in range(26)
            ]}],
            "/blocks/0/elements",
        ),
        (
            [{"type": "actions", "elements": [
                {"type": "button", "action_id": "a", "text": {"type": "plain_text", "text": "b" * 76}}
            ]}],
            "/blocks/0/elements/0/text/text",
        ),
        (
            [{"type": "actions", "elements": [
                {"type": "button", "action_id": "a", "value": "v" * 2001, "text": {"type": "plain_text", "text": "b"}}
            ]}],
            "/blocks/0/elements/0/value",
        ),
        (
            [{"type": "actions", "elements": [
                {"type": "button", "action_id": "a" * 256, "text": {"type": "plain_text", "text": "b"}}
            ]}],
            "/blocks/0/elements/0/action_id",
        ),
        ([{"type": "divider", "block_id": "b" * 256}], "/blocks/0/block_id"),
        ([{"type": "divider", "block_id": "same"}, {"type": "divider", "block_id": "same"}], "/blocks/1/block_id"),
        ([{"type": "header", "text": {"type": "mrkdwn", "text": "h"}}], "/blocks/0/text/type"),
        ([{"type": "nonsense"}], "/blocks/0/type"),
    ],
)  # fmt: skip
async def test_block_kit_limits_answer_invalid_blocks(
    client: tuple[FakeSlack, AsyncWebClient], blocks: list[dict[str, Any]], pointer: str
) -> None:
    slack, web_client = client
    with pytest.raises(SlackApiError) as refused:
        await web_client.chat_postMessage(channel=CHANNEL, text="t", blocks=blocks)
    assert refused.value.response["error"] == "invalid_blocks"
    assert any(f"[json-pointer:{pointer}]" in e for e in refused.value.response["errors"])
    assert slack.messages.get(CHANNEL, []) == []


@pytest.mark.filterwarnings("ignore:The top-level `text` argument is missing")
async def test_text_limits_and_update_rules(client: tuple[FakeSlack, AsyncWebClient]) -> None:
    slack, web_client = client
    with pytest.raises(SlackApiError) as too_long:
        await web_client.chat_postMessage(channel=CHANNEL, text="x" * 40_001)
    assert too_long.value.response["error"] == "msg_too_long"
    with pytest.raises(SlackApiError) as no_text:
        await web_client.chat_postMessage(channel=CHANNEL, text="")
    assert no_text.value.response["error"] == "no_text"
    with pytest.raises(SlackApiError) as no_channel:
        await web_client.chat_postMessage(channel="C0NOPE", text="x")
    assert no_channel.value.response["error"] == "channel_not_found"

    posted = await web_client.chat_postMessage(channel=CHANNEL, text="t", blocks=card_blocks("u"))
    assert posted["ts"] < (await web_client.chat_postMessage(channel=CHANNEL, text="later"))["ts"]
    assert len(posted["ts"].split(".")[1]) == 6

    kept = await web_client.chat_update(channel=CHANNEL, ts=posted["ts"], blocks=card_blocks("v"))
    assert kept["message"]["text"] == "t", "text is kept when only blocks are sent"
    emptied = await web_client.chat_update(channel=CHANNEL, ts=posted["ts"], text="only text")
    assert "blocks" not in emptied["message"]
    assert emptied["message"]["edited"]["user"] == "U0BOT"

    with pytest.raises(SlackApiError) as missing:
        await web_client.chat_update(channel=CHANNEL, ts="1.000000", text="x")
    assert missing.value.response["error"] == "message_not_found"

    eph = await web_client.chat_postEphemeral(channel=CHANNEL, user="U0BOB", text="psst")
    with pytest.raises(SlackApiError):
        await web_client.chat_update(channel=CHANNEL, ts=eph["message_ts"], text="x")
    assert [m.text for m in slack.channel_messages(CHANNEL, viewer="U0ALICE")] == ["only text", "later"]
    assert slack.channel_messages(CHANNEL, viewer="U0BOB")[-1].ephemeral_for == "U0BOB"

    link = await web_client.chat_getPermalink(channel=CHANNEL, message_ts=posted["ts"])
    assert link["permalink"].endswith("/archives/C0RELEASES/p" + posted["ts"].replace(".", ""))

    reply = await web_client.chat_postMessage(channel=CHANNEL, text="r", thread_ts=posted["ts"], reply_broadcast=True)
    assert reply["message"]["thread_ts"] == posted["ts"]
    history = await web_client.conversations_history(channel=CHANNEL)
    assert history["messages"][0]["text"] == "r"
    replies = await web_client.conversations_replies(channel=CHANNEL, ts=posted["ts"])
    assert [m["text"] for m in replies["messages"]] == ["only text", "r"]


async def test_directory_methods(client: tuple[FakeSlack, AsyncWebClient]) -> None:
    slack, web_client = client
    bob = (await web_client.users_info(user="U0BOB"))["user"]
    assert bob["name"] == "bob" and bob["tz"] == "Europe/Berlin"
    assert bob["tz_offset"] in (3600, 7200) and bob["tz_label"].startswith("Central European")
    assert bob["profile"]["display_name"] == "bob" and bob["real_name"]
    with pytest.raises(SlackApiError) as nobody:
        await web_client.users_info(user="U0NOBODY")
    assert nobody.value.response["error"] == "user_not_found"

    members = (await web_client.users_list())["members"]
    assert {"U0ALICE", "U0BOB", "U0CAROL", "U0DAVE"} <= {m["id"] for m in members}

    info = await web_client.conversations_info(channel=CHANNEL)
    assert info["channel"]["name"] == "releases"

    with pytest.raises(SlackApiError) as free_plan:
        await web_client.usergroups_users_list(usergroup="S0RELEASE")
    assert free_plan.value.response["error"] == "plan_upgrade_required"
    slack.usergroups = {"S0RELEASE": ["U0BOB", "U0CAROL"]}
    assert (await web_client.usergroups_users_list(usergroup="S0RELEASE"))["users"] == ["U0BOB", "U0CAROL"]


async def test_files_info_and_upload_without_channel(client: tuple[FakeSlack, AsyncWebClient]) -> None:
    slack, web_client = client
    uploaded = await web_client.files_upload_v2(filename="a.txt", content="hello\nworld\n", title="A")
    file_id = uploaded["file"]["id"]
    info = await web_client.files_info(file=file_id)
    assert info["file"]["name"] == "a.txt" and info["file"]["title"] == "A" and info["file"]["size"] == 12
    assert info["content"] == "hello\nworld\n"
    assert slack.events_since(0)[0] == [], "an unshared file posts nothing"

    with pytest.raises(SlackApiError) as missing:
        await web_client.files_completeUploadExternal(files=[{"id": "F0NOPE", "title": "x"}], channel_id=CHANNEL)
    assert missing.value.response["error"] == "file_not_found"


async def test_events_since_is_an_append_only_log(client: tuple[FakeSlack, AsyncWebClient]) -> None:
    slack, web_client = client
    events, cursor = slack.events_since(0)
    assert (events, cursor) == ([], 0)
    posted = await web_client.chat_postMessage(channel=CHANNEL, text="one")
    await web_client.chat_update(channel=CHANNEL, ts=posted["ts"], text="two")
    await web_client.chat_postEphemeral(channel=CHANNEL, user="U0ALICE", text="psst")
    events, cursor = slack.events_since(cursor)
    assert [e.kind for e in events] == ["posted", "updated", "ephemeral"]
    assert events[0].message is events[1].message
    assert slack.events_since(cursor) == ([], cursor)
