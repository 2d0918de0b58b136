"""One workspace: a request that names any team but the bot's own is refused before any listener.

A signing secret belongs to an app, not to a workspace, so a correctly signed request can still
come from another workspace the app is installed in (or from a Slack Connect user of another
team). The bot serves only the workspace its token belongs to (``auth.test`` at start-up, see
``bot.slack.web.own_workspace``). Every team id a request carries must be that one: Bolt's
``context.team_id`` (which prefers ``view.app_installed_team_id`` and ``authorizations``) and the
payload's own ``team_id``, ``team``/``team.id``, ``user.team_id`` and ``view.team_id``; a request
that names no team at all is refused too. A refused slash command is answered with an ephemeral
refusal in its ack (the only answer Slack shows for it); anything else is acknowledged and
dropped. Either way nothing runs, and an audit row records it after the ack.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from slack_bolt.async_app import AsyncApp
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.response import BoltResponse

from bot.slack.messages import foreign_workspace_text
from handlers.context import deps_of

log = logging.getLogger(__name__)


def team_ids(body: dict[str, Any], *, context_team_id: str | None) -> set[str]:
    """Every team id the request names, wherever Slack puts it for its kind of payload."""
    found: list[Any] = [context_team_id, body.get("team_id")]
    team = body.get("team")
    found.append(team.get("id") if isinstance(team, dict) else team)
    for key in ("user", "view"):
        nested = body.get(key)
        if isinstance(nested, dict):
            found.append(nested.get("team_id"))
    return {str(team_id) for team_id in found if team_id}


def _describe(body: dict[str, Any]) -> tuple[str, str, str, str]:
    """(actor, channel, audit action, detail) of a request, for its audit row."""
    if body.get("command"):
        return (
            str(body.get("user_id") or ""),
            str(body.get("channel_id") or ""),
            "command",
            f"{body['command']} {body.get('text') or ''}".strip(),
        )
    user = body.get("user")
    actor = str(user.get("id") or "") if isinstance(user, dict) else str(user or body.get("user_id") or "")
    channel = body.get("channel")
    channel_id = str(channel.get("id") or "") if isinstance(channel, dict) else str(body.get("channel_id") or "")
    actions = body.get("actions") or []
    if actions and isinstance(actions[0], dict):
        return actor, channel_id, "action", str(actions[0].get("action_id") or "")
    view = body.get("view")
    if isinstance(view, dict):
        return actor, channel_id, "view", str(view.get("callback_id") or "")
    event = body.get("event")
    if isinstance(event, dict):
        return str(event.get("user") or actor), str(event.get("channel") or ""), "event", str(event.get("type") or "")
    return actor, channel_id, str(body.get("type") or "request"), ""


async def only_own_workspace(
    req: AsyncBoltRequest, resp: BoltResponse, next: Callable[[], Awaitable[BoltResponse]]
) -> BoltResponse:
    deps = deps_of(req.context)
    teams = team_ids(req.body, context_team_id=req.context.team_id)
    if teams == {deps.team_id}:
        return await next()
    actor, channel, action, detail = _describe(req.body)
    others = ",".join(sorted(teams - {deps.team_id})) or "none"
    log.warning("refused a request from another workspace", extra={"teams": others, "action": action})
    deps.ack_first.spawn(
        deps.audit.record(
            actor=actor,
            channel=channel,
            action=action,
            detail=f"{detail[:150]} (team {others})".strip(),
            outcome="refused: another workspace",
        )
    )
    if req.body.get("command"):
        refusal = json.dumps({"response_type": "ephemeral", "text": foreign_workspace_text()})
        return BoltResponse(status=200, body=refusal, headers={"content-type": "application/json"})
    return BoltResponse(status=200, body="")


def register(app: AsyncApp) -> None:
    app.middleware(only_own_workspace)
