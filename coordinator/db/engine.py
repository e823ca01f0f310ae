"""Engines and sessions for SQLite and PostgreSQL, with the driver's errors mapped into ours.

:class:`Database` owns one engine and hands out sessions that commit on success, roll back on any
error, and translate SQLAlchemy/driver exceptions into the :class:`~common.errors.StorageError`
family (see :func:`translate_errors`), so a caller never sees a half-written state or a traceback
from the driver.

SQLite (the default, a file in the working directory) is opened with:

- ``journal_mode=WAL``: readers do not block the writer;
- ``synchronous=FULL``: with WAL, ``NORMAL`` survives a ``kill -9`` of the process but can lose the
  last commits on power loss or an OS crash; ``FULL`` syncs the WAL on every commit, which costs
  little at fedmq's commit rate and means a version the registry reported as stored stays stored;
- ``foreign_keys=ON`` (SQLite's default is off) and a ``busy_timeout`` from the settings;
- write transactions start with ``BEGIN IMMEDIATE`` (see :meth:`Database.session`), so two writers
  queue on the busy timeout instead of failing with a deadlock when a read lock is upgraded.

PostgreSQL URLs (``postgresql://``) use psycopg 3, a connect timeout and a lock timeout.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

from common.errors import (
    ConfigError,
    DatabaseLockedError,
    DatabaseUnavailableError,
    FedmqError,
    SchemaOutOfDateError,
    StorageError,
)
from common.settings import Settings, redact_url

logger = logging.getLogger(__name__)

_WRITE_OPTION = "fedmq_write"


def normalize_url(url: str) -> URL:
    """Parse ``url`` and pick our drivers: pysqlite for SQLite, psycopg 3 for PostgreSQL."""
    try:
        parsed = make_url(url)
    except exc.ArgumentError as err:
        raise StorageError(f"invalid database URL {redact_url(url)!r}") from err
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def describe_url(url: URL) -> str:
    """A human description of where the database is, without the password."""
    if url.get_backend_name() == "sqlite":
        return f"SQLite database {url.database or ':memory:'}"
    return f"PostgreSQL at {url.render_as_string(hide_password=True)}"


def create_db_engine(settings: Settings) -> Engine:
    """Create the engine for ``settings.database_url`` with the pragmas and timeouts described above."""
    url = normalize_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url, settings.db_busy_timeout_s)
    if url.get_backend_name() == "postgresql":
        lock_ms = int(settings.db_busy_timeout_s * 1000)
        try:
            import psycopg  # noqa: F401  (SQLAlchemy imports it lazily; fail here with a clear message)
        except ImportError as err:
            raise ConfigError("PostgreSQL needs psycopg 3: pip install 'fedmq[postgres]'") from err
        return create_engine(
            url,
            pool_pre_ping=True,
            connect_args={
                "connect_timeout": max(1, math.ceil(settings.db_connect_timeout_s)),
                "options": f"-c lock_timeout={lock_ms}",
            },
        )
    raise StorageError(f"unsupported database {url.get_backend_name()!r}: use sqlite or postgresql")


SQLITE_PAGE_SIZE = 65536  # SQLite's largest
SQLITE_AUTOCHECKPOINT_PAGES = (1 << 30) // SQLITE_PAGE_SIZE
CHECKPOINT_MIN_WAL_BYTES = 64 << 20


def _sqlite_engine(url: URL, busy_timeout_s: float) -> Engine:
    engine = create_engine(url, connect_args={"timeout": busy_timeout_s})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event (below) issue BEGIN itself instead of pysqlite's own logic.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            # Large pages for a new database (ignored for an existing one): weight blobs of many
            # MB are written and fsynced about twice as fast as with 4 KiB pages (100 MB: ~0.3 s
            # instead of ~0.6 s), small transactions no slower. Must precede journal_mode = WAL.
            cursor.execute(f"PRAGMA page_size = {SQLITE_PAGE_SIZE}")
            cursor.execute("PRAGMA journal_mode = WAL")
            # Checkpoints (copying the WAL into the database file) happen when the WAL passes
            # 1 GiB instead of 64 MiB, and the coordinator runs them off its intake path
            # (Database.checkpoint, from its ticker): a commit writes the WAL and fsyncs it,
            # nothing more. Durability is the same: every commit is fsynced in the WAL. (Blobs of
            # 8 MiB or more are files beside the database: coordinator/db/blobs.py.)
            cursor.execute(f"PRAGMA wal_autocheckpoint = {SQLITE_AUTOCHECKPOINT_PAGES}")
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get(_WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _first_line(err: BaseException) -> str:
    text = str(getattr(err, "orig", None) or err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def translate_errors(url: URL) -> Iterator[None]:
    """Map SQLAlchemy and driver exceptions raised inside the block to our StorageError family.

    Our own errors pass through unchanged. The mapping (each becomes one readable line):

    - SQLite "database is locked"/"busy" -> :class:`DatabaseLockedError`
    - a server that cannot be reached, or a file that cannot be opened -> :class:`DatabaseUnavailableError`
    - a missing table -> :class:`SchemaOutOfDateError` (the schema was never created)
    - anything else from the driver -> :class:`StorageError`
    """
    where = describe_url(url)
    try:
        yield
    except FedmqError:
        raise
    except exc.DBAPIError as err:
        raise _map_dbapi_error(err, where) from err
    except exc.SQLAlchemyError as err:
        raise StorageError(f"{where}: {_first_line(err)}") from err


def _map_dbapi_error(err: exc.DBAPIError, where: str) -> StorageError:
    message = _first_line(err)
    lowered = message.lower()
    if "database is locked" in lowered or "database is busy" in lowered or "lock timeout" in lowered:
        return DatabaseLockedError(
            f"{where} is locked by another process (waited for the busy timeout): try again"
        )
    if "no such table" in lowered or ("relation" in lowered and "does not exist" in lowered):
        return SchemaOutOfDateError(f"{where} has no fedmq schema ({message}): run `fedmq db upgrade`")
    if err.connection_invalidated or _is_connect_failure(err, lowered):
        return DatabaseUnavailableError(f"cannot open {where}: {message}")
    return StorageError(f"{where}: {message}")


def _is_connect_failure(err: exc.DBAPIError, lowered: str) -> bool:
    markers = (
        "unable to open database file",
        "connection refused",
        "could not connect",
        "connection failed",
        "timeout expired",
        "could not translate host name",
        "failed to resolve host",
        "no such file or directory",
        "password authentication failed",
        "does not exist",
        "server closed the connection",
    )
    return isinstance(err, exc.OperationalError | exc.InterfaceError) and any(m in lowered for m in markers)


class Database:
    """One engine plus a session factory; create once per process with :meth:`from_settings`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.url: URL = engine.url
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(
            engine.execution_options(**{_WRITE_OPTION: True}), expire_on_commit=False
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        return cls(create_db_engine(settings))

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.url.get_backend_name()

    @property
    def description(self) -> str:
        return describe_url(self.url)

    @contextlib.contextmanager
    def session(self, *, write: bool = False) -> Iterator[Session]:
        """A session in one transaction: committed when the block ends, rolled back on any error.

        ``write=True`` takes SQLite's write lock up front (``BEGIN IMMEDIATE``); use it for every
        transaction that writes. Errors come out as :class:`~common.errors.StorageError` subclasses.
        """
        factory = self._write_sessions if write else self._sessions
        with translate_errors(self.url), factory() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def checkpoint(self, min_wal_bytes: int = CHECKPOINT_MIN_WAL_BYTES) -> bool:
        """SQLite: copy the WAL into the database file when it holds ``min_wal_bytes`` or more,
        without waiting for (or blocking) readers and writers. True when a checkpoint ran.

        The coordinator calls this from its ticker so that checkpoints stay off its intake path
        (see ``wal_autocheckpoint`` in the engine). Nothing to do on PostgreSQL.
        """
        if self.backend != "sqlite" or not self.url.database or self.url.database == ":memory:":
            return False
        try:
            wal_bytes = os.path.getsize(f"{self.url.database}-wal")
        except OSError:
            return False
        if wal_bytes < min_wal_bytes:
            return False
        with translate_errors(self.url), self.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
        return True

    def check_connection(self) -> None:
        """Open a connection once; raise DatabaseUnavailableError with a clear message if we cannot."""
        with translate_errors(self.url), self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def dispose(self) -> None:
        self.engine.dispose()


def wait_for_database(db: Database, timeout_s: float, *, interval_s: float = 0.5) -> None:
    """Retry :meth:`Database.check_connection` until it works or ``timeout_s`` passes.

    For start-up next to a database that is still booting (containers). Only "unavailable" is
    retried; a locked database or any other error is raised at once.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            db.check_connection()
            return
        except DatabaseUnavailableError:
            if time.monotonic() >= deadline:
                raise
            logger.info("waiting for %s", db.description)
            time.sleep(interval_s)
