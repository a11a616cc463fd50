"""Clinicians' corrections of the node's segmentations and their agreement with the node's result.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "corrections",
        sa.Column("sop_instance_uid", sa.Text, primary_key=True),
        sa.Column("study_instance_uid", sa.Text, nullable=False),
        sa.Column("received_at", sa.Double, nullable=False),
        sa.Column("state", sa.Text, nullable=False, server_default="pending"),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id")),
        sa.Column("result_sop_instance_uid", sa.Text),
        sa.Column("model_version", sa.Text, nullable=False, server_default=""),
        sa.Column("agreement", sa.JSON),
        sa.Column("message", sa.Text, nullable=False, server_default=""),
        sa.Column("settled_at", sa.Double))
    op.create_index("corrections_job", "corrections", ["job_id"])
    op.create_index("corrections_state", "corrections", ["state"])


def downgrade() -> None:
    op.drop_table("corrections")
