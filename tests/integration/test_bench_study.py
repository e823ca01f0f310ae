"""`fedmq bench study` runs every configuration and writes its plot (a smoke test, no timing)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from coordinator.cli.main import app


def test_study_prints_every_strategy_and_writes_the_plot(tmp_path: Path):
    png = tmp_path / "study.png"
    result = CliRunner().invoke(
        app, ["bench", "study", "--workers", "2", "--rounds", "1", "--epochs", "1", "--png", str(png)]
    )

    assert result.exit_code == 0, result.output
    for name in ("FedAvg", "FedProx", "FedAdam", "FedBuff", "centralized"):
        assert name in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
