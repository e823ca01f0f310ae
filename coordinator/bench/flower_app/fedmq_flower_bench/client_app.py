"""ClientApp: one SGD epoch over a few local samples, the trained weights sent back."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmq_flower_bench.task import local_data, sgd_epoch

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = context.run_config
    weights = msg.content["arrays"].to_numpy_ndarrays()
    node = int(context.node_config.get("partition-id", 0))
    x, y = local_data(node, int(cfg["samples"]), weights[0].shape[0], weights[0].shape[1])
    trained = sgd_epoch(weights, x, y, float(cfg["learning-rate"]))
    content = RecordDict({"arrays": ArrayRecord(trained), "metrics": MetricRecord({"num-examples": len(x)})})
    return Message(content=content, reply_to=msg)
