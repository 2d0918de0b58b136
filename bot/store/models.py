"""Database tables. All operation state lives here so that any replica can pick it up."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Index, LargeBinary, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def _tz_column(*, nullable: bool = True, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=nullable, index=index))


class OpKind(StrEnum):
    PUSH = "push"
    DEPLOY = "deploy"
    SFP = "sfp"
    FD = "fd"


REF_PREFIX = {OpKind.PUSH: "P", OpKind.DEPLOY: "D", OpKind.SFP: "S", OpKind.FD: "F"}


class OpState(StrEnum):
    AWAITING_APPROVAL = "awaiting_approval"
    REJECTED = "rejected"
    EXPIRED = "expired"
    STARTING = "starting"  # approved (or needing none); the poller performs the writes
    SCHEDULED = "scheduled"  # accepted by the external system, waiting for its start time
    RUNNING = "running"
    CANCELING = "canceling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    ERROR = "error"  # the bot could not carry it out (upstream refusal); details in data


TERMINAL_STATES = frozenset(
    {OpState.REJECTED, OpState.EXPIRED, OpState.SUCCEEDED, OpState.FAILED, OpState.CANCELED, OpState.ERROR}
)


class Operation(SQLModel, table=True):
    __tablename__ = "operations"
    __table_args__ = (Index("ix_operations_due", "state", "next_poll_at"),)

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(index=True)
    state: str = Field(index=True)
    step: str = ""  # the poller's sub-step within a state, e.g. "create_request"
    org: str | None = None
    summary: str = ""
    params: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    external_id: str | None = Field(default=None, index=True)
    requester: str
    channel: str
    card_ts: str | None = None
    card_digest: str | None = None
    idempotency_key: str = Field(unique=True)
    scheduled_for: datetime | None = _tz_column()
    next_poll_at: datetime | None = _tz_column()
    lease_owner: str | None = None
    lease_expires_at: datetime | None = _tz_column()
    announced_state: str | None = None
    approval_expires_at: datetime | None = _tz_column()
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))
    updated_at: datetime = Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))
    finished_at: datetime | None = _tz_column()

    @property
    def ref(self) -> str:
        return f"{REF_PREFIX[OpKind(self.kind)]}{self.id}"

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class PushTarget(SQLModel, table=True):
    """One subscriber org of a push, as planned, and what Salesforce did with it."""

    __tablename__ = "push_targets"
    __table_args__ = (UniqueConstraint("operation_id", "org_key"),)

    id: int | None = Field(default=None, primary_key=True)
    operation_id: int = Field(foreign_key="operations.id", index=True)
    org_key: str
    org_name: str = ""
    org_type: str = ""
    org_status: str = ""
    from_version: str = ""
    job_id: str | None = None
    refused_reason: str | None = None  # Salesforce refused to create the job
    job_status: str | None = None  # filled in for jobs that did not succeed
    error_type: str | None = None
    error_title: str | None = None
    error_message: str | None = None
    error_details: str | None = None


class Approval(SQLModel, table=True):
    __tablename__ = "approvals"
    __table_args__ = (UniqueConstraint("operation_id", "approver"),)

    id: int | None = Field(default=None, primary_key=True)
    operation_id: int = Field(foreign_key="operations.id", index=True)
    approver: str
    decision: str  # "approve" | "reject"
    reason: str = ""
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))


class AuditEvent(SQLModel, table=True):
    """Append-only: rows are inserted, never updated or deleted."""

    __tablename__ = "audit_events"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False, index=True))
    actor: str = ""  # Slack user id, or "bot"
    channel: str = ""
    operation_ref: str = Field(default="", index=True)
    action: str  # "command", "approve", "reject", "state", "call", "refused" …
    detail: str = ""
    outcome: str = ""


class SlackDelivery(SQLModel, table=True):
    """De-duplicates Slack deliveries (retries, double clicks) across replicas."""

    __tablename__ = "slack_deliveries"

    key: str = Field(primary_key=True)
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))


class OutboxMessage(SQLModel, table=True):
    """A message the bot owes Slack, sent in order per channel at Slack's posting rate.

    Poll cycles only write rows here (cheap, inside their lease); a sender drains them. The
    unique ``dedupe_key`` makes enqueueing idempotent, and every message carries Slack message
    metadata naming its row, so a send interrupted by a crash is checked before it is repeated.
    """

    __tablename__ = "slack_outbox"
    __table_args__ = (Index("ix_slack_outbox_channel_state", "channel", "state"),)

    id: int | None = Field(default=None, primary_key=True)
    dedupe_key: str = Field(unique=True)
    operation_id: int | None = Field(default=None, index=True)
    kind: str  # card | reply | message | file
    channel: str
    thread_ts: str | None = None
    in_card_thread: bool = False  # in the thread of the operation's card, whose ts is known once it is sent
    text: str = ""
    blocks: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    event_type: str = "chatops_message"
    file_name: str | None = None
    file_title: str | None = None
    file_content: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    state: str = Field(default="pending")  # pending | sending | sent | failed
    lease_owner: str | None = None
    lease_expires_at: datetime | None = _tz_column()
    attempts: int = 0
    next_attempt_at: datetime | None = _tz_column()  # Slack refused it for now: not before this
    sent_ts: str | None = None
    last_error: str | None = None
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))


class ChannelPace(SQLModel, table=True):
    """When each channel may next receive a message, shared by every replica."""

    __tablename__ = "slack_channel_pace"

    channel: str = Field(primary_key=True)
    next_post_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
