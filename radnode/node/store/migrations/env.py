"""Alembic's environment for the job store: migrations run on the connection ``database.py`` hands over,
inside its transaction (SQLite tables are changed in batch mode: copy, alter, swap)."""

from __future__ import annotations

from alembic import context

from radnode.node.store.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
