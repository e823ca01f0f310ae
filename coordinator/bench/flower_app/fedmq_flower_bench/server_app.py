"""ServerApp: Flower's FedAvg, timing each round from configure_train to the end of aggregate_train.

The times (wall clock, seconds) are appended as JSON lines to the run config's ``timing-file``,
which the benchmark reads after the run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedmq_flower_bench.task import init_weights

app = ServerApp()


class TimedFedAvg(FedAvg):
    def __init__(self, timing_file: str, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.timing_file = timing_file
        self.started: dict[int, float] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.started[server_round] = time.time()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):  # type: ignore[no-untyped-def]
        replies = list(replies)
        result = super().aggregate_train(server_round, replies)
        ended = time.time()
        if self.timing_file:
            with open(self.timing_file, "a") as f:
                row = {"round": server_round, "start": self.started[server_round], "end": ended}
                f.write(json.dumps({**row, "replies": len(replies)}) + "\n")
        return result


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    nodes = int(cfg["num-nodes"])
    strategy = TimedFedAvg(
        str(cfg["timing-file"]),
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=nodes,
        min_available_nodes=nodes,
    )
    initial = ArrayRecord(init_weights(int(cfg["n-in"]), int(cfg["n-out"])))
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=int(cfg["num-rounds"]))
