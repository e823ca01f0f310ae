"""Alembic migrations for the coordinator's SQL schema (run with ``fedmq db upgrade``).

The Alembic configuration is built in code by :mod:`coordinator.db.schema`; this package only ships
``env.py``, the script template and ``versions/``.
"""
