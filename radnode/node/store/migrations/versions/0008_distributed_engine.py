"""The distributed engine's records: the broker outbox, attempts per job, workers; a job's queue and lease.

- ``jobs``: ``queue`` (the rules' broker queue), ``dispatch_id`` (its current publication), ``attempt`` (its
  current attempt, the fencing token a worker reports with), ``worker``, ``lease_until``, ``outcome``.
- ``publications``: broker messages written with the dispatch, published afterwards (the outbox).
- ``attempts``: one row per run on a worker, how it ended and why.
- ``workers``: ``radnode worker`` processes with their queues, GPUs, current job and last heartbeat.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ADD COLUMN (constant defaults): SQLite's batch mode would rebuild ``jobs`` under its foreign keys
    op.add_column("jobs", sa.Column("queue", sa.Text, nullable=False, server_default=""))
    op.add_column("jobs", sa.Column("dispatch_id", sa.Integer))
    op.add_column("jobs", sa.Column("attempt", sa.Integer, nullable=False, server_default=sa.text("0")))
    op.add_column("jobs", sa.Column("worker", sa.Text, nullable=False, server_default=""))
    op.add_column("jobs", sa.Column("lease_until", sa.Double))
    op.add_column("jobs", sa.Column("outcome", sa.Text))
    op.create_table(
        "publications",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", name="fk_publications_job_id_jobs"), nullable=False),
        sa.Column("queue", sa.Text, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("published_at", sa.Double),
        sa.Column("tries", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.Text),
        sa.PrimaryKeyConstraint("id", name="pk_publications"),
        sqlite_autoincrement=True,
    )
    op.create_index("publications_unpublished", "publications", ["published_at"],
                    sqlite_where=sa.text("published_at IS NULL"), postgresql_where=sa.text("published_at IS NULL"))
    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", name="fk_attempts_job_id_jobs"), nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("worker", sa.Text, nullable=False),
        sa.Column("started_at", sa.Double, nullable=False),
        sa.Column("ended_at", sa.Double),
        sa.Column("outcome", sa.Text, nullable=False, server_default="running"),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
        sa.PrimaryKeyConstraint("id", name="pk_attempts"),
        sa.UniqueConstraint("job_id", "number", name="uq_attempts_job_id_number"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "workers",
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("queues", sa.Text, nullable=False),
        sa.Column("gpus", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", sa.Double, nullable=False),
        sa.Column("heartbeat_at", sa.Double, nullable=False),
        sa.Column("current_job", sa.Integer),
        sa.Column("stopped_at", sa.Double),
        sa.PrimaryKeyConstraint("name", name="pk_workers"),
    )


def downgrade() -> None:
    raise NotImplementedError("radnode does not downgrade a job store: restore the backup taken before upgrading")
