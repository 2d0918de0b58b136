"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23 08:29:43.765399
"""

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", AutoString(), nullable=False),
        sa.Column("channel", AutoString(), nullable=False),
        sa.Column("operation_ref", AutoString(), nullable=False),
        sa.Column("action", AutoString(), nullable=False),
        sa.Column("detail", AutoString(), nullable=False),
        sa.Column("outcome", AutoString(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_events_at"), ["at"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_events_operation_ref"), ["operation_ref"], unique=False)

    op.create_table(
        "operations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", AutoString(), nullable=False),
        sa.Column("state", AutoString(), nullable=False),
        sa.Column("step", AutoString(), nullable=False),
        sa.Column("org", AutoString(), nullable=True),
        sa.Column("summary", AutoString(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("external_id", AutoString(), nullable=True),
        sa.Column("requester", AutoString(), nullable=False),
        sa.Column("channel", AutoString(), nullable=False),
        sa.Column("card_ts", AutoString(), nullable=True),
        sa.Column("card_digest", AutoString(), nullable=True),
        sa.Column("idempotency_key", AutoString(), nullable=False),
        sa.Column("scheduled_for", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_poll_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_owner", AutoString(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("announced_state", AutoString(), nullable=True),
        sa.Column("approval_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("idempotency_key"),
    )
    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.create_index("ix_operations_due", ["state", "next_poll_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_operations_external_id"), ["external_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_operations_kind"), ["kind"], unique=False)
        batch_op.create_index(batch_op.f("ix_operations_state"), ["state"], unique=False)

    op.create_table(
        "slack_deliveries",
        sa.Column("key", AutoString(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "approvals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("operation_id", sa.Integer(), nullable=False),
        sa.Column("approver", AutoString(), nullable=False),
        sa.Column("decision", AutoString(), nullable=False),
        sa.Column("reason", AutoString(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["operation_id"],
            ["operations.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("operation_id", "approver"),
    )
    with op.batch_alter_table("approvals", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_approvals_operation_id"), ["operation_id"], unique=False)

    op.create_table(
        "push_targets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("operation_id", sa.Integer(), nullable=False),
        sa.Column("org_key", AutoString(), nullable=False),
        sa.Column("org_name", AutoString(), nullable=False),
        sa.Column("org_type", AutoString(), nullable=False),
        sa.Column("org_status", AutoString(), nullable=False),
        sa.Column("from_version", AutoString(), nullable=False),
        sa.Column("job_id", AutoString(), nullable=True),
        sa.Column("refused_reason", AutoString(), nullable=True),
        sa.Column("job_status", AutoString(), nullable=True),
        sa.Column("error_type", AutoString(), nullable=True),
        sa.Column("error_title", AutoString(), nullable=True),
        sa.Column("error_message", AutoString(), nullable=True),
        sa.Column("error_details", AutoString(), nullable=True),
        sa.ForeignKeyConstraint(
            ["operation_id"],
            ["operations.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("operation_id", "org_key"),
    )
    with op.batch_alter_table("push_targets", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_push_targets_operation_id"), ["operation_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("push_targets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_push_targets_operation_id"))

    op.drop_table("push_targets")
    with op.batch_alter_table("approvals", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_approvals_operation_id"))

    op.drop_table("approvals")
    op.drop_table("slack_deliveries")
    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_operations_state"))
        batch_op.drop_index(batch_op.f("ix_operations_kind"))
        batch_op.drop_index(batch_op.f("ix_operations_external_id"))
        batch_op.drop_index("ix_operations_due")

    op.drop_table("operations")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_events_operation_ref"))
        batch_op.drop_index(batch_op.f("ix_audit_events_at"))

    op.drop_table("audit_events")
