"""Named fault-injection points for the crash tests (issue 6).

``fault_point(NAME)`` kills the current process with SIGKILL — no cleanup, no flush, exactly like a
power cut — when the environment variable ``FEDMQ_FAULT_KILL_AT`` equals ``NAME``; otherwise it does
nothing. The tests start a daemon with that variable, let it die at the point, and restart it
without the variable to check that nothing was lost or counted twice. Points:

- ``worker-after-delta-publish``: the delta's publish was confirmed, the task is not yet acked;
- ``publish-after-chunk-N`` (common/broker/publisher.py): chunk N of a chunked body was confirmed,
  the next one is not sent yet (``publish-after-chunk-0``: a worker dies mid-publish of a large
  delta, leaving a half-sent transfer); a publisher so armed sends one chunk at a time;
- ``coordinator-after-delta-commit``: a delta is committed in SQL, its delivery not yet acked;
- ``coordinator-before-aggregation-commit`` (coordinator/rounds.py): inside the aggregation's
  transaction, the new version, the round's closing and the next round written, nothing committed;
- ``coordinator-after-aggregation-commit``: a new version and the next round are committed, their
  release and task messages are still in the outbox.
"""

from __future__ import annotations

import logging
import os
import signal

logger = logging.getLogger(__name__)

ENV = "FEDMQ_FAULT_KILL_AT"


def fault_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        logger.warning("fault point %s: killing this process (SIGKILL)", name)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def armed(prefix: str) -> bool:
    """Whether a fault point whose name starts with ``prefix`` is set to kill this process."""
    return os.environ.get(ENV, "").startswith(prefix)
