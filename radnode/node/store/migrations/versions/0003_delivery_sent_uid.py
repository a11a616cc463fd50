"""A delivery records the SOP Instance UID that went out, so a re-send can be checked against it.

- ``deliveries.sent_uid``: set when a DICOM object is delivered (``delivery_done(..., sent_uid=)``); empty for
  deliveries done before this revision and for non-DICOM objects (a FHIR Bundle).

A store written by the development build that added the column before this revision existed already has
it; it is then left as it is.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if "sent_uid" not in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("deliveries")}:
        op.add_column("deliveries", sa.Column("sent_uid", sa.Text))


def downgrade() -> None:
    raise NotImplementedError("radnode does not downgrade a job store: restore the backup taken before upgrading")
