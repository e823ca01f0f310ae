"""The round and intake benchmarks run end to end with their smallest settings (figures, not timing).

Each starts its own private RabbitMQ node, SQLite database, coordinator and workers, and must stop
them all. The Flower side of ``bench round`` runs only when the bench venv (``.venv-flwr``, made by
the first ``fedmq bench round``) exists, so the suite never installs packages.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest
from typer.testing import CliRunner

from coordinator.bench.round import FLOWER_VENV
from coordinator.cli.main import app

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("rabbitmq-server") is None, reason="rabbitmq-server is not installed"),
]


def bench(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(app, ["bench", *args, "--json"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return json.loads(result.stdout)


def test_intake_reports_rates_and_ratio():
    figures = bench("intake", "--deltas", "20", "--workers", "2")

    assert figures["deltas"] == 20
    for key in (
        "raw_live_per_s",
        "coordinator_live_per_s",
        "ratio",
        "raw_drain_per_s",
        "coordinator_drain_per_s",
        "drain_ratio",
        "worker_publish_per_s",
    ):
        assert isinstance(figures[key], float) and figures[key] > 0, key
    assert figures["target"] == 0.5 and isinstance(figures["target_met"], bool)
    assert isinstance(figures["drain_target_met"], bool)


def test_round_fedmq_only_reports_round_times():
    figures = bench("round", "--workers", "2", "--rounds", "2", "--no-flower")

    assert len(figures["fedmq_round_s"]) == 2
    assert figures["fedmq_median_s"] > 0
    assert figures["flower_runtime"] == "none" and figures["ratio"] is None


@pytest.mark.skipif(not (FLOWER_VENV / "bin" / "flwr").exists(), reason="no bench venv with flwr")
def test_round_against_flower_reports_ratio():
    figures = bench("round", "--workers", "2", "--rounds", "2")

    assert figures["flower_runtime"] == "deployment", figures["note"]
    assert len(figures["flower_round_s"]) == 2
    assert figures["ratio"] == pytest.approx(figures["fedmq_median_s"] / figures["flower_median_s"])
    assert figures["target"] == 0.1 and isinstance(figures["target_met"], bool)
