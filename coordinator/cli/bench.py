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

from coordinator.bench.codec import CodecBenchResult, run_codec_benchmark

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


def _target(met: bool, ratio: float, target: float) -> str:
    return (
        f"[green]target >= {target:g}x met[/]"
        if met
        else f"[red]target >= {target:g}x missed ({ratio:.2f}x)[/]"
    )


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
