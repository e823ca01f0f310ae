"""The coordinator's SQL persistence: engine and sessions, ORM models, blobs, schema migrations.

Typical start-up::

    db = open_checked(load_settings(), wait_s=30)   # waits for the server, refuses an old schema
    with db.session(write=True) as session:
        ...
"""

from __future__ import annotations

from coordinator.db.engine import Database, create_db_engine, translate_errors, wait_for_database
from coordinator.db.schema import current_revision, head_revision, open_checked, require_current, upgrade

__all__ = [
    "Database",
    "create_db_engine",
    "current_revision",
    "head_revision",
    "open_checked",
    "require_current",
    "translate_errors",
    "upgrade",
    "wait_for_database",
]
