"""Slack listeners, registered explicitly by ``register`` (never by import side effects).

Each module's listeners are module-level functions; their dependencies reach them through Bolt's
``context``, put there by the one middleware registered first (``handlers.context.provide``).
"""

from __future__ import annotations

from slack_bolt.async_app import AsyncApp

from handlers import approvals, dedupe, deploy, fd, push, sfp, workspace
from handlers.context import HandlerDeps, provide


def register(app: AsyncApp, deps: HandlerDeps) -> None:
    app.middleware(provide(deps))  # first: every middleware and listener below reads it
    workspace.register(app)  # next: nothing from another workspace reaches the rest
    dedupe.register(app)
    push.register(app)
    fd.register(app)
    sfp.register(app)
    deploy.register(app)
    approvals.register(app)
