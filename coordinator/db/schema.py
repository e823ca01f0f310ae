"""Schema migrations from code: Alembic with the scripts shipped in the ``migrations`` package.

The Alembic configuration is built here (no alembic.ini needed), pointing at the directory of the
installed ``migrations`` package, so ``fedmq db upgrade`` works from a wheel as well as a checkout.

- :func:`upgrade` brings a database to the newest revision (creating it from nothing);
- :func:`current_revision` / :func:`head_revision` say where the database and the code are;
- :func:`require_current` is the start-up check: it raises :class:`SchemaOutOfDateError` with the
  command to run when the database is behind (or ahead of) the code.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError

import migrations
from common.errors import SchemaOutOfDateError, StorageError
from common.settings import Settings
from coordinator.db.engine import Database, translate_errors, wait_for_database

logger = logging.getLogger(__name__)


def _migrations_dir() -> Path:
    """The installed ``migrations`` package's directory (works for a namespace-style install too)."""
    for entry in migrations.__path__:
        if (Path(entry) / "env.py").is_file():
            return Path(entry).resolve()
    raise StorageError("the fedmq installation has no migrations/env.py: reinstall fedmq")


MIGRATIONS_DIR = _migrations_dir()


def alembic_config(db: Database) -> Config:
    """An Alembic Config for ``db``; env.py reuses the Database's engine via ``config.attributes``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", db.url.render_as_string(hide_password=False).replace("%", "%%"))
    cfg.attributes["engine"] = db.engine
    return cfg


def head_revision() -> str:
    """The newest revision the code knows."""
    head = ScriptDirectory.from_config(_script_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships at least one revision
        raise StorageError("no migrations found in the installed fedmq package")
    return head


def current_revision(db: Database) -> str | None:
    """The database's revision, or None for a database without the fedmq schema."""
    with translate_errors(db.url), db.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(db: Database, revision: str = "head") -> tuple[str | None, str | None]:
    """Upgrade ``db`` to ``revision``; return (revision before, revision after)."""
    before = current_revision(db)
    with translate_errors(db.url):
        try:
            command.upgrade(alembic_config(db), revision)
        except CommandError as err:
            raise StorageError(f"cannot upgrade {db.description}: {err}") from err
    after = current_revision(db)
    if before != after:
        logger.info("upgraded %s from %s to %s", db.description, before, after)
    return before, after


def downgrade(db: Database, revision: str) -> None:
    """Downgrade ``db`` to ``revision`` (``base`` drops every fedmq table). For tests and recovery."""
    with translate_errors(db.url):
        try:
            command.downgrade(alembic_config(db), revision)
        except CommandError as err:
            raise StorageError(f"cannot downgrade {db.description}: {err}") from err


def require_current(db: Database) -> None:
    """Raise SchemaOutOfDateError unless ``db`` is exactly at the code's head revision."""
    head = head_revision()
    current = current_revision(db)
    if current == head:
        return
    if current is None:
        raise SchemaOutOfDateError(
            f"{db.description} has no fedmq schema: run `fedmq db upgrade` to create it"
        )
    known = {rev.revision for rev in ScriptDirectory.from_config(_script_config()).walk_revisions()}
    if current not in known:
        raise SchemaOutOfDateError(
            f"{db.description} is at revision {current}, newer than this fedmq (head {head}): upgrade fedmq"
        )
    raise SchemaOutOfDateError(
        f"{db.description} is at revision {current} but this fedmq needs {head}: run `fedmq db upgrade`"
    )


def open_checked(settings: Settings, *, wait_s: float = 0.0) -> Database:
    """Start-up step for long-running processes: open the database, wait up to ``wait_s`` for it to
    be reachable, and refuse an out-of-date schema (SchemaOutOfDateError says what to run)."""
    db = Database.from_settings(settings)
    try:
        if wait_s > 0:
            wait_for_database(db, wait_s)
        require_current(db)
    except BaseException:
        db.dispose()
        raise
    return db


def _script_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg
