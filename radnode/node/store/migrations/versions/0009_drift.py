"""Drift: each study's input and output attributes, each attribute's latest comparison, one alert per episode.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "drift_observations",
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", name="fk_drift_observations_job_id_jobs"),
                  nullable=False),
        sa.Column("pipeline", sa.Text, nullable=False),
        sa.Column("recorded_at", sa.Double, nullable=False),
        sa.Column("inputs", sa.JSON, nullable=False),
        sa.Column("outputs", sa.JSON, nullable=False),
        sa.PrimaryKeyConstraint("job_id", name="pk_drift_observations"),
    )
    op.create_index("drift_observations_pipeline", "drift_observations", ["pipeline", "job_id"])
    op.create_table(
        "drift_states",
        sa.Column("pipeline", sa.Text, nullable=False),
        sa.Column("attribute", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("psi", sa.Double, nullable=False),
        sa.Column("p_value", sa.Double, nullable=False),
        sa.Column("drifting", sa.Boolean, nullable=False),
        sa.Column("baseline_n", sa.Integer, nullable=False),
        sa.Column("window_n", sa.Integer, nullable=False),
        sa.Column("baseline", sa.Text, nullable=False),
        sa.Column("window", sa.Text, nullable=False),
        sa.Column("evaluated_at", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("pipeline", "attribute", name="pk_drift_states"),
    )
    op.create_table(
        "drift_alerts",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("pipeline", sa.Text, nullable=False),
        sa.Column("attribute", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("psi", sa.Double, nullable=False),
        sa.Column("peak_psi", sa.Double, nullable=False),
        sa.Column("p_value", sa.Double, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("raised_at", sa.Double, nullable=False),
        sa.Column("cleared_at", sa.Double),
        sa.PrimaryKeyConstraint("id", name="pk_drift_alerts"),
        sqlite_autoincrement=True,
    )
    op.create_index("drift_alerts_open", "drift_alerts", ["pipeline", "attribute", "cleared_at"])


def downgrade() -> None:
    raise NotImplementedError("radnode does not downgrade a job store: restore the backup taken before upgrading")
