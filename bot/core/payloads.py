"""Typed, versioned payloads: what an operation row's ``params`` and ``data`` JSON hold.

An ``Operation`` row stores two JSON columns: ``params`` (what was asked, fixed when the
operation is created) and ``data`` (what happened since: approval, progress, result). Code never
reads them by string key; it reads a model:

    Payload                       base: validated when read, dumped as plain JSON when written
    ├── ApprovalState             the approval an operation waits for (``data.approval``)
    ├── OperationState            the part of ``data`` every kind shares (approval, decisions,
    │   │                         the transient-problem note); each kind extends it
    │   └── <Kind>Data            e.g. ``bot.push.payloads.PushData``
    └── <Kind>Params              e.g. ``bot.push.payloads.PushParams``

Versions: every payload carries ``v`` (``SCHEMA_VERSION`` of its model when written). Rows
written before payloads were typed have no ``v``: they are version 1, and a model reads them as
they are, because version 1 is exactly the key layout those releases wrote. A model that changes
its layout bumps its version and upgrades older payloads in a ``model_validator(mode="before")``;
unknown keys are ignored on read, so a row written by a newer release still loads.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field

from bot.store.models import Operation


class Payload(BaseModel):
    """Base of every stored payload."""

    model_config = ConfigDict(extra="ignore", validate_assignment=False, populate_by_name=True)

    v: int = 1

    @classmethod
    def read(cls, raw: dict[str, Any] | None) -> Self:
        return cls.model_validate(raw or {})

    def dump(self) -> dict[str, Any]:
        """Plain JSON for the database; unset optional values are left out, as before."""
        return self.model_dump(mode="json", exclude_none=True)


class ApprovalState(Payload):
    """The approval an operation needs, fixed when it was requested (SPEC §8, §13)."""

    approvers: list[str] = Field(default_factory=list)  # user ids (U…/W…) and group ids (S…); empty = anyone
    count: int = 1
    self_approval: bool = False
    rule: str = "policy"  # how it was chosen, shown on the card
    expires_at: str | None = None
    waiver: str | None = None  # why a rule lowered the built-in minimum (shown, audited)
    excluded: dict[str, str] = Field(default_factory=dict)  # user id → why they may not approve

    @property
    def expires(self) -> datetime | None:
        if not self.expires_at:
            return None
        moment = datetime.fromisoformat(self.expires_at)
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class OperationState(Payload):
    """What every kind keeps in ``data``; each kind's ``<Kind>Data`` adds its own fields."""

    approval: ApprovalState | None = None
    approved_by: list[str] = Field(default_factory=list)
    rejected_by: str | None = None
    reject_reason: str | None = None
    transient_failures: int = 0
    last_problem: str | None = None


def common(operation: Operation) -> OperationState:
    """The shared part of an operation's ``data``, whatever its kind."""
    return OperationState.read(operation.data)


def with_common(operation: Operation, **changes: Any) -> dict[str, Any]:
    """``operation.data`` with some shared fields changed and every kind-specific key kept.

    Core code (approvals, lifecycle) does not know the kind's model, so it writes through this
    instead of a whole-model dump.
    """
    state = common(operation).model_copy(update=changes)
    shared = state.model_dump(mode="json", include=set(changes))
    return {**operation.data, **shared}
