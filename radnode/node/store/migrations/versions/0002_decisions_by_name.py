"""A series keeps its routing decision whole, by field name; studies get a row; instances their provenance.

- ``series``: the ten route columns (pipelines, forwards, discard, priority, …) become one JSON ``decision``
  (``SeriesDecision.to_record``) and ``skipped`` (its instances are no job's input), so a new routing field
  needs no schema change. Existing rows are converted; their old description is kept as the note.
- ``studies``: one row per study, the row an arrival locks so two ingress processes make one job.
- ``instances.provenance``: ``external``, or ``own-result`` for a result of the node's own come back.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_RANKS = {0: "off-peak", 1: "routine", 2: "stat"}
_OLD_ROUTE_COLUMNS = ("pipelines", "forwards", "discard", "priority", "study_idle_seconds", "series_grace_seconds",
                      "late_instances", "description", "execution_mode", "timeout_seconds")


def _names(text: str | None) -> list[str]:
    return [t for t in (text or "").split(",") if t]


def _decision(row: sa.Row) -> dict:
    """The ``SeriesDecision`` record of an old series row (written without the vocabulary: a migration
    keeps the form of its own time)."""
    return {
        "pipelines": _names(row.pipelines), "forwards": _names(row.forwards), "discard": bool(row.discard),
        "priority": _RANKS.get(row.priority, "routine"),
        "completeness": {"study_idle_seconds": row.study_idle_seconds, "series_grace_seconds": row.series_grace_seconds,
                         "late_instances": row.late_instances or None},
        "execution": {"mode": row.execution_mode or None, "timeout_seconds": row.timeout_seconds},
        "matched_rules": [], "provenance": "external", "note": row.description or "",
    }


def upgrade() -> None:
    bind = op.get_bind()
    op.create_table("studies", sa.Column("study_instance_uid", sa.Text, primary_key=True),
                    sa.Column("first_received_at", sa.Double, nullable=False))
    jobs = sa.table("jobs", sa.column("study_instance_uid"), sa.column("created_at"))
    op.execute(sa.table("studies", sa.column("study_instance_uid"), sa.column("first_received_at")).insert()
               .from_select(["study_instance_uid", "first_received_at"],
                            sa.select(jobs.c.study_instance_uid, sa.func.min(jobs.c.created_at))
                            .group_by(jobs.c.study_instance_uid)))

    op.add_column("series", sa.Column("decision", sa.JSON))
    op.add_column("series", sa.Column("skipped", sa.Boolean))
    old = sa.table("series", sa.column("series_instance_uid"), *(sa.column(c) for c in _OLD_ROUTE_COLUMNS),
                   sa.column("decision", sa.JSON), sa.column("skipped", sa.Boolean))
    for row in bind.execute(sa.select(old)).all():
        bind.execute(old.update().where(old.c.series_instance_uid == row.series_instance_uid)
                     .values(decision=_decision(row), skipped=bool(row.discard)))
    with op.batch_alter_table("series") as batch:
        for name in _OLD_ROUTE_COLUMNS:
            batch.drop_column(name)
        batch.alter_column("decision", existing_type=sa.JSON, nullable=False)
        batch.alter_column("skipped", existing_type=sa.Boolean, nullable=False)

    op.add_column("instances", sa.Column("provenance", sa.Text, nullable=False, server_default="external"))


def downgrade() -> None:
    raise NotImplementedError("radnode does not downgrade a job store: restore the backup taken before upgrading")
