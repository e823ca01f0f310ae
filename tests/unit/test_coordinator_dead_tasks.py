"""The coordinator counts a task the broker dead-lettered as failed, and only the broker's copy."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

from common.broker.config import BrokerConfig
from common.broker.message import Delivery
from common.messages import TrainTask
from coordinator.service import Coordinator

TASK = TrainTask(task_id="t1", round_id=1, model="m", version=1, weights_sha256="0" * 64)


def coordinator() -> tuple[Coordinator, mock.Mock]:
    engine = mock.Mock()
    engine.record_dead_task.return_value = True
    engine.open_round_ids.return_value = []
    broker = SimpleNamespace(config=BrokerConfig(amqp_url="amqp://coord:secret@localhost:5672/%2F"))
    return Coordinator(mock.Mock(), mock.Mock(), broker, engine=engine), engine  # type: ignore[arg-type]


def dead(user_id: str | None, body: bytes = TASK.encode()) -> Delivery:
    headers = {"x-death": [{"reason": "delivery_limit", "queue": "fedmq.tasks.w2", "count": 1}]}
    return Delivery(
        queue="fedmq.dead-tasks",
        exchange="fedmq.dlx",
        routing_key="fedmq.tasks.w2",
        data=body,
        size=len(body),
        headers=headers,
        user_id=user_id,
    )


def test_a_task_the_broker_dead_lettered_fails_its_task_with_the_reason():
    service, engine = coordinator()

    service.on_dead_task(dead(user_id="coord"))

    engine.record_dead_task.assert_called_once_with("t1", "delivery_limit in fedmq.tasks.w2")
    engine.open_round_ids.assert_called_once()  # the round's rule is checked at once


def test_a_copy_not_stamped_with_the_coordinators_user_is_ignored():
    service, engine = coordinator()

    service.on_dead_task(dead(user_id="w1"))  # a worker forging a dead task of another's
    service.on_dead_task(dead(user_id=None))  # a worker's own consumer dead-lettering (it sent TaskFailed)

    engine.record_dead_task.assert_not_called()
