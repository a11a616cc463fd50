"""Patient identifiers at rest: the ``sealed_patient_id`` columns of ``jobs`` and ``instances`` (and the console's
``study_details.sealed_accession_number``).

A node opens its store with its site key's seal (:class:`radnode.security.privacy.IdentitySeal`, Fernet), so
the database (a backup, a support bundle, a shared PostgreSQL) names no patient without the key; records come
out with the Patient ID opened. A store opened without a seal (a tool reading it) keeps and returns values as
they are. Values written before sealing existed are read as they are, and sealed by :meth:`seal_stored` (the
node calls it at start; a schema migration cannot, it has no key).
"""

from __future__ import annotations

from typing import Protocol

from sqlalchemy import select, update

from radnode.node.store.database import Database
from radnode.node.store.schema import instances, jobs


class Seal(Protocol):
    """Seals and opens one identifier; a sealed value starts with ``PREFIX`` (one stored in clear does not)."""

    PREFIX: str

    def seal(self, value: str) -> str: ...

    def open(self, value: str) -> str: ...


class Identities:
    """Sealing the store's patient identifiers (see the module docstring)."""

    _db: Database

    def seal_stored(self) -> int:
        """Seal every patient identifier still stored in clear (written before sealing); returns how many rows.
        One query finds none on a store already sealed."""
        seal = self._db.seal
        if seal is None:
            return 0
        count = 0
        with self._db.write() as conn:
            for table, key in ((jobs, jobs.c.id), (instances, instances.c.sop_instance_uid)):
                column = table.c.sealed_patient_id
                rows = conn.execute(select(key, column).where(column != "", column.not_like(f"{seal.PREFIX}%")))
                for row_key, value in rows.all():
                    conn.execute(update(table).where(key == row_key).values(sealed_patient_id=seal.seal(value)))
                    count += 1
        return count
