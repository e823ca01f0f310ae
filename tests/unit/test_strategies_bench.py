"""`fedmq bench aggregate` on a small model: memory does not grow with N, figures print as JSON."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from coordinator.bench.aggregate import run_aggregate_benchmark
from coordinator.cli.main import app


def test_fedavg_peak_memory_does_not_grow_with_the_number_of_streamed_deltas():
    result = run_aggregate_benchmark(size_mb=2, n_values=(2, 12), repeat=1, cost_size_mb=0.5, cost_n=7)

    peaks = [m.traced_peak_mb for m in result.memory]
    assert [m.n for m in result.memory] == [2, 12]
    assert result.memory_target_met and max(peaks) - min(peaks) < result.size_mb
    assert max(peaks) < 4 * result.size_mb, "float32 sums (1 model) + the delta added + the next one decoded"
    assert result.float64_fedavg_gbps > 0 and result.float64_ratio_to_add > 0
    assert {c.strategy for c in result.costs} >= {"median", "trimmed-mean", "krum", "multi-krum", "bulyan"}
    assert json.loads(json.dumps(result.as_dict()))["fedavg"][1]["n"] == 12


def test_bench_aggregate_command_prints_json():
    outcome = CliRunner().invoke(app, ["bench", "aggregate", "--size-mb", "1", "--repeat", "1", "--json"])

    assert outcome.exit_code == 0, outcome.output
    figures = json.loads(outcome.stdout)
    assert [f["n"] for f in figures["fedavg"]] == [10, 50]
    assert figures["memory_target_met"] is True
