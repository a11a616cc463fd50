"""Patient identifiers are kept sealed under the site key (``identity.py``): the column says so by its name.

- ``jobs.patient_id`` → ``jobs.sealed_patient_id``, ``instances.patient_id`` → ``instances.sealed_patient_id``.
  The values are kept: a migration has no key to seal them with, so they stay in clear until the node next
  starts with its site key and seals them (``JobStore.seal_stored``); until then they read as they are.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("jobs", "instances"):  # RENAME COLUMN: SQLite 3.25+ and PostgreSQL; no table rebuild
        op.execute(f"ALTER TABLE {table} RENAME COLUMN patient_id TO sealed_patient_id")


def downgrade() -> None:
    raise NotImplementedError("radnode does not downgrade a job store: restore the backup taken before upgrading")
