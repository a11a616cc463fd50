"""Baseline: the job store of radnode 0.1, before schema revisions.

Creates the tables of that release on an empty database. A database 0.1 made (SQLite, no revision recorded)
already has them, perhaps without the columns 0.1 added on open over its life: those are added here, as 0.1
itself did, so every older store arrives at one known schema. The tables are frozen as they were; later
changes are later revisions.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_frozen = sa.MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_N_name)s", "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s", "pk": "pk_%(table_name)s"})
"""Constraint names as ``schema.py`` gives them (0.1's SQLite tables, already there, keep theirs unnamed)."""
_jobs = sa.Table(
    "jobs", _frozen,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("study_instance_uid", sa.Text, nullable=False),
    sa.Column("patient_id", sa.Text, nullable=False, server_default=""),
    sa.Column("pipeline", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("calling_ae", sa.Text, nullable=False, server_default=""),
    sa.Column("peer_address", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("last_instance_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("runs", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("reason", sa.Text),
    sa.Column("priority", sa.Integer, nullable=False, server_default=sa.text("1")),
    sa.Column("forwards", sa.Text, nullable=False, server_default=""),
    sa.Column("whole_study", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("restart_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("execution_mode", sa.Text, nullable=False, server_default=""),
    sa.Column("timeout_seconds", sa.Double),
    sa.Column("needs_review", sa.Boolean),
    sa.Column("review_reasons", sa.Text, nullable=False, server_default=""),
    sa.Column("sibling_of", sa.Integer, sa.ForeignKey("jobs.id")),
    sa.Column("purge_started_at", sa.Double),
    sa.Column("purged_at", sa.Double),
    sqlite_autoincrement=True,
)
_instances = sa.Table(
    "instances", _frozen,
    sa.Column("sop_instance_uid", sa.Text, primary_key=True),
    sa.Column("study_instance_uid", sa.Text, nullable=False),
    sa.Column("series_instance_uid", sa.Text, nullable=False),
    sa.Column("patient_id", sa.Text, nullable=False),
    sa.Column("modality", sa.Text, nullable=False),
    sa.Column("sop_class_uid", sa.Text, nullable=False),
    sa.Column("calling_ae", sa.Text, nullable=False),
    sa.Column("peer_address", sa.Text, nullable=False),
    sa.Column("association_id", sa.Text, nullable=False),
    sa.Column("received_at", sa.Double, nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
    sa.Column("late", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("purged_at", sa.Double),
)
_events = sa.Table(
    "events", _frozen,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
    sa.Column("at", sa.Double, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sqlite_autoincrement=True,
)
_deliveries = sa.Table(
    "deliveries", _frozen,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
    sa.Column("destination", sa.Text, nullable=False),
    sa.Column("object", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False, server_default="pending"),
    sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("next_attempt_at", sa.Double, nullable=False),
    sa.Column("last_error", sa.Text),
    sa.Column("done_at", sa.Double),
    sa.UniqueConstraint("job_id", "destination", "object"),
    sqlite_autoincrement=True,
)
_series = sa.Table(
    "series", _frozen,
    sa.Column("series_instance_uid", sa.Text, primary_key=True),
    sa.Column("study_instance_uid", sa.Text, nullable=False),
    sa.Column("pipelines", sa.Text, nullable=False),
    sa.Column("forwards", sa.Text, nullable=False),
    sa.Column("discard", sa.Boolean, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("study_idle_seconds", sa.Double),
    sa.Column("series_grace_seconds", sa.Double),
    sa.Column("late_instances", sa.Text, nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("execution_mode", sa.Text, nullable=False, server_default=""),
    sa.Column("timeout_seconds", sa.Double),
    sa.Column("expected", sa.Integer),
    sa.Column("last_association_id", sa.Text, nullable=False, server_default=""),
    sa.Column("released_at", sa.Double),
    sa.Column("stable_at", sa.Double),
)

_ADDED_BY_RELEASE_0_1 = {
    "jobs": ("priority", "forwards", "whole_study", "restart_requested", "execution_mode", "timeout_seconds",
             "needs_review", "review_reasons", "purge_started_at", "purged_at", "sibling_of"),
    "series": ("execution_mode", "timeout_seconds"),
    "instances": ("purged_at",),
}
"""Columns 0.1 added to its own older databases on open; a database it made may lack any of them."""

_INDEXES = (
    ("jobs_study", "jobs", ("study_instance_uid",), None),
    ("jobs_state", "jobs", ("state",), None),
    ("instances_job", "instances", ("job_id",), None),
    ("events_job", "events", ("job_id",), None),
    ("deliveries_due", "deliveries", ("state", "next_attempt_at"), None),
    ("series_study", "series", ("study_instance_uid",), None),
    ("series_association", "series", ("last_association_id",), None),
    ("instances_kept", "instances", ("job_id",), "purged_at IS NULL"),
    ("jobs_purging", "jobs", ("purge_started_at",), "purge_started_at IS NOT NULL"),
    ("jobs_siblings", "jobs", ("sibling_of",), "sibling_of IS NOT NULL"),
)


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    present = set(inspector.get_table_names())
    for table in _frozen.sorted_tables:
        if table.name not in present:
            table.create(bind)
            continue
        columns = {c["name"] for c in inspector.get_columns(table.name)}
        for name in _ADDED_BY_RELEASE_0_1.get(table.name, ()):
            if name not in columns:
                column = table.c[name]
                # as 0.1 added them: a plain column (SQLite cannot add a constraint to an existing table)
                default = column.server_default.arg if column.server_default is not None else None
                op.add_column(table.name, sa.Column(name, column.type, nullable=column.nullable,
                                                    server_default=default))
    indexes = {ix["name"] for name in _frozen.tables for ix in sa.inspect(bind).get_indexes(name)}
    for name, table, columns, where in _INDEXES:
        if name not in indexes:
            condition = {} if where is None else {"sqlite_where": sa.text(where), "postgresql_where": sa.text(where)}
            op.create_index(name, table, list(columns), **condition)


def downgrade() -> None:
    for table in reversed(_frozen.sorted_tables):
        op.drop_table(table.name)
