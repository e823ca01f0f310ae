"""`fedmq rounds start` as a user runs it: the whole submission is checked before anything is sent.

The broker is the in-memory StubBroker standing in for RabbitMQ, so the tests can look at the control
queue the CLI publishes to. Errors must be one line on stderr starting with ``error:``, exit code 1.
"""

from __future__ import annotations

import re
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.broker import StubBroker, fedmq_topology
from common.broker.processing import RawDelivery
from common.broker.topology import CONTROL_QUEUE
from common.messages import StartRun, decode
from common.settings import Settings
from coordinator import control
from coordinator.cli.main import app, main
from coordinator.db import Database, upgrade
from coordinator.strategies import strategy_names


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def control_queue(monkeypatch: pytest.MonkeyPatch) -> deque[RawDelivery]:
    """The control queue of a StubBroker that every CLI submission goes to instead of RabbitMQ."""
    stub = StubBroker()
    stub.declare(fedmq_topology())
    monkeypatch.setattr(control, "RabbitmqBroker", lambda *args, **kwargs: stub)
    return stub.messages(CONTROL_QUEUE)


@pytest.fixture
def fedmq(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Run ``fedmq ARGS`` through the console-script entry point; return its exit code and output."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEDMQ_CONFIG_FILE", raising=False)
    monkeypatch.setenv("FEDMQ_DATABASE_URL", f"sqlite:///{tmp_path / 'fedmq.db'}")
    monkeypatch.setenv("COLUMNS", "200")

    def run(*args: str) -> Result:
        monkeypatch.setattr(sys, "argv", ["fedmq", *args])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def one_line_error(result: Result) -> str:
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.code == 1, (result.code, result.out, result.err)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    return lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategy", "fedavgg"], "unknown strategy 'fedavgg'; choose one of: bulyan, fedadagrad"),
        (["--option", "beta=0.2"], "strategy 'fedavg': unknown option 'beta'"),
        (["--strategy", "trimmed-mean", "--option", "beta=0.7"], "option 'beta' = 0.7 is out of range"),
        (["--option", "dp_noise=1"], "option 'dp_noise' needs 'clip'"),
        (["--mode", "foo"], "mode 'foo' is not one of: sync, async"),
        (["--max-norm", "0"], "max-norm must be positive, not 0"),
        (["--max-samples", "0"], "max-samples must be at least 1, not 0"),
        (["--rounds", "0"], "rounds must be at least 1, not 0"),
        (["--min-workers", "0"], "min-workers must be at least 1, not 0"),
        (["--fraction", "0"], "fraction must be in (0, 1], not 0"),
        (["--fraction", "1.5"], "fraction must be in (0, 1], not 1.5"),
        (["--deadline", "0s"], "deadline must be positive and at most 365 days, not 0 s"),
        (["--deadline", "-5m"], "deadline must be positive and at most 365 days, not -300 s"),
        (["--deadline", "soon"], "deadline 'soon' is not a duration"),
        (["--max-staleness", "-1"], "max-staleness must be at least 0, not -1"),
        (["--wait", "--start-timeout", "0"], "--start-timeout must be a positive duration"),
    ],
)
def test_a_bad_submission_is_one_error_line_and_nothing_reaches_the_control_queue(
    fedmq, control_queue: deque[RawDelivery], args: list[str], message: str
) -> None:
    # Execute
    result = fedmq("rounds", "start", "digits", *args)

    # Assert
    assert message in one_line_error(result)
    assert "submitted" not in result.out
    assert len(control_queue) == 0


def test_a_good_submission_reaches_the_control_queue_as_typed(
    fedmq, control_queue: deque[RawDelivery]
) -> None:
    # Execute
    result = fedmq(
        "rounds", "start", "digits", "--mode", "async", "--min-workers", "2", "--rounds", "3",
        "--max-staleness", "0", "--strategy", "median", "--option", "clip=1.5", "--deadline", "90s",
    )  # fmt: skip

    # Assert
    assert result.code == 0, result.err
    (delivery,) = control_queue
    start = decode(delivery.body, StartRun)
    assert f"run {start.run_id} submitted" in result.out
    assert (start.model, start.mode, start.min_workers, start.rounds, start.max_staleness) == (
        "digits", "async", 2, 3, 0,
    )  # fmt: skip
    assert (start.strategy, start.options, start.deadline_s) == ("median", {"clip": 1.5}, 90.0)


def test_wait_gives_up_with_the_run_id_and_the_dead_letter_queue_when_no_run_is_recorded(
    fedmq, control_queue: deque[RawDelivery], tmp_path: Path
) -> None:
    # Prepare: a database, but no coordinator consuming the control queue (as if it refused the run).
    db = Database.from_settings(Settings(database_url=f"sqlite:///{tmp_path / 'fedmq.db'}"))
    upgrade(db)
    db.dispose()

    # Execute
    result = fedmq("rounds", "start", "digits", "--wait", "--start-timeout", "1s")

    # Assert
    error = one_line_error(result)
    run_id = decode(control_queue[0].body, StartRun).run_id
    assert f"run {run_id} was not recorded within 1 s" in error
    assert "dead-letter queue fedmq.control.dlq" in error and "x-fedmq-reason" in error


def test_help_lists_every_registered_strategy_with_its_options_and_the_staleness_weight() -> None:
    # Execute
    result = CliRunner().invoke(app, ["rounds", "start", "--help"], env={"COLUMNS": "200"})

    # Assert
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    tagged = re.findall(r"([a-z-]+) \((?:sample-weighted mean|ignores sample counts)\):", text)
    assert tagged == strategy_names()
    assert "fedavg (sample-weighted mean): server_lr=1.0, accumulate=float32" in text
    assert "median (ignores sample counts): server_lr=1.0" in text
    assert "trimmed-mean (ignores sample counts): beta=0.1" in text
    assert "accepts clip, dp_noise, dp_seed" in text and "docs/strategies.md" in text
    assert "--mode sync|async" in text and "1/sqrt(1 + s)" in text
    assert "--start-timeout" in text and "fedmq.control.dlq" in text
