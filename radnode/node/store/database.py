"""Where the job store lives and how it is opened: SQLite under ``data_dir`` or PostgreSQL, one engine each.

**SQLite** (the embedded default, ``data_dir/radnode.db``): WAL journal, ``synchronous=NORMAL``, foreign
keys on. Write transactions start with ``BEGIN IMMEDIATE`` (taking the database's write lock at once, so
another process such as ``radnode purge`` waits its turn instead of failing mid-transaction) and are
serialised inside the process by a lock; reads run beside them on their own connections (WAL snapshots).
An older database (a previous release's, Alembic's revisions or the ad-hoc columns before them) is
upgraded when it is opened.

**PostgreSQL** (``store: {url: postgresql://user@host/db}``, driver psycopg 3): READ COMMITTED, with row
locks where a decision reads before it writes (a study's row for its arrivals, a job's for its transitions)
and unique constraints with ``ON CONFLICT DO NOTHING`` where two writers may insert the same thing. An
empty database gets the schema; one at an older revision is refused (``radnode store upgrade`` upgrades it:
several nodes may share it, so a node never migrates it behind the others' backs); an unreachable one is
refused with one line.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, Table, create_engine, event, inspect, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.sql.dml import Insert

from radnode.node.store.schema import metadata

if TYPE_CHECKING:
    from radnode.node.store.identity import Seal

SQLITE_FILE = "radnode.db"
"""The embedded store's file name under ``data_dir``."""

SCHEMA_LOCK_KEY = 0x7261646E6F6465  # "radnode"
"""PostgreSQL advisory lock held while a node checks, creates or upgrades the schema."""

RADNODE_TABLES = frozenset(metadata.tables) | {"jobs"}
"""Tables whose presence means a database already holds a radnode store (of any revision)."""


class StoreError(RuntimeError):
    """The job store cannot be used: unreachable, or at a schema this release does not run on. ``str()`` is
    one line naming the store and what to do."""


def alembic_config(connection: Connection | None = None) -> AlembicConfig:
    """Alembic's configuration for the store's revisions, run on ``connection`` (in its transaction)."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(files("radnode.node.store") / "migrations"))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The schema revision this release writes."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


_SEALED_STUDIES = 64
"""Studies whose sealed patient identifier a store keeps at hand (those receiving now)."""


@dataclass
class Database:
    """One store's engine and how to run transactions on it (see the module docstring)."""

    engine: Engine
    label: str
    """The store as messages name it (its URL without a password, or the SQLite file)."""
    opened: str = ""
    """What opening did (created, upgraded, or found at the current revision), for the node's log."""
    seal: "Seal | None" = None
    """Seals patient identifiers on writing and opens them on reading (``identity.py``); None: as they are."""
    _write_lock: Any = field(default_factory=threading.RLock)
    _sealed_by_study: OrderedDict[tuple[str, str], str] = field(default_factory=OrderedDict)
    _seal_lock: Any = field(default_factory=threading.Lock)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def write(self, commit: bool = True) -> Iterator[Connection]:
        """One write transaction, rolled back on any error (and at the end unless ``commit``)."""
        with self._write_lock if self.is_sqlite else nullcontext():
            with self.engine.connect() as conn:
                conn.info["radnode_write"] = True
                transaction = conn.begin()
                try:
                    yield conn
                except BaseException:
                    transaction.rollback()
                    raise
                if commit:
                    transaction.commit()
                else:
                    transaction.rollback()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for queries (nothing is written; SQLite reads one WAL snapshot, beside any writer)."""
        with self.engine.connect() as conn:
            yield conn

    def sealed(self, patient_id: str, study: str = "") -> str:
        """A patient identifier (Patient ID, accession number) as the store keeps it. With ``study``: one sealed
        value for all the study's instances, encrypted once (they are linked by their study anyway; each study
        gets its own, so sealed values never show which studies share a patient)."""
        if self.seal is None:
            return patient_id
        if not study:
            return self.seal.seal(patient_id)
        key = (study, patient_id)
        with self._seal_lock:
            if (value := self._sealed_by_study.get(key)) is not None:
                self._sealed_by_study.move_to_end(key)
                return value
        value = self.seal.seal(patient_id)
        with self._seal_lock:
            self._sealed_by_study[key] = value
            if len(self._sealed_by_study) > _SEALED_STUDIES:
                self._sealed_by_study.popitem(last=False)
        return value

    def opened_identity(self, stored: str) -> str:
        """A stored patient identifier as records carry it."""
        return self.seal.open(stored) if self.seal is not None else stored

    def insert_ignoring_conflicts(self, table: Table) -> Insert:
        """``INSERT … ON CONFLICT DO NOTHING`` in this database's dialect (a row that would break a unique
        constraint is skipped, the transaction goes on)."""
        dialect = sqlite if self.is_sqlite else postgresql
        return dialect.insert(table).on_conflict_do_nothing()

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_engine(path: Path) -> Engine:
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # pysqlite's own BEGIN off: the "begin" hook below emits it
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON"):
            dbapi_connection.execute(f"PRAGMA {pragma}")

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.pop("radnode_write", False) else "BEGIN")

    return engine


def _postgresql_engine(url: str) -> tuple[Engine, str]:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreError(f"store.url {url!r} is not a database URL (expected postgresql://user@host/db)") from None
    if parsed.get_backend_name() != "postgresql":
        raise StoreError(f"store.url {parsed.render_as_string(hide_password=True)}: only postgresql:// is supported "
                         "(leave store.url unset for the embedded SQLite store)")
    if parsed.get_driver_name() in ("", "psycopg2"):  # plain postgresql:// means psycopg 3, the driver installed
        parsed = parsed.set(drivername="postgresql+psycopg")
    label = parsed.set(drivername="postgresql").render_as_string(hide_password=True)
    engine = create_engine(parsed, pool_pre_ping=True, pool_size=5, max_overflow=10,
                           connect_args={"connect_timeout": 10})
    return engine, label


def connect(target: Path | str) -> Database:
    """The store at ``target`` (a SQLite file path, or a PostgreSQL URL), schema not looked at yet."""
    if isinstance(target, Path) or not str(target).startswith("postgresql"):
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        return Database(_sqlite_engine(path), str(path))
    return Database(*_postgresql_engine(str(target)))


def open_database(target: Path | str, upgrade: bool | None = None) -> Database:
    """The store at ``target`` at the newest schema, and what was done to it, in words.

    ``upgrade``: migrate an older schema (default: yes for SQLite, no for PostgreSQL, see the module
    docstring). Raises :class:`StoreError` when it cannot be reached or is at a schema this release cannot
    use.
    """
    database = connect(target)
    if upgrade is None:
        upgrade = database.is_sqlite
    try:
        database.opened = ensure_schema(database, upgrade)
    except OperationalError as e:
        database.close()
        reason = str(e.orig).strip().splitlines()[0] if e.orig is not None else str(e)
        raise StoreError(f"job store {database.label} unreachable: {reason}") from None
    except BaseException:
        database.close()
        raise
    return database


def ensure_schema(database: Database, upgrade: bool) -> str:
    """Bring the store to the head revision (create it when empty, migrate when ``upgrade``), or raise
    :class:`StoreError` saying why not. Returns what was done, in words."""
    head = head_revision()
    with database.write() as conn:
        if not database.is_sqlite:  # nodes starting at once on one database: one looks (and creates) at a time
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        current = MigrationContext.configure(conn).get_current_revision()
        if current == head:
            return f"job store {database.label} at schema revision {head}"
        known = {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
        if current is not None and current not in known:
            raise StoreError(f"job store {database.label} is at schema revision {current}, which this radnode "
                             f"does not know (it writes {head}): a newer release made it; run that release")
        empty = not (RADNODE_TABLES & set(inspect(conn).get_table_names()))
        if not (upgrade or empty):
            found = current or "from before schema revisions"
            raise StoreError(f"job store {database.label} is at an older schema ({found}; this radnode needs "
                             f"{head}): back it up, then run `radnode store upgrade --config FILE`")
        if empty:  # Alembic's advice for a new database: the tables as they are now, stamped with their revision
            metadata.create_all(conn)
            command.stamp(alembic_config(conn), "head")
        else:
            command.upgrade(alembic_config(conn), "head")
        return (f"job store {database.label} created at schema revision {head}" if empty else
                f"job store {database.label} upgraded from {current or 'before schema revisions'} to {head}")
