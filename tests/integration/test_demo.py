"""The README's demo, reduced: 3 workers x 3 rounds of a Keras digits model on the real broker."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from common.settings import Settings
from coordinator.db import Database
from coordinator.db.models import Delta
from coordinator.demo.federated import run_federated_demo

pytestmark = pytest.mark.integration


def test_federated_digits_accuracy_rises_and_every_delta_is_accounted_for(tmp_path: Path, rabbitmq):
    # Execute: the demo itself, on the suite's RabbitMQ node (in a vhost of its own).
    result = run_federated_demo(
        tmp_path / "demo", workers=3, rounds=3, epochs=2, broker_dir=Path(rabbitmq.node.directory)
    )

    # Assert: accuracy rises round after round, above the untrained model's.
    assert result.run.state == "completed"
    assert result.federated[-1] > result.federated[0] > result.initial_accuracy
    assert len(result.centralized) == 3
    # Every delta is in exactly one version: 3 per round, all aggregated, none left over.
    db = Database.from_settings(Settings(database_url=f"sqlite:///{tmp_path / 'demo' / 'fedmq.db'}"))
    try:
        with db.session() as s:
            rows = s.execute(
                select(Delta.round_id, Delta.status, func.count()).group_by(Delta.round_id, Delta.status)
            ).all()
    finally:
        db.dispose()
    assert sorted(rows) == sorted((r.id, "aggregated", 3) for r in result.run.rounds)
    assert [r.result_version for r in result.run.rounds] == [2, 3, 4]
