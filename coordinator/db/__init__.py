"""The coordinator's SQL persistence: engine and sessions, ORM models, blobs, schema migrations.

Typical start-up::

    db = Database.from_settings(load_settings())
    require_current(db)          # refuses an out-of-date schema: "run `fedmq db upgrade`"
    with db.session(write=True) as session:
        ...
"""

from __future__ import annotations

from coordinator.db.engine import Database, create_db_engine, translate_errors
from coordinator.db.schema import current_revision, head_revision, require_current, upgrade

__all__ = [
    "Database",
    "create_db_engine",
    "current_revision",
    "head_revision",
    "require_current",
    "translate_errors",
    "upgrade",
]
