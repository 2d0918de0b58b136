"""A Slack user, as the bot sees one: signed slash commands, button clicks and modal submissions.

`SlackUserAgent` builds the exact payloads Slack sends to an app's Request URL (form-encoded
slash commands; `payload=<json>` for interactivity), signs them with the signing secret the way
Slack does (`v0=` HMAC-SHA256 of `v0:{timestamp}:{body}`), and POSTs them to the bot. It gets
its `response_url`s and `trigger_id`s from the `FakeSlack` so that the bot's later calls to them
are checked like the real ones (five uses; once within 3 s). What Slack would show the user in
answer to a request (a slash command's ack body, an error when the bot did not answer in time)
is recorded in the `FakeSlack` too, so the console and tours see one timeline.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp

from bot.sandbox.fake_slack import ApiError, FakeSlack, Message, View
from bot.sandbox.render import Button, InputField, buttons_of, inputs_of

JSON = dict[str, Any]

# Slack gives up on an app's answer after 3 s and shows the user an error instead.
ACK_TIMEOUT_S = 3.0


class SlackUserError(Exception):
    """The agent cannot do what was asked (no such button, modal, field, user...)."""


@dataclass(frozen=True)
class CommandResult:
    """What came back from the bot for a slash command."""

    status: int  # 0 when the bot could not be reached or did not answer in time
    body: str
    json: JSON | None
    trigger_id: str
    response_url: str
    timed_out: bool = False
    # The message Slack showed for the ack body, if it had any content.
    ack_message: Message | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def text(self) -> str:
        """The ack's text: the `text` of a JSON body or the plain-text body."""
        if self.json is not None:
            return str(self.json.get("text", ""))
        return self.body


@dataclass(frozen=True)
class ClickResult:
    status: int
    body: str
    json: JSON | None
    trigger_id: str
    response_url: str
    action: JSON = field(default_factory=dict)
    message_ts: str = ""
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass(frozen=True)
class SubmitResult:
    status: int
    body: str
    json: JSON | None
    view_id: str
    errors: dict[str, str] = field(default_factory=dict)
    response_action: str | None = None
    closed: bool = False
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.errors


@dataclass(frozen=True)
class _Reply:
    status: int
    body: str
    json: JSON | None
    timed_out: bool = False
    error: str | None = None


class SlackUserAgent:
    """Plays the Slack client for any workspace user against the bot's events endpoint."""

    def __init__(
        self,
        *,
        bot_url: str,
        signing_secret: str,
        slack: FakeSlack,
        session: aiohttp.ClientSession,
        team_id: str = "T0SANDBOX",
        api_app_id: str = "A0SANDBOX",
        ack_timeout: float = ACK_TIMEOUT_S,
    ) -> None:
        self.bot_url = bot_url
        self._secret = signing_secret.encode()
        self.slack = slack
        self.session = session
        self.team_id = team_id
        self.api_app_id = api_app_id
        self.ack_timeout = ack_timeout
        # Slack still sends the deprecated verification token; Bolt ignores it but it is part
        # of the payload shape.
        self.verification_token = "sandbox-verification-token"

    # ----------------------------------------------------------------------------------------
    # signing and transport

    def sign(self, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        """Slack's request-signing headers for `body` (timestamp override for replay tests)."""
        ts = int(time.time()) if timestamp is None else int(timestamp)
        base = b"v0:" + str(ts).encode() + b":" + body
        digest = hmac.new(self._secret, base, hashlib.sha256).hexdigest()
        return {"X-Slack-Request-Timestamp": str(ts), "X-Slack-Signature": f"v0={digest}"}

    async def post(
        self,
        body: bytes,
        *,
        timestamp: int | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> tuple[int, str]:
        """POST a raw, signed body to the bot; for tests of bad signatures and replays."""
        reply = await self._send(body, timestamp=timestamp, extra_headers=extra_headers)
        return reply.status, reply.body

    async def _send(
        self,
        body: bytes,
        *,
        timestamp: int | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> _Reply:
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "User-Agent": "Slackbot 1.0 (+https://api.slack.com/robots)",
            **self.sign(body, timestamp),
            **(extra_headers or {}),
        }
        try:
            async with self.session.post(
                self.bot_url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=self.ack_timeout)
            ) as resp:
                text = await resp.text()
                parsed: JSON | None = None
                if text.startswith("{"):
                    try:
                        loaded = json.loads(text)
                        parsed = loaded if isinstance(loaded, dict) else None
                    except json.JSONDecodeError:
                        parsed = None
                return _Reply(status=resp.status, body=text, json=parsed)
        except TimeoutError:
            return _Reply(status=0, body="", json=None, timed_out=True, error="operation_timeout")
        except aiohttp.ClientError as exc:
            return _Reply(status=0, body=str(exc), json=None, error="dispatch_failed")

    def _user(self, user: str) -> JSON:
        found = self.slack.user_by_name(user)
        if found is None:
            raise SlackUserError(f"unknown user {user!r}")
        return found

    def _channel(self, channel: str) -> JSON:
        info = self.slack.channels.get(channel)
        if info is None:
            # The user types in this channel, so it exists in their workspace.
            info = self.slack.add_channel(channel, channel.lower())
        return info

    def _user_ref(self, user: JSON) -> JSON:
        return {"id": user["id"], "username": user["name"], "name": user["name"], "team_id": self.team_id}

    # ----------------------------------------------------------------------------------------
    # slash commands

    async def command(
        self,
        *,
        user: str,
        channel: str,
        command: str,
        text: str,
        retry_num: int | None = None,
        trigger_id: str | None = None,
        timestamp: int | None = None,
    ) -> CommandResult:
        """Run `command text` as `user` in `channel`, exactly as Slack delivers a slash command.

        With `retry_num`, the request carries Slack's retry headers (a redelivery after the
        bot was slow), and the same `trigger_id` may be passed to mimic the original request.
        """
        who = self._user(user)
        where = self._channel(channel)
        if not command.startswith("/"):
            command = "/" + command
        response_url = self.slack.response_url_for(channel=where["id"], user=who["id"], kind="commands")
        trigger = trigger_id or self.slack.issue_trigger_id(who["id"])
        form = {
            "token": self.verification_token,
            "team_id": self.team_id,
            "team_domain": self.slack.team_domain,
            "channel_id": where["id"],
            "channel_name": where["name"],
            "user_id": who["id"],
            "user_name": who["name"],
            "command": command,
            "text": text,
            "api_app_id": self.api_app_id,
            "is_enterprise_install": "false",
            "response_url": response_url,
            "trigger_id": trigger,
        }
        extra = {}
        if retry_num is not None:
            extra = {"X-Slack-Retry-Num": str(retry_num), "X-Slack-Retry-Reason": "http_timeout"}
        reply = await self._send(urlencode(form).encode(), timestamp=timestamp, extra_headers=extra)
        ack_message = self._show_command_reply(reply, command=command, channel=where["id"], user=who["id"])
        return CommandResult(
            status=reply.status,
            body=reply.body,
            json=reply.json,
            trigger_id=trigger,
            response_url=response_url,
            timed_out=reply.timed_out,
            ack_message=ack_message,
        )

    def _show_command_reply(self, reply: _Reply, *, command: str, channel: str, user: str) -> Message | None:
        # What the Slack client shows after a slash command: the ack body as a message
        # (ephemeral unless response_type is in_channel), or Slack's own error notice.
        if reply.status != 200:
            error = reply.error or "http_service_error"
            return self.slack.record_slackbot_notice(
                channel=channel, user=user, text=f'{command} failed with the error "{error}"'
            )
        if not reply.body.strip():
            return None
        payload: Mapping[str, Any] = reply.json if reply.json is not None else {"text": reply.body}
        if not payload.get("text") and not payload.get("blocks"):
            return None
        try:
            return self.slack.apply_response(
                channel=channel, user=user, original_ts=None, payload=payload, source="ack"
            )
        except ApiError as exc:  # an ack body Slack would refuse: show what Slack would say
            return self.slack.record_slackbot_notice(
                channel=channel, user=user, text=f'{command} failed with the error "{exc.error}"'
            )

    # ----------------------------------------------------------------------------------------
    # buttons

    def _message(self, channel: str, message_ts: str) -> Message:
        message = self.slack.find_message(channel, message_ts)
        if message is None:
            raise SlackUserError(f"no message {message_ts} in {channel}")
        return message

    async def click(
        self,
        *,
        user: str,
        channel: str,
        message_ts: str,
        action_id: str,
        value: str | None,
        block_id: str | None = None,
        text: str = "",
        timestamp: int | None = None,
    ) -> ClickResult:
        """Press a button on a stored message: a `block_actions` payload as Slack sends it."""
        who = self._user(user)
        where = self._channel(channel)
        message = self._message(where["id"], message_ts)
        if block_id is None or not text:
            for button in buttons_of(self.slack.message_payload(message)):
                if button.action_id == action_id:
                    block_id = block_id or button.block_id
                    text = text or button.label
                    break
        is_ephemeral = message.ephemeral_for is not None
        response_url = self.slack.response_url_for(
            channel=where["id"], user=who["id"], kind="actions", message_ts=message.ts, is_ephemeral=is_ephemeral
        )
        trigger = self.slack.issue_trigger_id(who["id"])
        action: JSON = {
            "action_id": action_id,
            "block_id": block_id or "",
            "text": {"type": "plain_text", "text": text, "emoji": True},
            "type": "button",
            "action_ts": f"{time.time():.6f}",
        }
        if value is not None:
            action["value"] = value
        container: JSON = {
            "type": "message",
            "message_ts": message.ts,
            "channel_id": where["id"],
            "is_ephemeral": is_ephemeral,
        }
        if message.is_reply:
            container["thread_ts"] = message.thread_ts
        payload: JSON = {
            "type": "block_actions",
            "user": self._user_ref(who),
            "api_app_id": self.api_app_id,
            "token": self.verification_token,
            "container": container,
            "trigger_id": trigger,
            "team": {"id": self.team_id, "domain": self.slack.team_domain},
            "enterprise": None,
            "is_enterprise_install": False,
            "channel": {"id": where["id"], "name": where["name"]},
            "state": {"values": {}},
            "response_url": response_url,
            "actions": [action],
        }
        if not is_ephemeral:
            # Slack does not send the content of ephemeral messages back to the app.
            payload["message"] = self.slack.message_payload(message)
        reply = await self._send(urlencode({"payload": json.dumps(payload)}).encode(), timestamp=timestamp)
        return ClickResult(
            status=reply.status,
            body=reply.body,
            json=reply.json,
            trigger_id=trigger,
            response_url=response_url,
            action=action,
            message_ts=message.ts,
            timed_out=reply.timed_out,
        )

    def find_button(
        self, *, user: str, channel: str, label: str, message_ts: str | None = None
    ) -> tuple[Message, Button]:
        """The newest message (visible to `user`) with a button labelled `label`, and the button.

        The label matches case-insensitively; a number selects the n-th button instead.
        """
        who = self._user(user)
        candidates = self.slack.channel_messages(self._channel(channel)["id"], viewer=who["id"])
        if message_ts is not None:
            candidates = [m for m in candidates if m.ts == message_ts]
        wanted = label.strip().lower()
        for message in reversed(candidates):
            for button in buttons_of(self.slack.message_payload(message)):
                if button.label.strip().lower() == wanted or (wanted.isdigit() and button.number == int(wanted)):
                    return message, button
        where = f"message {message_ts}" if message_ts else f"any message in {channel}"
        raise SlackUserError(f"no button {label!r} on {where}")

    async def click_label(self, *, user: str, channel: str, label: str, message_ts: str | None = None) -> ClickResult:
        """Press the button with this label on `message_ts` or on the newest message that has one."""
        message, button = self.find_button(user=user, channel=channel, label=label, message_ts=message_ts)
        return await self.click(
            user=user,
            channel=channel,
            message_ts=message.ts,
            action_id=button.action_id,
            value=button.value,
            block_id=button.block_id,
            text=button.label,
        )

    # ----------------------------------------------------------------------------------------
    # modals

    def _state_value(self, field_: InputField, raw: str | None) -> JSON:
        kind = field_.element_type
        if kind in ("plain_text_input", "number_input", "email_text_input", "url_text_input"):
            return {"type": kind, "value": raw}
        if kind in ("static_select", "radio_buttons", "external_select"):
            option = self._option(field_, raw) if raw is not None else None
            return {"type": kind, "selected_option": option}
        if kind in ("checkboxes", "multi_static_select"):
            parts = [part.strip() for part in (raw or "").split(",") if part.strip()]
            chosen = [self._option(field_, part) for part in parts]
            return {"type": kind, "selected_options": chosen}
        if kind == "datepicker":
            return {"type": kind, "selected_date": raw}
        if kind == "timepicker":
            return {"type": kind, "selected_time": raw}
        if kind == "users_select":
            return {"type": kind, "selected_user": self._user(raw)["id"] if raw else None}
        if kind == "multi_users_select":
            ids = [self._user(p.strip())["id"] for p in (raw or "").split(",") if p.strip()]
            return {"type": kind, "selected_users": ids}
        if kind in ("conversations_select", "channels_select"):
            key = "selected_conversation" if kind == "conversations_select" else "selected_channel"
            return {"type": kind, key: raw}
        return {"type": kind, "value": raw}

    @staticmethod
    def _option(field_: InputField, raw: str) -> JSON:
        for text, value in field_.options:
            if raw.lower() in (text.lower(), value.lower()):
                return {"text": {"type": "plain_text", "text": text, "emoji": True}, "value": value}
        choices = ", ".join(text for text, _ in field_.options)
        raise SlackUserError(f"{field_.label}: {raw!r} is not one of: {choices}")

    def _client_side_errors(self, field_: InputField, raw: str | None) -> str | None:
        # The Slack client itself refuses to submit these, so the app never sees them.
        if raw is None or raw == "":
            return None if field_.optional else "This field is required."
        if field_.min_length is not None and len(raw) < field_.min_length:
            return f"Must be at least {field_.min_length} characters."
        if field_.max_length is not None and len(raw) > field_.max_length:
            return f"Must be at most {field_.max_length} characters."
        return None

    def view(self, view_id: str) -> View:
        view = self.slack.views.get(view_id)
        if view is None:
            raise SlackUserError(f"no modal {view_id}")
        return view

    async def submit_view(
        self, *, user: str, view_id: str, values: Mapping[str, str], timestamp: int | None = None
    ) -> SubmitResult:
        """Fill the modal's inputs (keyed by label, block_id or action_id) and submit it.

        Unfilled inputs keep their initial value; a required input left empty or a length
        limit broken is refused before sending, as the Slack client does.
        """
        who = self._user(user)
        view = self.view(view_id)
        if view.closed:
            raise SlackUserError(f"modal {view_id} is already closed")
        fields = inputs_of(view.payload)
        remaining = dict(values)
        state: dict[str, JSON] = {}
        client_errors: dict[str, str] = {}
        for field_ in fields:
            raw: str | None = field_.initial
            for key in (field_.label, field_.block_id, field_.action_id):
                match = next((k for k in remaining if k.strip().lower() == key.strip().lower()), None)
                if match is not None:
                    raw = remaining.pop(match)
                    break
            problem = self._client_side_errors(field_, raw)
            if problem:
                client_errors[field_.block_id] = problem
            state.setdefault(field_.block_id, {})[field_.action_id] = self._state_value(field_, raw or None)
        if remaining:
            labels = ", ".join(f.label for f in fields)
            raise SlackUserError(f"modal has no input {', '.join(remaining)} (inputs: {labels})")
        if client_errors:
            return SubmitResult(status=0, body="", json=None, view_id=view_id, errors=client_errors)
        submitted = dict(view.payload)
        submitted["state"] = {"values": state}
        payload: JSON = {
            "type": "view_submission",
            "team": {"id": self.team_id, "domain": self.slack.team_domain},
            "user": self._user_ref(who),
            "api_app_id": self.api_app_id,
            "token": self.verification_token,
            "trigger_id": self.slack.issue_trigger_id(who["id"]),
            "view": submitted,
            "response_urls": [],
            "is_enterprise_install": False,
            "enterprise": None,
        }
        reply = await self._send(urlencode({"payload": json.dumps(payload)}).encode(), timestamp=timestamp)
        errors: dict[str, str] = {}
        action: str | None = None
        closed = False
        if reply.status == 200:
            body = reply.json or {}
            action = body.get("response_action")
            if action == "errors":
                errors = {str(k): str(v) for k, v in (body.get("errors") or {}).items()}
            self.slack.apply_view_submission_response(view_id, body)
            closed = view.closed
        return SubmitResult(
            status=reply.status,
            body=reply.body,
            json=reply.json,
            view_id=view_id,
            errors=errors,
            response_action=action,
            closed=closed,
            timed_out=reply.timed_out,
        )

    async def wait_for_view(self, *, user: str, after_seq: int = 0, timeout: float = 10.0) -> View | None:
        """The newest open modal of `user` opened at or after event `after_seq`, waiting for one."""
        who = self._user(user)

        def newest() -> View | None:
            for event in reversed(self.slack.events[after_seq:]):
                if event.kind == "view_opened" and event.user == who["id"] and event.view and not event.view.closed:
                    return event.view
            return None

        return await self.slack.wait_for(newest, timeout)


__all__ = [
    "ACK_TIMEOUT_S",
    "ClickResult",
    "CommandResult",
    "SlackUserAgent",
    "SlackUserError",
    "SubmitResult",
]
