"""`fedmq bench` commands: each runs one benchmark and prints its figures (a table, or JSON).

A benchmark prints the ratio to a baseline measured in the same run and whether each target is
met; it never fails on a missed target. Adding a benchmark is one command function that calls the
library and hands its rows and its result dataclass to :func:`_report`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from coordinator.bench.aggregate import AggregateBenchResult, run_aggregate_benchmark
from coordinator.bench.codec import CodecBenchResult, run_codec_benchmark
from coordinator.bench.intake import IntakeBenchResult, run_intake_benchmark
from coordinator.bench.load import LoadBenchResult, run_load_benchmark
from coordinator.bench.round import RoundBenchResult, run_round_benchmark

app = typer.Typer(
    help="Benchmarks: each prints its figures and the ratio to a baseline measured in the same run.",
    no_args_is_help=True,
)

_console = Console()


def _report(title: str, rows: list[tuple[str, str, str]], result: Any, as_json: bool) -> None:
    """Print ``rows`` (metric, value, note) as a table, or the ``result`` dataclass as JSON."""
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(result), indent=2))
        return
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("")
    for row in rows:
        table.add_row(*row)
    _console.print(table)


def _target(met: bool, ratio: float, target: float, op: str = ">=") -> str:
    return (
        f"[green]target {op} {target:g}x met[/]"
        if met
        else f"[red]target {op} {target:g}x missed ({ratio:.2f}x)[/]"
    )


def _progress(line: str) -> None:
    """Progress lines go to stderr, so stdout stays clean for --json."""
    typer.echo(line, err=True)


def _codec_rows(r: CodecBenchResult) -> list[tuple[str, str, str]]:
    return [
        (
            "weights",
            f"{r.size_mb:.1f} MB in {r.arrays} arrays",
            f"frame {r.frame_bytes} bytes, best of {r.repeat}",
        ),
        ("copy (new bytes)", f"{r.copy_gbps:.2f} GB/s", "baseline: bytes(memoryview)"),
        ("copy (warm buffer)", f"{r.warm_copy_gbps:.2f} GB/s", "np.copyto into a reused buffer"),
        ("encode", f"{r.encode_gbps:.2f} GB/s", "encode_weights -> new bytes"),
        ("encode into buffer", f"{r.encode_into_gbps:.2f} GB/s", f"{r.encode_into_ratio:.2f}x warm copy"),
        ("decode", f"{r.decode_gbps:.2f} GB/s", "zero-copy views"),
        ("encode+decode", f"{r.encode_decode_gbps:.2f} GB/s", ""),
        (
            "encode+decode / copy",
            f"{r.encode_decode_ratio:.2f}x",
            _target(r.encode_decode_target_met, r.encode_decode_ratio, r.encode_decode_target),
        ),
        (
            "decode / copy",
            f"{r.decode_ratio:.2f}x",
            _target(r.decode_target_met, r.decode_ratio, r.decode_target),
        ),
    ]


@app.command("codec")
def codec(
    size_mb: float = typer.Option(100.0, "--size-mb", min=0.001, help="Size of the weight list in MB."),
    repeat: int = typer.Option(5, "--repeat", min=1, help="Runs per measurement; the best is kept."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON instead of a table."),
) -> None:
    """Encode+decode a weight list of realistic layer shapes and compare with a memory copy.

    Example: fedmq bench codec --size-mb 100 --repeat 5
    """
    result = run_codec_benchmark(size_mb=size_mb, repeat=repeat)
    _report("fedmq bench codec", _codec_rows(result), result, as_json)


def _ms(seconds: list[float]) -> str:
    return ", ".join(f"{s * 1000:.0f}" for s in seconds)


def _round_rows(r: RoundBenchResult) -> list[tuple[str, str, str]]:
    rows = [
        (
            "model",
            f"{r.n_in}x{r.n_out} float32",
            f"{r.workers} workers, {r.rounds} rounds, {r.samples} samples each",
        ),
        ("fedmq median round", f"{r.fedmq_median_s * 1000:.1f} ms", f"rounds (ms): {_ms(r.fedmq_round_s)}"),
    ]
    if r.flower_median_s is None or r.ratio is None:
        return [*rows, ("Flower", "not measured", r.note)]
    return [
        *rows,
        (
            f"Flower median round ({r.flower_runtime} runtime)",
            f"{r.flower_median_s * 1000:.1f} ms",
            f"rounds (ms): {_ms(r.flower_round_s)}",
        ),
        ("fedmq / Flower", f"{r.ratio:.3f}x", _target(bool(r.target_met), r.ratio, r.target, "<=")),
        ("load average", f"{r.load_average:.1f}", "1 min, at the end; other work skews the figures"),
    ]


@app.command("round")
def round_(
    workers: int = typer.Option(10, "--workers", min=1, help="Workers (fedmq) and SuperNodes (Flower)."),
    rounds: int = typer.Option(5, "--rounds", min=1, help="FedAvg rounds on each side; the median counts."),
    model_mb: float = typer.Option(0.0, "--model-mb", min=0.0, help="Model size in MB; 0 for a tiny model."),
    no_flower: bool = typer.Option(False, "--no-flower", help="Measure fedmq only."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON instead of a table."),
) -> None:
    """Median FedAvg round time of fedmq and of Flower (deployment runtime) on this machine.

    Example: fedmq bench round --workers 10 --rounds 5; fedmq bench round --workers 4 --model-mb 100
    """
    result = run_round_benchmark(
        workers=workers, rounds=rounds, model_mb=model_mb, flower=not no_flower, progress=_progress
    )
    _report("fedmq bench round", _round_rows(result), result, as_json)


def _intake_rows(r: IntakeBenchResult) -> list[tuple[str, str, str]]:
    return [
        ("deltas", f"{r.deltas} x {r.body_bytes} bytes", f"from {r.workers} workers, live and drained"),
        (
            "raw live",
            f"{r.raw_live_per_s:.0f} msg/s",
            f"{r.workers} publishers + bare consumer (prefetch {r.prefetch})",
        ),
        (
            "coordinator live",
            f"{r.coordinator_live_per_s:.0f} deltas/s",
            "same publishers; validated, committed, acked",
        ),
        ("live: coordinator / raw", f"{r.ratio:.2f}x", _target(r.target_met, r.ratio, r.target)),
        ("raw drain", f"{r.raw_drain_per_s:.0f} msg/s", "bare consumer emptying a full queue"),
        (
            "coordinator drain",
            f"{r.coordinator_drain_per_s:.0f} deltas/s",
            "coordinator emptying a full queue",
        ),
        (
            "drain: coordinator / raw",
            f"{r.drain_ratio:.2f}x",
            _target(r.drain_target_met, r.drain_ratio, r.target),
        ),
        ("one worker publishing", f"{r.worker_publish_per_s:.0f} msg/s", "confirm per message"),
        ("load average", f"{r.load_average:.1f}", "1 min, at the end; other work skews the figures"),
    ]


@app.command("intake")
def intake(
    deltas: int = typer.Option(2000, "--deltas", min=2, help="Deltas (tasks of one open round)."),
    workers: int = typer.Option(4, "--workers", min=1, help="Workers the tasks are spread over."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON instead of a table."),
) -> None:
    """Deltas per second the coordinator accepts vs raw RabbitMQ throughput of the same bodies,
    with the workers publishing at the same time (live) and from a full queue (drain).

    Example: fedmq bench intake --deltas 2000
    """
    result = run_intake_benchmark(deltas=deltas, workers=workers, progress=_progress)
    _report("fedmq bench intake", _intake_rows(result), result, as_json)


def _aggregate_rows(r: AggregateBenchResult) -> list[tuple[str, str, str]]:
    rows = [("model", f"{r.size_mb:.1f} MB in {r.arrays} arrays", f"float32, best of {r.repeat}")]
    for f in r.fedavg:
        rows.append((f"FedAvg of {f.n} deltas", f"{f.gbps:.2f} GB/s", f"{f.seconds:.2f} s"))
        rows.append(
            (
                f"  / a += b ({f.add_gbps:.2f} GB/s)",
                f"{f.ratio_to_add:.2f}x",
                _target(f.target_met, f.ratio_to_add, r.throughput_target),
            )
        )
    rows.append(("previous FedAvg", f"{r.previous_fedavg_gbps:.2f} GB/s", "one float64 temporary per array"))
    for m in r.memory:
        rss = (
            "not measured"
            if m.rss_peak_growth_mb is None
            else f"RSS peak growth {m.rss_peak_growth_mb:.0f} MB"
        )
        rows.append(
            (f"peak memory, {m.n} streamed deltas", f"{m.traced_peak_mb:.0f} MB", f"tracemalloc; {rss}")
        )
    note = "[green]within one model size[/]" if r.memory_target_met else "[red]more than one model size[/]"
    rows.append(("peak spread over N", f"{r.traced_peak_spread_mb:.1f} MB", note))
    rows.append(
        (
            f"cost model: FedAvg, {r.cost_n} deltas",
            f"{r.fedavg_cost_seconds * 1000:.0f} ms",
            f"{r.cost_size_mb:.1f} MB",
        )
    )
    for c in r.costs:
        options = " ".join(f"{k}={v}" for k, v in c.options.items())
        rows.append(
            (f"  {c.strategy} {options}".rstrip(), f"{c.ratio_to_fedavg:.1f}x", f"{c.seconds * 1000:.0f} ms")
        )
    return rows


@app.command("aggregate")
def aggregate(
    size_mb: float = typer.Option(100.0, "--size-mb", min=0.001, help="Model size in MB."),
    repeat: int = typer.Option(3, "--repeat", min=1, help="Runs per measurement; the best is kept."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON instead of a table."),
) -> None:
    """FedAvg of N deltas vs numpy's in-place add, peak memory for N = 10 and 50, strategies' costs.

    Example: fedmq bench aggregate --size-mb 100
    """
    result = run_aggregate_benchmark(size_mb=size_mb, repeat=repeat)
    _report("fedmq bench aggregate", _aggregate_rows(result), result, as_json)


def _load_rows(r: LoadBenchResult) -> list[tuple[str, str, str]]:
    def count(n: int) -> str:
        return f"[green]{n}[/]" if n == 0 else f"[red]{n}[/]"

    return [
        (
            "simulated workers",
            f"{r.workers} x {r.rounds} rounds",
            f"{r.processes} processes, one connection and broker user each; added in {r.setup_s:.1f} s",
        ),
        ("run", r.run_state, f"{r.tasks} tasks, {len(r.round_latency_s)} rounds closed"),
        ("deltas accepted", f"{r.deltas_per_s:.0f} deltas/s", "first round opened to last round closed"),
        ("round latency p50", f"{r.p50_round_s * 1000:.0f} ms", "round opened to closed (SQL)"),
        ("round latency p99", f"{r.p99_round_s * 1000:.0f} ms", f"rounds (ms): {_ms(r.round_latency_s)}"),
        ("coordinator peak memory", f"{r.coordinator_peak_mb:.0f} MB", "VmHWM of its process"),
        (
            "deltas confirmed / accepted",
            f"{r.deltas_confirmed} / {r.deltas_accepted}",
            f"{r.publishes_confirmed} publishes confirmed, {r.deltas_rejected} rejected, "
            f"{r.redelivered_tasks} tasks redelivered",
        ),
        ("dead-lettered", count(r.dead_lettered), f"{r.messages_left} messages left in other queues"),
        ("lost", count(r.lost), "tasks or confirmed deltas no version counted"),
        ("duplicated", count(r.duplicated), "deltas counted more than once"),
        ("versions not FedAvg of their deltas", count(r.rounds_mismatched), "recomputed in float64"),
        ("bad versions", count(r.bad_versions), "not whole, or not one per closed round"),
        ("load average", f"{r.load_average:.1f}", "1 min, at the end; other work skews the figures"),
    ]


@app.command("load")
def load(
    workers: int = typer.Option(100, "--workers", min=1, help="Simulated workers, each its own connection."),
    rounds: int = typer.Option(10, "--rounds", min=1, help="FedAvg rounds over every worker."),
    per_process: int = typer.Option(
        25, "--per-process", min=1, help="Simulated workers (threads) per process."
    ),
    workdir: str = typer.Option(
        None, "--workdir", help="Keep the deployment (database, logs) in this new directory."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON instead of a table."),
) -> None:
    """Many simulated workers for many rounds: deltas/s, round latency, coordinator memory, exactly-once.

    Exits 1 when a delta was lost or counted twice; a missed target alone does not fail it.
    Example: fedmq bench load --workers 100 --rounds 10
    """
    from pathlib import Path

    result = run_load_benchmark(
        workers=workers,
        rounds=rounds,
        per_process=per_process,
        workdir=Path(workdir) if workdir else None,
        progress=_progress,
    )
    _report("fedmq bench load", _load_rows(result), result, as_json)
    verdict = "PASS" if result.target_met else "FAIL"
    summary = (
        f"lost {result.lost}, duplicated {result.duplicated}, dead-lettered {result.dead_lettered}: "
        f"{verdict} (target: zero lost, zero duplicated, zero dead-lettered)"
    )
    if as_json:
        _progress(summary)
    else:
        _console.print(summary, markup=False)
    for error in result.worker_errors:
        _progress(f"simulated worker error: {error}")
    if not result.oracle_ok:
        raise typer.Exit(1)


@app.command("study")
def study(
    workers: int = typer.Option(6, min=2, max=10, help="Workers in the non-IID split."),
    rounds: int = typer.Option(10, min=1, help="Rounds (async: versions)."),
    epochs: int = typer.Option(2, min=1, help="Local epochs per task."),
    png: str = typer.Option(None, "--png", help="Also write the curves to this PNG (needs matplotlib)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Accuracy per round of FedAvg, FedProx, FedAdam and async FedBuff on non-IID digits.

    Example: fedmq bench study --rounds 10 --png docs/img/digits-study.png
    """
    from pathlib import Path

    from coordinator.bench.study import plot, run_study

    result = run_study(
        workers=workers, rounds=rounds, epochs=epochs, progress=lambda name: _progress(f"running {name}")
    )
    if png:
        plot(result, Path(png))
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
        return
    table = Table(
        title=f"Held-out accuracy, non-IID digits, {workers} workers, {epochs} local epochs per task"
    )
    table.add_column("round", justify="right")
    for name in [*result.curves, "centralized"]:
        table.add_column(name, justify="right")
    for r in range(rounds):
        table.add_row(
            str(r + 1), *(f"{c[r]:.3f}" for c in result.curves.values()), f"{result.centralized[r]:.3f}"
        )
    _console.print(table)
    if png:
        _console.print(f"plot written to {png}")
