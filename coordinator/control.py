"""Submitting to the coordinator through its control queue (what the CLI's ``rounds start`` does).

The CLI needs only broker access to submit: the message is published with confirms to the control
queue, and the coordinator records it in SQL when it consumes it. Submissions carry an id (run id,
job id), so a resubmission after a lost confirm does nothing twice.

:func:`check_start_run` is the one validation of a run submission: ``fedmq rounds start`` calls it
before publishing anything, and the coordinator (``RoundEngine.start_run``) before recording the
run, so what the CLI accepts is what the coordinator accepts. A submission the coordinator still
refuses (a hand-made message, a model that does not exist) is dead-lettered with its reason.
"""

from __future__ import annotations

import uuid

from common.broker import OutgoingMessage, RabbitmqBroker, broker_config_from_settings
from common.broker.topology import CONTROL_QUEUE
from common.errors import ConfigError
from common.messages import Message, StartRun
from common.settings import Settings

RUN_MODES = ("sync", "async")
#: The longest a round (or an async buffer) may wait for its deltas; longer ones overflow dates.
MAX_DEADLINE_S = 365 * 86400.0


def new_id() -> str:
    return uuid.uuid4().hex[:12]


def check_start_run(msg: StartRun) -> None:
    """Refuse a run submission the coordinator could not carry out; ConfigError naming the field.

    Checks the strategy and its options (``get_strategy``), the mode, and the bounds of every
    number: rounds and min_workers >= 1, fraction in (0, 1], deadline in (0 s, 365 days],
    max_staleness >= 0, max_norm > 0 and max_samples >= 1 when set. Whether the model and the named
    workers exist is known only to the coordinator.
    """
    from coordinator.strategies import get_strategy

    get_strategy(msg.strategy, msg.options)
    if msg.mode not in RUN_MODES:
        raise ConfigError(f"mode {msg.mode!r} is not one of: {', '.join(RUN_MODES)}")
    if msg.rounds < 1:
        raise ConfigError(f"rounds must be at least 1, not {msg.rounds}")
    if msg.min_workers < 1:
        raise ConfigError(f"min-workers must be at least 1, not {msg.min_workers}")
    if not 0 < msg.fraction <= 1:
        raise ConfigError(f"fraction must be in (0, 1], not {msg.fraction:g}")
    if not 0 < msg.deadline_s <= MAX_DEADLINE_S:
        raise ConfigError(f"deadline must be positive and at most 365 days, not {msg.deadline_s:g} s")
    if msg.max_staleness < 0:
        raise ConfigError(f"max-staleness must be at least 0, not {msg.max_staleness}")
    if msg.max_norm is not None and not msg.max_norm > 0:
        raise ConfigError(f"max-norm must be positive, not {msg.max_norm:g}")
    if msg.max_samples is not None and msg.max_samples < 1:
        raise ConfigError(f"max-samples must be at least 1, not {msg.max_samples}")


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
