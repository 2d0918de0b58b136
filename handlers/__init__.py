"""Slack listeners, registered explicitly by ``register`` (never by import side effects)."""

from __future__ import annotations

from slack_bolt.async_app import AsyncApp

from handlers import approvals, dedupe, deploy, fd, placeholders, push, sfp, workspace
from handlers.context import HandlerDeps


def register(app: AsyncApp, deps: HandlerDeps) -> None:
    workspace.register(app, deps)  # first: nothing from another workspace reaches the rest
    dedupe.register(app, deps)
    push.register(app, deps)
    fd.register(app, deps)
    sfp.register(app, deps)
    deploy.register(app, deps)
    approvals.register(app, deps)
    placeholders.register(app)
