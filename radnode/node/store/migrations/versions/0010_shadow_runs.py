"""Shadow runs: a job flag for candidate runs (never delivered) and their comparison with the production run.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ADD COLUMN (constant default): SQLite's batch mode would rebuild ``jobs`` under its foreign keys
    op.add_column("jobs", sa.Column("shadow", sa.Boolean, nullable=False, server_default=sa.false()))
    op.create_table(
        "shadow_comparisons",
        sa.Column("shadow_job_id", sa.Integer,
                  sa.ForeignKey("jobs.id", name="fk_shadow_comparisons_shadow_job_id_jobs"), primary_key=True),
        sa.Column("production_job_id", sa.Integer,
                  sa.ForeignKey("jobs.id", name="fk_shadow_comparisons_production_job_id_jobs"), nullable=False),
        sa.Column("study_instance_uid", sa.Text, nullable=False),
        sa.Column("production_pipeline", sa.Text, nullable=False),
        sa.Column("candidate_pipeline", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("message", sa.Text, nullable=False, server_default=""),
        sa.Column("segments", sa.JSON),
        sa.Column("measurements", sa.JSON),
        sa.Column("production_wall_seconds", sa.Double),
        sa.Column("production_cpu_seconds", sa.Double),
        sa.Column("candidate_wall_seconds", sa.Double),
        sa.Column("candidate_cpu_seconds", sa.Double),
        sa.Column("compared_at", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("shadow_job_id", name="pk_shadow_comparisons"))
    op.create_index("shadow_comparisons_pipelines", "shadow_comparisons", ["production_pipeline", "candidate_pipeline"])
    op.create_index("shadow_comparisons_production", "shadow_comparisons", ["production_job_id"])


def downgrade() -> None:
    op.drop_table("shadow_comparisons")
    op.drop_column("jobs", "shadow")
