"""How many CPU threads a worker's model code may use (BLAS, OpenMP, TensorFlow).

A worker's numeric libraries size their thread pools by the machine's cores. That is right for
one worker per machine, and badly wrong when several workers (or a worker and other busy
processes) share the cores: OpenBLAS threads spin while they wait for each other, and a matrix
product whose helper thread is descheduled waits for it. Measured here (2 cores, four processes
each multiplying 16 x 25000 by 25000 x 1000 float32): 150-730 ms per product with OpenBLAS's
default two threads, 25-27 ms with one.

:func:`limit_threads` caps every pool the worker's process has or will have: the BLAS and OpenMP
libraries already loaded (numpy's OpenBLAS, through threadpoolctl) and, through the environment
they read when they load, those model code imports later (``OMP_NUM_THREADS``,
``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS``, TensorFlow's ``TF_NUM_INTRAOP_THREADS`` and
``TF_NUM_INTEROP_THREADS``). :func:`fair_share` is the usual value for ``n`` workers on one
machine.
"""

from __future__ import annotations

import logging
import os

from threadpoolctl import threadpool_limits

from common.errors import ConfigError

log = logging.getLogger(__name__)

_THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
    "TF_NUM_INTEROP_THREADS",
)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def fair_share(workers: int, cores: int | None = None) -> int:
    """Threads per worker when ``workers`` workers share this machine's cores (at least 1)."""
    return max(1, (usable_cores() if cores is None else cores) // max(1, workers))


def limit_threads(threads: int) -> None:
    """Let this process's numeric code use at most ``threads`` threads (call before training)."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a whole number >= 1, not {threads!r}")
    for name in _THREAD_ENV:
        os.environ[name] = str(threads)
    threadpool_limits(limits=threads)
    log.info("model code limited to %d CPU thread(s)", threads)
