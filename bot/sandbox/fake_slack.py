"""A fake Slack Web API: a real aiohttp server on 127.0.0.1 that records what the bot posts.

The bot's real `AsyncWebClient` talks to it through `base_url = FakeSlack.api_url`, so every
request goes over HTTP exactly as it would to slack.com. It answers in Slack's response shapes
and refuses what Slack refuses (bad token, Block Kit limits, a trigger_id used twice or too
late, a response_url used more than five times, 429 on demand), so tests catch the bot breaking
Slack's rules rather than a mock that accepts anything.

Besides `/api/<method>`, the server offers the URLs Slack hands out elsewhere:

    /api/<method>                         Web API (form, JSON or query parameters)
    /upload/v1/<file_id>                  upload_url from files.getUploadURLExternal
    /commands|actions/<team>/<n>/<key>    response_url of a slash command or a click
    /files-pri/<team>-<file_id>/<name>    url_private of an uploaded file

What happened is kept in plain Python structures (`calls`, `messages`, `files`, `views`) and in
an append-only event log (`events_since`) that the sandbox console and tour runner follow.
Everything runs on the caller's event loop; nothing here is thread-safe, nor needs to be.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import mimetypes
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from aiohttp import web

from bot.sandbox.render import RenderContext

JSON = dict[str, Any]
T = TypeVar("T")

DEFAULT_USERS: tuple[JSON, ...] = (
    {"id": "U0ALICE", "name": "alice", "real_name": "Alice Archer", "tz": "America/New_York"},
    {"id": "U0BOB", "name": "bob", "real_name": "Bob Becker", "tz": "Europe/Berlin"},
    {"id": "U0CAROL", "name": "carol", "real_name": "Carol Chiba", "tz": "Asia/Tokyo"},
    {"id": "U0DAVE", "name": "dave", "real_name": "Dave Dunn", "tz": "UTC"},
)
DEFAULT_CHANNELS: Mapping[str, str] = {"C0RELEASES": "releases", "C0NOTIFY": "release-notifications"}

# Slack's documented limits (https://docs.slack.dev/reference/block-kit/blocks and
# .../block-elements); the numbers the bot is most likely to trip over are here.
MAX_MESSAGE_BLOCKS = 50
MAX_VIEW_BLOCKS = 100
MAX_TEXT_CHARS = 40_000
MAX_SECTION_TEXT = 3000
MAX_SECTION_FIELDS = 10
MAX_FIELD_TEXT = 2000
MAX_HEADER_TEXT = 150
MAX_CONTEXT_ELEMENTS = 10
MAX_ACTIONS_ELEMENTS = 25
MAX_BUTTON_TEXT = 75
MAX_BUTTON_VALUE = 2000
MAX_URL = 3000
MAX_ID = 255
MAX_OPTIONS = 100
MAX_OPTION_TEXT = 75
MAX_OPTION_VALUE = 150
MAX_VIEW_TITLE = 24
MAX_PRIVATE_METADATA = 3000
RESPONSE_URL_MAX_USES = 5
RESPONSE_URL_TTL_S = 30 * 60
TRIGGER_TTL_S = 3.0

_TZ_LABELS = {
    "EST": "Eastern Standard Time",
    "EDT": "Eastern Daylight Time",
    "CET": "Central European Time",
    "CEST": "Central European Summer Time",
    "JST": "Japan Standard Time",
    "UTC": "Coordinated Universal Time",
    "GMT": "Greenwich Mean Time",
    "PST": "Pacific Standard Time",
    "PDT": "Pacific Daylight Time",
}
_KNOWN_BLOCKS = {
    "actions",
    "context",
    "divider",
    "file",
    "header",
    "image",
    "input",
    "section",
    "rich_text",
    "video",
    "markdown",
    "table",
}


class ApiError(Exception):
    """A Slack `{"ok": false, "error": ...}` answer, raised inside a method handler."""

    def __init__(self, error: str, *, messages: list[str] | None = None, **extra: Any) -> None:
        super().__init__(error)
        self.error = error
        self.messages = messages or []
        self.extra = extra

    def body(self) -> JSON:
        body: JSON = {"ok": False, "error": self.error, **self.extra}
        if self.messages:
            body["response_metadata"] = {"messages": [f"[ERROR] {m}" for m in self.messages]}
        return body


@dataclass
class MessageVersion:
    """One state of a message; `Message.history` keeps every state, oldest first."""

    text: str
    blocks: list[JSON]
    files: list[JSON]
    seq: int


@dataclass
class Message:
    """A message as Slack stores it, plus how it got there (for the console and tours)."""

    channel: str
    ts: str
    user: str
    text: str
    blocks: list[JSON]
    thread_ts: str | None = None
    files: list[JSON] = field(default_factory=list)
    ephemeral_for: str | None = None
    edited: bool = False
    edited_ts: str | None = None
    deleted: bool = False
    reply_broadcast: bool = False
    metadata: JSON | None = None
    # chat.postMessage | chat.postEphemeral | response_url | ack | file
    source: str = "chat.postMessage"
    history: list[MessageVersion] = field(default_factory=list)

    @property
    def is_reply(self) -> bool:
        return self.thread_ts is not None and self.thread_ts != self.ts


@dataclass
class StoredFile:
    id: str
    name: str
    title: str
    user: str
    created: int
    content: bytes | None = None  # None until the bytes are POSTed to the upload_url
    length: int = 0
    channels: list[str] = field(default_factory=list)
    thread_ts: str | None = None
    message_ts: str | None = None
    alt_txt: str | None = None
    snippet_type: str | None = None

    @property
    def size(self) -> int:
        return len(self.content) if self.content is not None else 0

    def text(self) -> str | None:
        """The content as text, or None for binary content."""
        if self.content is None:
            return None
        try:
            return self.content.decode("utf-8")
        except UnicodeDecodeError:
            return None


@dataclass
class View:
    """A modal opened with views.open/views.push; `payload` is the view object Slack returns."""

    id: str
    user: str
    trigger_id: str
    payload: JSON
    closed: bool = False

    @property
    def callback_id(self) -> str:
        return str(self.payload.get("callback_id", ""))


@dataclass
class ResponseUrl:
    url: str
    channel: str
    user: str
    kind: str  # "commands" | "actions"
    message_ts: str | None
    is_ephemeral: bool
    issued: float
    uses: int = 0


@dataclass
class _Trigger:
    user: str
    issued: float
    used: bool = False


EventKind = Literal["posted", "updated", "deleted", "ephemeral", "file", "view_opened", "view_updated", "view_closed"]


@dataclass(frozen=True)
class Event:
    """One entry of the append-only log; `message`/`view` are the live objects (current state)."""

    seq: int
    kind: EventKind
    channel: str | None = None
    ts: str | None = None
    user: str | None = None
    message: Message | None = None
    view: View | None = None


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).lower() in ("1", "true", "yes")


def _clip(params: Mapping[str, Any]) -> JSON:
    # Never keep the token in the recording: tests print calls on failure.
    return {k: v for k, v in params.items() if k != "token"}


class FakeSlack:
    """Slack's Web API for one workspace, served on 127.0.0.1 and recording everything."""

    def __init__(
        self,
        *,
        bot_token: str = "xoxb-sandbox",
        users: list[JSON] | None = None,
        team_id: str = "T0SANDBOX",
        bot_user_id: str = "U0BOT",
        channels: Mapping[str, str] | None = None,
        team_domain: str = "sandbox",
        app_id: str = "A0SANDBOX",
        bot_id: str = "B0BOT",
        bot_name: str = "chatops",
    ) -> None:
        self.bot_token = bot_token
        self.team_id = team_id
        self.team_domain = team_domain
        self.app_id = app_id
        self.bot_user_id = bot_user_id
        self.bot_id = bot_id
        self.bot_name = bot_name
        self._ts_base = int(time.time())
        self.users: dict[str, JSON] = {}
        for user in users if users is not None else DEFAULT_USERS:
            full = self._full_user(user)
            self.users[full["id"]] = full
        self.users[bot_user_id] = self._full_user(
            {"id": bot_user_id, "name": bot_name, "real_name": "Release ChatOps", "tz": "UTC", "is_bot": True}
        )
        self.channels: dict[str, JSON] = {}
        for channel_id, name in (channels if channels is not None else DEFAULT_CHANNELS).items():
            self.add_channel(channel_id, name)
        # None makes usergroups.users.list answer like a free workspace (plan_upgrade_required).
        self.usergroups: dict[str, list[str]] | None = None

        self.calls: list[tuple[str, JSON]] = []
        self.messages: dict[str, list[Message]] = {}
        self.files: dict[str, StoredFile] = {}
        self.views: dict[str, View] = {}
        self.events: list[Event] = []
        self.response_urls: dict[str, ResponseUrl] = {}
        # Knobs tests may turn: how long a trigger_id / response_url lives.
        self.trigger_ttl: float = TRIGGER_TTL_S
        self.response_url_ttl: float = RESPONSE_URL_TTL_S

        self._triggers: dict[str, _Trigger] = {}
        self._rate_limits: dict[str, tuple[int, int]] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._ts_counter = itertools.count(1)
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.api_url = ""
        self._methods: dict[str, Callable[[JSON, str], JSON]] = {
            "api.test": self._api_test,
            "auth.test": self._auth_test,
            "chat.postMessage": self._chat_post_message,
            "chat.update": self._chat_update,
            "chat.delete": self._chat_delete,
            "chat.postEphemeral": self._chat_post_ephemeral,
            "chat.getPermalink": self._chat_get_permalink,
            "conversations.info": self._conversations_info,
            "conversations.replies": self._conversations_replies,
            "conversations.history": self._conversations_history,
            "users.info": self._users_info,
            "users.list": self._users_list,
            "usergroups.users.list": self._usergroups_users_list,
            "views.open": self._views_open,
            "views.push": self._views_push,
            "views.update": self._views_update,
            "files.getUploadURLExternal": self._files_get_upload_url,
            "files.completeUploadExternal": self._files_complete_upload,
            "files.info": self._files_info,
        }

    # ----------------------------------------------------------------------------------------
    # lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0 = any free port); returns the base URL, e.g. http://127.0.0.1:51234."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/api/{method}", self._handle_api)
        app.router.add_post("/upload/v1/{file_id}", self._handle_upload)
        app.router.add_post("/{kind:commands|actions}/{team}/{n}/{key}", self._handle_response_url)
        app.router.add_get("/files-pri/{team_file}/{name}", self._handle_download)
        app.router.add_get("/files-pri/{team_file}/download/{name}", self._handle_download)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        # Port 0 picks a free port; the runner reports the one actually bound.
        bound_port = self._runner.addresses[0][1] if self._runner.addresses else port
        self.url = f"http://{host}:{bound_port}"
        self.api_url = self.url + "/api/"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for waiter in self._waiters:
            if not waiter.done():
                waiter.cancel()
        self._waiters.clear()

    async def __aenter__(self) -> FakeSlack:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ----------------------------------------------------------------------------------------
    # directory

    def _full_user(self, user: Mapping[str, Any]) -> JSON:
        uid = str(user["id"])
        name = str(user.get("name") or uid.lower())
        real_name = str(user.get("real_name") or name.title())
        tz_name = str(user.get("tz") or "UTC")
        try:
            zone = ZoneInfo(tz_name)
        except (ZoneInfoNotFoundError, ValueError):
            zone = ZoneInfo("UTC")
        now = datetime.now(zone)
        offset = now.utcoffset()
        abbrev = now.tzname() or tz_name
        profile = {
            "display_name": str(user.get("display_name") or name),
            "real_name": real_name,
            "real_name_normalized": real_name,
            "display_name_normalized": str(user.get("display_name") or name),
            "email": str(user.get("email") or f"{name}@example.com"),
            "team": self.team_id,
        }
        return {
            "id": uid,
            "team_id": self.team_id,
            "name": name,
            "deleted": False,
            "real_name": real_name,
            "tz": tz_name,
            "tz_label": user.get("tz_label") or _TZ_LABELS.get(abbrev, abbrev),
            "tz_offset": int(offset.total_seconds()) if offset is not None else 0,
            "profile": profile,
            "is_admin": bool(user.get("is_admin", False)),
            "is_owner": bool(user.get("is_owner", False)),
            "is_bot": bool(user.get("is_bot", False)),
            "is_app_user": False,
            "updated": int(time.time()),
        }

    def add_channel(self, channel_id: str, name: str, *, is_private: bool = False) -> JSON:
        channel = {
            "id": channel_id,
            "name": name,
            "is_channel": not is_private,
            "is_group": False,
            "is_im": False,
            "is_private": is_private,
            "is_archived": False,
            "is_general": False,
            "is_member": True,
            "created": self._ts_base,
            "creator": "U0ALICE",
            "name_normalized": name,
            "topic": {"value": "", "creator": "", "last_set": 0},
            "purpose": {"value": "", "creator": "", "last_set": 0},
        }
        self.channels[channel_id] = channel
        return channel

    def user_by_name(self, name_or_id: str) -> JSON | None:
        """Look a user up by id, name or display name (leading @ ignored)."""
        key = name_or_id.lstrip("@")
        if key in self.users:
            return self.users[key]
        for user in self.users.values():
            if key.lower() in (user["name"].lower(), user["profile"]["display_name"].lower()):
                return user
        return None

    def people(self) -> dict[str, str]:
        """Human users as name → id (what the console offers to act as)."""
        return {user["name"]: uid for uid, user in self.users.items() if not user["is_bot"]}

    def user_names(self) -> dict[str, str]:
        return {uid: user["name"] for uid, user in self.users.items()}

    def channel_names(self) -> dict[str, str]:
        return {cid: ch["name"] for cid, ch in self.channels.items()}

    def render_context(self, viewer: str | None = None, *, now: datetime | None = None) -> RenderContext:
        """How `viewer` (a user id) sees messages: names for ids, times in their time zone."""
        tz = str(self.users.get(viewer or "", {}).get("tz") or "UTC")
        return RenderContext(user_names=self.user_names(), channel_names=self.channel_names(), tz=tz, now=now)

    # ----------------------------------------------------------------------------------------
    # recording helpers for tests and the console

    def events_since(self, cursor: int) -> tuple[list[Event], int]:
        """Events appended after `cursor` (0 = from the start) and the cursor to pass next time."""
        return self.events[cursor:], len(self.events)

    def calls_to(self, method: str) -> list[JSON]:
        return [params for name, params in self.calls if name == method]

    def channel_messages(
        self, channel: str, *, viewer: str | None = None, include_replies: bool = True
    ) -> list[Message]:
        """Live messages of a channel in ts order; ephemerals only those meant for `viewer`."""
        return [
            m
            for m in self.messages.get(channel, [])
            if not m.deleted
            and (m.ephemeral_for is None or m.ephemeral_for == viewer)
            and (include_replies or not m.is_reply)
        ]

    def find_message(self, channel: str, ts: str) -> Message | None:
        for message in self.messages.get(channel, []):
            if message.ts == ts and not message.deleted:
                return message
        return None

    def thread_replies(self, channel: str, thread_ts: str) -> list[Message]:
        return [m for m in self.messages.get(channel, []) if m.is_reply and m.thread_ts == thread_ts and not m.deleted]

    def latest_view_for(self, user: str, *, include_closed: bool = False) -> View | None:
        for view in reversed(list(self.views.values())):
            if view.user == user and (include_closed or not view.closed):
                return view
        return None

    def rate_limit_next(self, method: str, n: int, retry_after: int = 1) -> None:
        """Answer the next `n` calls of `method` with HTTP 429 and `Retry-After: retry_after`."""
        self._rate_limits[method] = (n, retry_after)

    async def wait_for(self, predicate: Callable[[], T | None], timeout: float) -> T | None:
        """Re-check `predicate` on every API call or event until it is truthy or `timeout` passes.

        Event-driven rather than a sleep loop: each recorded change wakes the waiters.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = predicate()
            if result:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                pass
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    async def wait_quiet(self, *, quiet: float = 0.3, limit: float = 2.0) -> None:
        """Wait until nothing has been recorded for `quiet` seconds (or `limit` passes)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while loop.time() < deadline:
            marker = (len(self.calls), len(self.events))
            await asyncio.sleep(min(quiet, max(0.0, deadline - loop.time())))
            if (len(self.calls), len(self.events)) == marker:
                return

    def _notify(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    def _emit(self, kind: EventKind, **fields: Any) -> Event:
        event = Event(seq=len(self.events), kind=kind, **fields)
        self.events.append(event)
        self._notify()
        return event

    # ----------------------------------------------------------------------------------------
    # ids

    def _next_ts(self) -> str:
        # "1732350000.000100"-style and strictly increasing, like real message timestamps.
        n = next(self._ts_counter) * 100
        return f"{self._ts_base + n // 1_000_000}.{n % 1_000_000:06d}"

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}0{next(self._ids):08X}"

    def issue_trigger_id(self, user: str) -> str:
        """A trigger_id views.open accepts once, within `trigger_ttl` seconds of now."""
        trigger_id = f"{int(time.time() * 1000)}.{next(self._ids)}.{secrets.token_hex(16)}"
        self._triggers[trigger_id] = _Trigger(user=user, issued=time.monotonic())
        return trigger_id

    def response_url_for(
        self,
        *,
        channel: str,
        user: str,
        kind: Literal["commands", "actions"] = "commands",
        message_ts: str | None = None,
        is_ephemeral: bool = False,
    ) -> str:
        """A response_url for an interaction of `user` in `channel` (on message `message_ts`)."""
        key = secrets.token_urlsafe(18)
        url = f"{self.url}/{kind}/{self.team_id}/{next(self._ids)}/{key}"
        self.response_urls[url] = ResponseUrl(
            url=url,
            channel=channel,
            user=user,
            kind=kind,
            message_ts=message_ts,
            is_ephemeral=is_ephemeral,
            issued=time.monotonic(),
        )
        return url

    # ----------------------------------------------------------------------------------------
    # message store

    def message_payload(self, message: Message) -> JSON:
        """The message as the Web API returns it (chat.postMessage `message`, block_actions)."""
        body: JSON = {
            "type": "message",
            "user": message.user,
            "text": message.text,
            "ts": message.ts,
            "team": self.team_id,
        }
        if message.user == self.bot_user_id:
            body.update(
                bot_id=self.bot_id,
                app_id=self.app_id,
                bot_profile={
                    "id": self.bot_id,
                    "app_id": self.app_id,
                    "name": self.bot_name,
                    "team_id": self.team_id,
                    "deleted": False,
                },
            )
        if message.blocks:
            body["blocks"] = message.blocks
        if message.files:
            body["files"] = message.files
            body["upload"] = True
            body["display_as_bot"] = False
        if message.thread_ts:
            body["thread_ts"] = message.thread_ts
            if message.is_reply:
                body["parent_user_id"] = self.bot_user_id
            else:
                replies = self.thread_replies(message.channel, message.ts)
                if replies:
                    body["reply_count"] = len(replies)
                    body["latest_reply"] = replies[-1].ts
                    body["reply_users"] = sorted({r.user for r in replies})
        if message.reply_broadcast:
            body["subtype"] = "thread_broadcast"
        if message.edited:
            body["edited"] = {"user": message.user, "ts": message.edited_ts}
        if message.metadata:
            body["metadata"] = message.metadata
        return body

    def _snapshot(self, message: Message) -> None:
        message.history.append(
            MessageVersion(text=message.text, blocks=message.blocks, files=message.files, seq=len(self.events))
        )

    def _store(self, message: Message) -> Message:
        self._snapshot(message)
        self.messages.setdefault(message.channel, []).append(message)
        if message.is_reply:
            parent = self.find_message(message.channel, message.thread_ts or "")
            if parent is not None and parent.thread_ts is None:
                # Slack marks a message as a thread parent once it gets its first reply.
                parent.thread_ts = parent.ts
        return message

    def _update(self, message: Message, *, text: str, blocks: list[JSON], files: list[JSON] | None = None) -> None:
        message.text = text
        message.blocks = blocks
        if files is not None:
            message.files = files
        message.edited = True
        message.edited_ts = self._next_ts()
        self._snapshot(message)

    def _resolve_channel(self, channel: str) -> str:
        if channel in self.channels:
            return channel
        if channel in self.users:
            # Posting to a user id goes to the DM with that user, as Slack does.
            dm = "D" + channel
            if dm not in self.channels:
                self.add_channel(dm, f"dm-{self.users[channel]['name']}", is_private=True)
                self.channels[dm].update(is_channel=False, is_im=True, user=channel)
            return dm
        if channel.startswith("#"):
            for cid, info in self.channels.items():
                if info["name"] == channel[1:]:
                    return cid
        raise ApiError("channel_not_found")

    # ----------------------------------------------------------------------------------------
    # Block Kit validation

    def _check_text(self, text: str) -> None:
        if len(text) > MAX_TEXT_CHARS:
            raise ApiError("msg_too_long")

    def validate_blocks(self, blocks: Any, *, surface: Literal["message", "modal"] = "message") -> list[str]:
        """Slack's complaints about `blocks` as `must ... [json-pointer:/blocks/...]` strings."""
        errors: list[str] = []
        if not isinstance(blocks, list):
            return ["must be an array [json-pointer:/blocks]"]
        limit = MAX_MESSAGE_BLOCKS if surface == "message" else MAX_VIEW_BLOCKS
        if len(blocks) > limit:
            errors.append(f"no more than {limit} items allowed [json-pointer:/blocks]")
        seen_block_ids: set[str] = set()
        for i, block in enumerate(blocks):
            errors.extend(self._validate_block(block, f"/blocks/{i}", seen_block_ids))
        return errors

    def _validate_text_obj(self, obj: Any, path: str, *, max_len: int, plain_only: bool = False) -> list[str]:
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            return [f"must be a text object [json-pointer:{path}]"]
        errors = []
        if obj.get("type") not in (("plain_text",) if plain_only else ("plain_text", "mrkdwn")):
            errors.append(f"must be a valid enum value [json-pointer:{path}/type]")
        if len(obj["text"]) == 0:
            errors.append(f"must be more than 0 characters [json-pointer:{path}/text]")
        if len(obj["text"]) > max_len:
            errors.append(f"must be less than {max_len + 1} characters [json-pointer:{path}/text]")
        return errors

    def _validate_id(self, value: Any, path: str) -> list[str]:
        if value is not None and len(str(value)) > MAX_ID:
            return [f"must be less than {MAX_ID + 1} characters [json-pointer:{path}]"]
        return []

    def _validate_block(self, block: Any, path: str, seen: set[str]) -> list[str]:
        if not isinstance(block, dict) or block.get("type") not in _KNOWN_BLOCKS:
            return [f"unsupported type [json-pointer:{path}/type]"]
        errors = self._validate_id(block.get("block_id"), f"{path}/block_id")
        block_id = block.get("block_id")
        if block_id is not None:
            if block_id in seen:
                errors.append(f"duplicate block_id [json-pointer:{path}/block_id]")
            seen.add(block_id)
        kind = block["type"]
        if kind == "section":
            if block.get("text") is None and not block.get("fields"):
                errors.append(f"must provide either text or fields [json-pointer:{path}]")
            if block.get("text") is not None:
                errors += self._validate_text_obj(block["text"], f"{path}/text", max_len=MAX_SECTION_TEXT)
            fields = block.get("fields") or []
            if len(fields) > MAX_SECTION_FIELDS:
                errors.append(f"no more than {MAX_SECTION_FIELDS} items allowed [json-pointer:{path}/fields]")
            for j, item in enumerate(fields):
                errors += self._validate_text_obj(item, f"{path}/fields/{j}", max_len=MAX_FIELD_TEXT)
            if block.get("accessory") is not None:
                errors += self._validate_element(block["accessory"], f"{path}/accessory")
        elif kind == "header":
            errors += self._validate_text_obj(
                block.get("text"), f"{path}/text", max_len=MAX_HEADER_TEXT, plain_only=True
            )
        elif kind == "context":
            elements = block.get("elements") or []
            if not elements or len(elements) > MAX_CONTEXT_ELEMENTS:
                errors.append(f"must have 1 to {MAX_CONTEXT_ELEMENTS} items [json-pointer:{path}/elements]")
            for j, element in enumerate(elements):
                if isinstance(element, dict) and element.get("type") in ("plain_text", "mrkdwn"):
                    errors += self._validate_text_obj(element, f"{path}/elements/{j}", max_len=MAX_SECTION_TEXT)
        elif kind == "actions":
            elements = block.get("elements") or []
            if not elements:
                errors.append(f"must have at least 1 item [json-pointer:{path}/elements]")
            if len(elements) > MAX_ACTIONS_ELEMENTS:
                errors.append(f"no more than {MAX_ACTIONS_ELEMENTS} items allowed [json-pointer:{path}/elements]")
            action_ids: set[str] = set()
            for j, element in enumerate(elements):
                errors += self._validate_element(element, f"{path}/elements/{j}")
                action_id = element.get("action_id") if isinstance(element, dict) else None
                if action_id is not None:
                    if action_id in action_ids:
                        errors.append(f"duplicate action_id [json-pointer:{path}/elements/{j}/action_id]")
                    action_ids.add(action_id)
        elif kind == "input":
            errors += self._validate_text_obj(block.get("label"), f"{path}/label", max_len=2000, plain_only=True)
            if block.get("element") is None:
                errors.append(f"must provide an element [json-pointer:{path}/element]")
            else:
                errors += self._validate_element(block["element"], f"{path}/element")
        elif kind == "image":
            if len(str(block.get("image_url", ""))) > MAX_URL:
                errors.append(f"must be less than {MAX_URL + 1} characters [json-pointer:{path}/image_url]")
        return errors

    def _validate_element(self, element: Any, path: str) -> list[str]:
        if not isinstance(element, dict) or not element.get("type"):
            return [f"must be a valid element [json-pointer:{path}]"]
        errors = self._validate_id(element.get("action_id"), f"{path}/action_id")
        if element["type"] == "button":
            errors += self._validate_text_obj(
                element.get("text"), f"{path}/text", max_len=MAX_BUTTON_TEXT, plain_only=True
            )
            if element.get("value") is not None and len(str(element["value"])) > MAX_BUTTON_VALUE:
                errors.append(f"must be less than {MAX_BUTTON_VALUE + 1} characters [json-pointer:{path}/value]")
            if element.get("url") is not None and len(str(element["url"])) > MAX_URL:
                errors.append(f"must be less than {MAX_URL + 1} characters [json-pointer:{path}/url]")
            if element.get("style") not in (None, "primary", "danger"):
                errors.append(f"must be a valid enum value [json-pointer:{path}/style]")
        options = element.get("options") or []
        if len(options) > MAX_OPTIONS:
            errors.append(f"no more than {MAX_OPTIONS} items allowed [json-pointer:{path}/options]")
        for j, option in enumerate(options):
            if not isinstance(option, dict):
                errors.append(f"must be an option object [json-pointer:{path}/options/{j}]")
                continue
            errors += self._validate_text_obj(option.get("text"), f"{path}/options/{j}/text", max_len=MAX_OPTION_TEXT)
            if len(str(option.get("value", ""))) > MAX_OPTION_VALUE:
                errors.append(
                    f"must be less than {MAX_OPTION_VALUE + 1} characters [json-pointer:{path}/options/{j}/value]"
                )
        return errors

    def _fill_ids(self, blocks: list[JSON]) -> list[JSON]:
        # Slack gives every block and interactive element an id when the app did not, and
        # returns them; interaction payloads then carry those ids.
        filled: list[JSON] = json.loads(json.dumps(blocks))
        for block in filled:
            block.setdefault("block_id", secrets.token_urlsafe(3)[:4])
            elements = list(block.get("elements") or []) if block.get("type") == "actions" else []
            for key in ("accessory", "element"):
                if isinstance(block.get(key), dict):
                    elements.append(block[key])
            for element in elements:
                if isinstance(element, dict) and element.get("type") not in ("image", "plain_text", "mrkdwn"):
                    element.setdefault("action_id", secrets.token_urlsafe(3)[:4])
        return filled

    def _parse_blocks(self, params: JSON, *, surface: Literal["message", "modal"] = "message") -> list[JSON] | None:
        raw = params.get("blocks")
        if raw is None or raw == "":
            return None
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ApiError("invalid_blocks_format") from exc
        if not isinstance(raw, list):
            raise ApiError("invalid_blocks_format")
        errors = self.validate_blocks(raw, surface=surface)
        if errors:
            raise ApiError("invalid_blocks", messages=errors, errors=errors)
        return self._fill_ids(raw)

    @staticmethod
    def _parse_json_param(params: JSON, name: str, error: str = "invalid_arguments") -> Any:
        raw = params.get(name)
        if isinstance(raw, str):
            try:
                return json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ApiError(error, messages=[f"invalid json [json-pointer:/{name}]"]) from exc
        return raw

    # ----------------------------------------------------------------------------------------
    # HTTP handlers

    async def _read_params(self, request: web.Request) -> JSON:
        params: JSON = dict(request.query)
        if request.method != "POST" or not request.can_read_body:
            return params
        if request.content_type == "application/json":
            try:
                body = await request.json()
            except json.JSONDecodeError as exc:
                raise ApiError("invalid_json") from exc
            if isinstance(body, dict):
                params.update(body)
        elif request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            form = await request.post()
            params.update({k: v for k, v in form.items() if isinstance(v, str)})
        else:
            text = await request.text()
            params.update(dict(parse_qsl(text)))
        return params

    def _token_of(self, request: web.Request, params: JSON) -> str | None:
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            return header.removeprefix("Bearer ").strip()
        token = params.get("token")
        return str(token) if token else None

    async def _handle_api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        try:
            params = await self._read_params(request)
        except ApiError as exc:
            return web.json_response(exc.body())
        token = self._token_of(request, params)
        self.calls.append((method, _clip(params)))
        self._notify()
        remaining, retry_after = self._rate_limits.get(method, (0, 0))
        if remaining > 0:
            self._rate_limits[method] = (remaining - 1, retry_after)
            return web.json_response(
                {"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": str(retry_after)}
            )
        handler = self._methods.get(method)
        if handler is None:
            return web.json_response({"ok": False, "error": "unknown_method", "req_method": method})
        if method != "api.test":
            if token is None:
                return web.json_response({"ok": False, "error": "not_authed"})
            if token != self.bot_token:
                return web.json_response({"ok": False, "error": "invalid_auth"})
        try:
            return web.json_response(handler(params, token or ""))
        except ApiError as exc:
            return web.json_response(exc.body())

    async def _handle_upload(self, request: web.Request) -> web.Response:
        stored = self.files.get(request.match_info["file_id"])
        if stored is None:
            return web.Response(status=404, text="file_not_found", content_type="text/plain")
        if request.content_type == "multipart/form-data":
            form = await request.post()
            part = next(iter(form.values()), None)
            data = part.file.read() if isinstance(part, web.FileField) else str(part or "").encode()
        else:
            data = await request.read()
        stored.content = data
        self._notify()
        # files.slack.com answers the upload with a plain-text line, which slack_sdk expects.
        return web.Response(text=f"OK - {len(data)}", content_type="text/plain")

    async def _handle_download(self, request: web.Request) -> web.Response:
        team_file = request.match_info["team_file"]
        file_id = team_file.split("-", 1)[-1]
        stored = self.files.get(file_id)
        header = request.headers.get("Authorization", "")
        if stored is None or stored.content is None:
            return web.Response(status=404, text="file_not_found")
        if header != f"Bearer {self.bot_token}":
            # Slack serves a login page, not the file, without the token.
            return web.Response(status=302, headers={"Location": "https://sandbox.slack.com/"})
        mime = mimetypes.guess_type(stored.name)[0] or "application/octet-stream"
        return web.Response(body=stored.content, content_type=mime)

    async def _handle_response_url(self, request: web.Request) -> web.Response:
        url = f"{self.url}{request.path}"
        state = self.response_urls.get(url)
        if state is None:
            return web.Response(status=404, text="invalid_url", content_type="text/plain")
        if time.monotonic() - state.issued > self.response_url_ttl:
            return web.Response(status=404, text="expired_url", content_type="text/plain")
        if state.uses >= RESPONSE_URL_MAX_USES:
            return web.Response(status=404, text="used_url", content_type="text/plain")
        try:
            payload = await self._read_params(request)
        except ApiError:
            return web.Response(status=400, text="invalid_payload", content_type="text/plain")
        if isinstance(payload.get("payload"), str):
            payload = json.loads(payload["payload"])
        self.calls.append(("response_url", _clip(payload)))
        state.uses += 1
        try:
            self.apply_response(
                channel=state.channel,
                user=state.user,
                original_ts=state.message_ts,
                payload=payload,
                source="response_url",
            )
        except ApiError as exc:
            return web.Response(status=400, text=exc.error, content_type="text/plain")
        return web.Response(text="ok", content_type="text/plain")

    # ----------------------------------------------------------------------------------------
    # interaction responses (response_url posts and slash command ack bodies)

    def apply_response(
        self,
        *,
        channel: str,
        user: str,
        original_ts: str | None,
        payload: Mapping[str, Any],
        source: str,
    ) -> Message | None:
        """Show an interaction response as Slack would: replace/delete the original, or post anew.

        `response_type` defaults to ephemeral, as it does for response_url and ack bodies.
        """
        original = self.find_message(channel, original_ts) if original_ts else None
        if _as_bool(payload.get("delete_original", False)):
            if original is not None:
                original.deleted = True
                self._emit("deleted", channel=channel, ts=original.ts, user=user, message=original)
            return None
        text = str(payload.get("text") or "")
        blocks = self._parse_blocks(dict(payload)) or []
        if not text and not blocks:
            raise ApiError("no_text")
        self._check_text(text)
        if _as_bool(payload.get("replace_original", False)) and original is not None:
            self._update(original, text=text, blocks=blocks)
            self._emit("updated", channel=channel, ts=original.ts, user=original.ephemeral_for, message=original)
            return original
        in_channel = payload.get("response_type") == "in_channel"
        thread_ts = payload.get("thread_ts")
        message = self._store(
            Message(
                channel=channel,
                ts=self._next_ts(),
                user=self.bot_user_id,
                text=text,
                blocks=blocks,
                thread_ts=str(thread_ts) if thread_ts else None,
                ephemeral_for=None if in_channel else user,
                source=source,
            )
        )
        kind: EventKind = "posted" if in_channel else "ephemeral"
        self._emit(kind, channel=channel, ts=message.ts, user=message.ephemeral_for, message=message)
        return message

    def record_slackbot_notice(self, *, channel: str, user: str, text: str) -> Message:
        """An ephemeral notice from Slack itself (e.g. `/push failed with the error "operation_timeout"`)."""
        message = self._store(
            Message(
                channel=channel,
                ts=self._next_ts(),
                user="USLACKBOT",
                text=text,
                blocks=[],
                ephemeral_for=user,
                source="slack",
            )
        )
        self._emit("ephemeral", channel=channel, ts=message.ts, user=user, message=message)
        return message

    def close_view(self, view_id: str) -> None:
        view = self.views.get(view_id)
        if view is not None and not view.closed:
            view.closed = True
            self._emit("view_closed", user=view.user, view=view)

    def apply_view_submission_response(self, view_id: str, body: Mapping[str, Any] | None) -> None:
        """What Slack does with the app's answer to a view_submission."""
        view = self.views.get(view_id)
        if view is None:
            return
        action = (body or {}).get("response_action")
        if action == "errors":
            return
        if action == "update" and isinstance((body or {}).get("view"), dict):
            self._replace_view(view, dict(body["view"]))  # type: ignore[index]
            return
        if action == "push" and isinstance((body or {}).get("view"), dict):
            self._open_view(dict(body["view"]), user=view.user, trigger_id="", previous=view)  # type: ignore[index]
            return
        if action == "clear":
            for other in list(self.views.values()):
                if other.user == view.user:
                    self.close_view(other.id)
            return
        self.close_view(view_id)

    # ----------------------------------------------------------------------------------------
    # Web API methods

    def _api_test(self, params: JSON, token: str) -> JSON:
        return {"ok": True, "args": {k: v for k, v in params.items() if k != "token"}}

    def _auth_test(self, params: JSON, token: str) -> JSON:
        return {
            "ok": True,
            "url": f"https://{self.team_domain}.slack.com/",
            "team": self.team_domain.title(),
            "user": self.bot_name,
            "team_id": self.team_id,
            "user_id": self.bot_user_id,
            "bot_id": self.bot_id,
            "is_enterprise_install": False,
        }

    def _message_content(self, params: JSON) -> tuple[str, list[JSON] | None]:
        text = str(params.get("text") or "")
        blocks = self._parse_blocks(params)
        if not text and not blocks and not params.get("attachments"):
            raise ApiError("no_text")
        self._check_text(text)
        return text, blocks

    def _metadata(self, params: JSON) -> JSON | None:
        metadata = self._parse_json_param(params, "metadata", "invalid_metadata_format")
        if metadata is not None and not (isinstance(metadata, dict) and "event_type" in metadata):
            raise ApiError("invalid_metadata_format")
        return metadata

    def _chat_post_message(self, params: JSON, token: str) -> JSON:
        channel = self._resolve_channel(str(params.get("channel") or ""))
        text, blocks = self._message_content(params)
        thread_ts = str(params["thread_ts"]) if params.get("thread_ts") else None
        if thread_ts is not None:
            parent = self.find_message(channel, thread_ts)
            if parent is not None and parent.is_reply:
                # A reply to a reply lands in the same thread, as in Slack.
                thread_ts = parent.thread_ts
        message = self._store(
            Message(
                channel=channel,
                ts=self._next_ts(),
                user=self.bot_user_id,
                text=text,
                blocks=blocks or [],
                thread_ts=thread_ts,
                reply_broadcast=bool(thread_ts) and _as_bool(params.get("reply_broadcast", False)),
                metadata=self._metadata(params),
            )
        )
        self._emit("posted", channel=channel, ts=message.ts, message=message)
        return {"ok": True, "channel": channel, "ts": message.ts, "message": self.message_payload(message)}

    def _chat_update(self, params: JSON, token: str) -> JSON:
        channel = self._resolve_channel(str(params.get("channel") or ""))
        ts = str(params.get("ts") or "")
        message = self.find_message(channel, ts)
        if message is None or message.ephemeral_for is not None:
            # Ephemeral messages cannot be updated through chat.update.
            raise ApiError("message_not_found")
        if message.user != self.bot_user_id:
            raise ApiError("cant_update_message")
        has_text = "text" in params and params["text"] is not None
        has_blocks = "blocks" in params and params["blocks"] is not None
        text = str(params["text"]) if has_text else message.text
        self._check_text(text)
        if has_blocks:
            blocks = self._parse_blocks(params) or []
        elif has_text:
            # Slack drops the old blocks when only text is sent (spec §12).
            blocks = []
        else:
            blocks = message.blocks
        if not text and not blocks and not message.files:
            raise ApiError("no_text")
        self._update(message, text=text, blocks=blocks)
        if "metadata" in params:
            message.metadata = self._metadata(params)
        self._emit("updated", channel=channel, ts=ts, message=message)
        return {
            "ok": True,
            "channel": channel,
            "ts": ts,
            "text": text,
            "message": self.message_payload(message),
        }

    def _chat_delete(self, params: JSON, token: str) -> JSON:
        channel = self._resolve_channel(str(params.get("channel") or ""))
        ts = str(params.get("ts") or "")
        message = self.find_message(channel, ts)
        if message is None or message.ephemeral_for is not None:
            raise ApiError("message_not_found")
        message.deleted = True
        self._emit("deleted", channel=channel, ts=ts, message=message)
        return {"ok": True, "channel": channel, "ts": ts}

    def _chat_post_ephemeral(self, params: JSON, token: str) -> JSON:
        channel = self._resolve_channel(str(params.get("channel") or ""))
        user = str(params.get("user") or "")
        if user not in self.users or self.users[user]["is_bot"]:
            raise ApiError("user_not_in_channel")
        text, blocks = self._message_content(params)
        thread_ts = str(params["thread_ts"]) if params.get("thread_ts") else None
        message = self._store(
            Message(
                channel=channel,
                ts=self._next_ts(),
                user=self.bot_user_id,
                text=text,
                blocks=blocks or [],
                thread_ts=thread_ts,
                ephemeral_for=user,
                source="chat.postEphemeral",
            )
        )
        self._emit("ephemeral", channel=channel, ts=message.ts, user=user, message=message)
        return {"ok": True, "message_ts": message.ts}

    def _chat_get_permalink(self, params: JSON, token: str) -> JSON:
        channel = self._resolve_channel(str(params.get("channel") or ""))
        ts = str(params.get("message_ts") or "")
        message = self.find_message(channel, ts)
        if message is None or message.ephemeral_for is not None:
            raise ApiError("message_not_found")
        link = f"https://{self.team_domain}.slack.com/archives/{channel}/p{ts.replace('.', '')}"
        if message.is_reply:
            link += f"?thread_ts={message.thread_ts}&cid={channel}"
        return {"ok": True, "channel": channel, "permalink": link}

    def _conversations_info(self, params: JSON, token: str) -> JSON:
        channel = self.channels.get(str(params.get("channel") or ""))
        if channel is None:
            raise ApiError("channel_not_found")
        return {"ok": True, "channel": channel}

    def _history_page(self, items: list[Message], params: JSON) -> JSON:
        limit = int(params.get("limit") or 100)
        return {
            "ok": True,
            "messages": [self.message_payload(m) for m in items[:limit]],
            "has_more": len(items) > limit,
            "response_metadata": {"next_cursor": ""},
        }

    def _conversations_history(self, params: JSON, token: str) -> JSON:
        channel = self._resolve_channel(str(params.get("channel") or ""))
        top = [
            m
            for m in self.channel_messages(channel)
            if m.ephemeral_for is None and (not m.is_reply or m.reply_broadcast)
        ]
        return self._history_page(list(reversed(top)), params)

    def _conversations_replies(self, params: JSON, token: str) -> JSON:
        channel = self._resolve_channel(str(params.get("channel") or ""))
        ts = str(params.get("ts") or "")
        parent = self.find_message(channel, ts)
        if parent is None:
            raise ApiError("thread_not_found")
        return self._history_page([parent, *self.thread_replies(channel, ts)], params)

    def _users_info(self, params: JSON, token: str) -> JSON:
        user = self.users.get(str(params.get("user") or ""))
        if user is None:
            raise ApiError("user_not_found")
        return {"ok": True, "user": user}

    def _users_list(self, params: JSON, token: str) -> JSON:
        return {
            "ok": True,
            "members": list(self.users.values()),
            "cache_ts": int(time.time()),
            "response_metadata": {"next_cursor": ""},
        }

    def _usergroups_users_list(self, params: JSON, token: str) -> JSON:
        if self.usergroups is None:
            raise ApiError("plan_upgrade_required")
        group = str(params.get("usergroup") or "")
        if group not in self.usergroups:
            raise ApiError("no_such_subteam")
        return {"ok": True, "users": list(self.usergroups[group])}

    # views

    def _validate_view(self, view: Any) -> JSON:
        if not isinstance(view, dict):
            raise ApiError("invalid_arguments", messages=["must be an object [json-pointer:/view]"])
        errors: list[str] = []
        if view.get("type") != "modal":
            errors.append("must be a valid enum value [json-pointer:/view/type]")
        for key in ("title", "submit", "close"):
            if key in view or key == "title":
                errors += [
                    e.replace("[json-pointer:", "[json-pointer:/view")
                    for e in self._validate_text_obj(view.get(key), f"/{key}", max_len=MAX_VIEW_TITLE, plain_only=True)
                ]
        errors += [
            e.replace("[json-pointer:", "[json-pointer:/view")
            for e in self.validate_blocks(view.get("blocks", []), surface="modal")
        ]
        if any(isinstance(b, dict) and b.get("type") == "input" for b in view.get("blocks", []) or []):
            if "submit" not in view:
                errors.append("must provide submit when an input block is present [json-pointer:/view/submit]")
        if len(str(view.get("private_metadata", ""))) > MAX_PRIVATE_METADATA:
            errors.append(
                f"must be less than {MAX_PRIVATE_METADATA + 1} characters [json-pointer:/view/private_metadata]"
            )
        for key in ("callback_id", "external_id"):
            errors += self._validate_id(view.get(key), f"/view/{key}")
        if errors:
            raise ApiError("invalid_arguments", messages=errors)
        return view

    def _view_payload(self, view_id: str, view: JSON, *, previous: View | None) -> JSON:
        return {
            "id": view_id,
            "team_id": self.team_id,
            "type": "modal",
            "blocks": self._fill_ids(list(view.get("blocks") or [])),
            "private_metadata": str(view.get("private_metadata", "")),
            "callback_id": str(view.get("callback_id", "")),
            "state": {"values": {}},
            "hash": f"{int(time.time())}.{secrets.token_urlsafe(6)}",
            "title": view.get("title"),
            "clear_on_close": bool(view.get("clear_on_close", False)),
            "notify_on_close": bool(view.get("notify_on_close", False)),
            "close": view.get("close"),
            "submit": view.get("submit"),
            "previous_view_id": previous.id if previous else None,
            "root_view_id": previous.payload.get("root_view_id", previous.id) if previous else view_id,
            "app_id": self.app_id,
            "external_id": str(view.get("external_id", "")),
            "app_installed_team_id": self.team_id,
            "bot_id": self.bot_id,
        }

    def _take_trigger(self, params: JSON) -> tuple[str, str]:
        trigger_id = str(params.get("trigger_id") or params.get("interactivity_pointer") or "")
        trigger = self._triggers.get(trigger_id)
        if trigger is None:
            raise ApiError("invalid_trigger_id")
        if trigger.used or time.monotonic() - trigger.issued > self.trigger_ttl:
            raise ApiError("expired_trigger_id")
        trigger.used = True
        return trigger_id, trigger.user

    def _open_view(self, view: JSON, *, user: str, trigger_id: str, previous: View | None) -> View:
        view_id = self._next_id("V")
        stored = View(
            id=view_id, user=user, trigger_id=trigger_id, payload=self._view_payload(view_id, view, previous=previous)
        )
        self.views[view_id] = stored
        self._emit("view_opened", user=user, view=stored)
        return stored

    def _replace_view(self, stored: View, view: JSON) -> None:
        previous = self.views.get(stored.payload.get("previous_view_id") or "")
        stored.payload = self._view_payload(stored.id, view, previous=previous)
        self._emit("view_updated", user=stored.user, view=stored)

    def _views_open(self, params: JSON, token: str) -> JSON:
        view = self._validate_view(self._parse_json_param(params, "view"))
        trigger_id, user = self._take_trigger(params)
        stored = self._open_view(view, user=user, trigger_id=trigger_id, previous=None)
        return {"ok": True, "view": stored.payload}

    def _views_push(self, params: JSON, token: str) -> JSON:
        view = self._validate_view(self._parse_json_param(params, "view"))
        trigger_id, user = self._take_trigger(params)
        previous = self.latest_view_for(user)
        if previous is None:
            raise ApiError("not_found")
        stored = self._open_view(view, user=user, trigger_id=trigger_id, previous=previous)
        return {"ok": True, "view": stored.payload}

    def _views_update(self, params: JSON, token: str) -> JSON:
        view = self._validate_view(self._parse_json_param(params, "view"))
        view_id = str(params.get("view_id") or "")
        external_id = str(params.get("external_id") or "")
        stored = (
            self.views.get(view_id)
            if view_id
            else next(
                (v for v in self.views.values() if external_id and v.payload.get("external_id") == external_id), None
            )
        )
        if stored is None:
            raise ApiError("not_found")
        if params.get("hash") and params["hash"] != stored.payload.get("hash"):
            raise ApiError("hash_conflict")
        self._replace_view(stored, view)
        return {"ok": True, "view": stored.payload}

    # files

    def file_payload(self, stored: StoredFile) -> JSON:
        """A file object in Slack's shape, with a text `preview` for text content."""
        ext = stored.name.rsplit(".", 1)[-1].lower() if "." in stored.name else "text"
        mime = mimetypes.guess_type(stored.name)[0] or "text/plain"
        body: JSON = {
            "id": stored.id,
            "created": stored.created,
            "timestamp": stored.created,
            "name": stored.name,
            "title": stored.title,
            "mimetype": mime,
            "filetype": ext,
            "pretty_type": ext.upper(),
            "user": stored.user,
            "user_team": self.team_id,
            "editable": False,
            "size": stored.size,
            "mode": "hosted",
            "is_external": False,
            "external_type": "",
            "is_public": bool(stored.channels),
            "public_url_shared": False,
            "display_as_bot": False,
            "username": "",
            "url_private": f"{self.url}/files-pri/{self.team_id}-{stored.id}/{stored.name}",
            "url_private_download": f"{self.url}/files-pri/{self.team_id}-{stored.id}/download/{stored.name}",
            "permalink": f"https://{self.team_domain}.slack.com/files/{stored.user}/{stored.id}/{stored.name}",
            "channels": list(stored.channels),
            "groups": [],
            "ims": [],
            "comments_count": 0,
        }
        if stored.channels and stored.message_ts:
            first = self.channels.get(stored.channels[0], {})
            share: JSON = {"ts": stored.message_ts, "channel_name": first.get("name")}
            if stored.thread_ts:
                share["thread_ts"] = stored.thread_ts
            body["shares"] = {"public": {c: [share] for c in stored.channels}}
        text = stored.text()
        if text is not None:
            lines = text.split("\n")
            if lines and lines[-1] == "":
                lines.pop()
            body["preview"] = "\n".join(lines[:10])
            body["lines"] = len(lines)
            body["lines_more"] = max(0, len(lines) - 10)
            body["preview_is_truncated"] = len(lines) > 10
        if stored.alt_txt:
            body["alt_txt"] = stored.alt_txt
        return body

    def _files_get_upload_url(self, params: JSON, token: str) -> JSON:
        filename = str(params.get("filename") or "")
        try:
            length = int(params.get("length") or 0)
        except (TypeError, ValueError) as exc:
            raise ApiError("invalid_arguments", messages=["must be an integer [json-pointer:/length]"]) from exc
        if not filename or length <= 0:
            raise ApiError("invalid_arguments", messages=["missing required field: filename or length"])
        file_id = self._next_id("F")
        self.files[file_id] = StoredFile(
            id=file_id,
            name=filename,
            title=filename,
            user=self.bot_user_id,
            created=int(time.time()),
            length=length,
            alt_txt=params.get("alt_txt"),
            snippet_type=params.get("snippet_type"),
        )
        return {"ok": True, "upload_url": f"{self.url}/upload/v1/{file_id}", "file_id": file_id}

    def _files_complete_upload(self, params: JSON, token: str) -> JSON:
        items = self._parse_json_param(params, "files")
        if not isinstance(items, list) or not items:
            raise ApiError("invalid_arguments", messages=["must provide files [json-pointer:/files]"])
        stored_files: list[StoredFile] = []
        for item in items:
            stored = self.files.get(str((item or {}).get("id", "")))
            if stored is None or stored.content is None:
                raise ApiError("file_not_found")
            if item.get("title"):
                stored.title = str(item["title"])
            stored_files.append(stored)
        channels = [str(params["channel_id"])] if params.get("channel_id") else []
        if params.get("channels"):
            channels += [c for c in str(params["channels"]).split(",") if c]
        channels = [self._resolve_channel(c) for c in channels]
        thread_ts = str(params["thread_ts"]) if params.get("thread_ts") else None
        comment = str(params.get("initial_comment") or "")
        self._check_text(comment)
        if thread_ts is not None and not channels:
            raise ApiError("invalid_arguments", messages=["thread_ts requires channel_id"])
        for channel in channels:
            ts = self._next_ts()
            for stored in stored_files:
                stored.channels.append(channel)
                stored.thread_ts = thread_ts
                stored.message_ts = ts
            message = self._store(
                Message(
                    channel=channel,
                    ts=ts,
                    user=self.bot_user_id,
                    text=comment,
                    blocks=[],
                    thread_ts=thread_ts,
                    files=[self.file_payload(s) for s in stored_files],
                    source="file",
                )
            )
            self._emit("file", channel=channel, ts=message.ts, message=message)
        return {"ok": True, "files": [{"id": s.id, "title": s.title} for s in stored_files]}

    def _files_info(self, params: JSON, token: str) -> JSON:
        stored = self.files.get(str(params.get("file") or ""))
        if stored is None or stored.content is None:
            raise ApiError("file_not_found")
        body: JSON = {
            "ok": True,
            "file": self.file_payload(stored),
            "comments": [],
            "response_metadata": {"next_cursor": ""},
        }
        text = stored.text()
        if text is not None:
            body["content"] = text
        return body
