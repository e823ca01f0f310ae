"""A Byzantine worker for tests: the real worker daemon whose deltas are flipped and scaled by -20.

Run as ``python -m tests.integration.malicious_worker worker run --config FILE`` (the fedmq CLI with
the worker's training patched): it speaks the protocol correctly, with its own broker user, and
poisons only the numbers — the attack robust aggregation must withstand.
"""

from __future__ import annotations

from typing import Any

import worker.trainer as trainer

_honest_train = trainer.train


def _poisoned_train(*args: Any, **kwargs: Any) -> trainer.TrainingResult:
    result = _honest_train(*args, **kwargs)
    return trainer.TrainingResult([d * -20.0 for d in result.delta], result.sample_count, result.metrics)


trainer.train = _poisoned_train

if __name__ == "__main__":
    from coordinator.cli.main import main

    main()
