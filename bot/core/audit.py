"""The audit trail as the listeners write it: one service, so that handlers never reach the store.

Every command, click and refusal leaves a row (SPEC: who did what, where, with what outcome);
the listeners decide *when* a row is written, this decides *how*.
"""

from __future__ import annotations

from bot.core.approvals import audit_waiver
from bot.core.payloads import ApprovalState
from bot.store import repo
from bot.store.db import Database


class AuditLog:
    def __init__(self, *, db: Database) -> None:
        self._db = db

    async def record(
        self,
        *,
        actor: str,
        action: str,
        channel: str = "",
        operation_ref: str = "",
        detail: str = "",
        outcome: str = "",
    ) -> None:
        await repo.audit(
            self._db,
            actor=actor,
            channel=channel,
            operation_ref=operation_ref,
            action=action,
            detail=detail,
            outcome=outcome,
        )

    async def waiver(self, *, actor: str, channel: str, operation_ref: str, approval: ApprovalState | None) -> None:
        """The extra row of an operation requested under a rule that waived approval (if any)."""
        await audit_waiver(self._db, actor=actor, channel=channel, operation_ref=operation_ref, approval=approval)
