"""The console's tables: users, API tokens and login sessions, run-time settings, reviews, study details.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("role", sa.Text, nullable=False),
        sa.Column("password_hash", sa.Text, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("last_login_at", sa.Double))
    op.create_table(
        "api_tokens",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("role", sa.Text, nullable=False),
        sa.Column("token_sha256", sa.Text, nullable=False, unique=True),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("expires_at", sa.Double),
        sa.Column("last_used_at", sa.Double))
    op.create_table(
        "sessions",
        sa.Column("id_sha256", sa.Text, primary_key=True),
        sa.Column("user_name", sa.Text, sa.ForeignKey("users.name", ondelete="CASCADE"), nullable=False),
        sa.Column("csrf", sa.Text, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("expires_at", sa.Double, nullable=False))
    op.create_table(
        "node_settings",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("changed_at", sa.Double, nullable=False),
        sa.Column("changed_by", sa.Text, nullable=False))
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("decision", sa.Text, nullable=False),
        sa.Column("reviewer", sa.Text, nullable=False),
        sa.Column("note", sa.Text, nullable=False, server_default=""),
        sa.Column("at", sa.Double, nullable=False),
        sqlite_autoincrement=True)
    op.create_index("reviews_job", "reviews", ["job_id"])
    op.create_table(
        "study_details",
        sa.Column("study_instance_uid", sa.Text, primary_key=True),
        sa.Column("sealed_accession_number", sa.Text, nullable=False, server_default=""),
        sa.Column("study_description", sa.Text, nullable=False, server_default=""))


def downgrade() -> None:
    for table in ("study_details", "reviews", "node_settings", "sessions", "api_tokens", "users"):
        op.drop_table(table)
