"""The README's model-core demo: the worker's learning shows up in the coordinator's version 2."""

from __future__ import annotations

from typer.testing import CliRunner

from coordinator.cli.main import app
from coordinator.demo.core import run_core_demo


def test_core_demo_improves_accuracy_and_refuses_tampering():
    result = run_core_demo(epochs=1)

    assert result.accuracy_after_apply > result.accuracy_before + 0.3
    assert abs(result.accuracy_after_apply - result.accuracy_after_local) < 1e-9
    assert result.tamper_error.startswith("PayloadMismatchError")
    assert [s.side for s in result.steps].count("worker") == 3


def test_demo_command_prints_the_accuracy_table():
    outcome = CliRunner().invoke(app, ["demo", "core", "--epochs", "1"])

    assert outcome.exit_code == 0, outcome.output
    assert "version 2 = v1 + decoded delta" in outcome.output
    assert "refuse a tampered code envelope" in outcome.output
