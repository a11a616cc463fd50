"""Study integrity: refused instances per study, and result versions per study.

- ``refusals``: instances the node refused for their content (an implausible header, a SOP Instance UID that
  belongs to another study); their study is not processed while one is recorded.
- ``studies.expected_instances``: the sender's Number of Study Related Instances (completeness).
- ``result_versions``: each job that staged results is a version of its study's results per pipeline; a newer
  version supersedes the earlier one (IOCM rejection note, FHIR report updated in place).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("studies", sa.Column("expected_instances", sa.Integer))
    op.create_table(
        "refusals",
        sa.Column("study_instance_uid", sa.Text, nullable=False),
        sa.Column("sop_instance_uid", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("calling_ae", sa.Text, nullable=False, server_default=""),
        sa.Column("at", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("study_instance_uid", "sop_instance_uid", name="pk_refusals"),
    )
    op.create_table(
        "result_versions",
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", name="fk_result_versions_job_id_jobs"),
                  nullable=False),
        sa.Column("study_instance_uid", sa.Text, nullable=False),
        sa.Column("pipeline", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("superseded_by", sa.Integer, sa.ForeignKey("jobs.id", name="fk_result_versions_superseded_by_jobs")),
        sa.Column("superseded_at", sa.Double),
        sa.PrimaryKeyConstraint("job_id", name="pk_result_versions"),
        sa.UniqueConstraint("study_instance_uid", "pipeline", "version",
                            name="uq_result_versions_study_instance_uid_pipeline_version"),
    )


def downgrade() -> None:
    raise NotImplementedError("radnode does not downgrade a job store: restore the backup taken before upgrading")
