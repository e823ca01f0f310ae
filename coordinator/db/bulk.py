"""Many rows into one table in a few statements, with their new primary keys in order.

``INSERT ... RETURNING`` with the ids in the order of the rows (SQLAlchemy's
``sort_by_parameter_order``) is one multi-row statement per page on PostgreSQL, but SQLite has no
INSERT form that ties new rowids to the order of the rows, and SQLAlchemy then falls back to one
INSERT per row (its documentation, "Correlating RETURNING rows to parameter sets"): at a batch of
64 small deltas that was 128 statements and a third of the coordinator's intake time.

On SQLite the ids are therefore chosen here: one past the table's largest id, in order, and the
rows go in with one ``executemany``. This is what SQLite itself would assign (its ``INTEGER PRIMARY
KEY`` rule is "one more than the largest rowid"), and it is safe because fedmq's write
transactions hold SQLite's write lock from their ``BEGIN IMMEDIATE`` on (coordinator/db/engine.py):
no other connection can insert between the read of the largest id and the insert. A transaction
without that lock cannot corrupt anything either: a concurrent insert makes its insert fail on
the primary key (or on a stale WAL snapshot), and the whole transaction rolls back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Table, func, insert, select
from sqlalchemy.orm import Session


def insert_rows(session: Session, table: Table, rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """Insert ``rows`` (column values, without ``id``) into ``table``; return their ids, in order."""
    if not rows:
        return []
    if session.get_bind().dialect.name == "sqlite":
        largest = session.execute(select(func.max(table.c.id))).scalar() or 0
        ids = list(range(largest + 1, largest + 1 + len(rows)))
        session.execute(insert(table), [{**row, "id": i} for row, i in zip(rows, ids, strict=True)])
        return ids
    result = session.execute(insert(table).returning(table.c.id, sort_by_parameter_order=True), rows)
    return list(result.scalars())
