"""slack outbox

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 09:02:28.707599
"""

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "slack_channel_pace",
        sa.Column("channel", AutoString(), nullable=False),
        sa.Column("next_post_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("channel"),
    )
    op.create_table(
        "slack_outbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dedupe_key", AutoString(), nullable=False),
        sa.Column("operation_id", sa.Integer(), nullable=True),
        sa.Column("kind", AutoString(), nullable=False),
        sa.Column("channel", AutoString(), nullable=False),
        sa.Column("thread_ts", AutoString(), nullable=True),
        sa.Column("in_card_thread", sa.Boolean(), nullable=False),
        sa.Column("text", AutoString(), nullable=False),
        sa.Column("blocks", sa.JSON(), nullable=True),
        sa.Column("event_type", AutoString(), nullable=False),
        sa.Column("file_name", AutoString(), nullable=True),
        sa.Column("file_title", AutoString(), nullable=True),
        sa.Column("file_content", sa.LargeBinary(), nullable=True),
        sa.Column("state", AutoString(), nullable=False),
        sa.Column("lease_owner", AutoString(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("sent_ts", AutoString(), nullable=True),
        sa.Column("last_error", AutoString(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("dedupe_key"),
    )
    with op.batch_alter_table("slack_outbox", schema=None) as batch_op:
        batch_op.create_index("ix_slack_outbox_channel_state", ["channel", "state"], unique=False)
        batch_op.create_index(batch_op.f("ix_slack_outbox_operation_id"), ["operation_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("slack_outbox", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_slack_outbox_operation_id"))
        batch_op.drop_index("ix_slack_outbox_channel_state")

    op.drop_table("slack_outbox")
    op.drop_table("slack_channel_pace")
