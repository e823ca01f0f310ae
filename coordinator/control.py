"""Submitting to the coordinator through its control queue (what the CLI's ``rounds start`` does).

The CLI needs only broker access to submit: the message is published with confirms to the control
queue, and the coordinator records it in SQL when it consumes it. Submissions carry an id (run id,
job id), so a resubmission after a lost confirm does nothing twice.
"""

from __future__ import annotations

import uuid

from common.broker import OutgoingMessage, RabbitmqBroker, broker_config_from_settings
from common.broker.topology import CONTROL_QUEUE
from common.messages import Message
from common.settings import Settings


def new_id() -> str:
    return uuid.uuid4().hex[:12]


def submit(settings: Settings, message: Message, timeout_s: float = 15.0) -> None:
    """Publish ``message`` to the control queue and return once the broker confirmed it."""
    broker = RabbitmqBroker(
        broker_config_from_settings(settings), name="fedmq-cli", connect_deadline_s=timeout_s
    )
    try:
        broker.publish(
            OutgoingMessage(
                exchange="", routing_key=CONTROL_QUEUE, body=message.encode(), message_id=new_id()
            )
        )
    finally:
        broker.close()
