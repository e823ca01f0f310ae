"""A daemon's use of the machine: CPU threads for model code, and freed memory kept for reuse.

Both change process-wide state (thread pools, malloc), so each check runs in a fresh interpreter.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.errors import ConfigError
from worker.config import WorkerConfig, load_worker_config
from worker.threads import fair_share, limit_threads

ROOT = Path(__file__).resolve().parents[2]
KEY = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----"


def run(code: str, **env: str) -> str:
    import os

    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **env},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_limit_threads_caps_the_loaded_blas_and_what_model_code_loads_later():
    out = run(
        """
        import os
        import numpy  # OpenBLAS is loaded, with one thread per core
        from threadpoolctl import threadpool_info
        from worker.threads import limit_threads
        limit_threads(1)
        print(sorted({pool["num_threads"] for pool in threadpool_info()}))
        print(os.environ["OMP_NUM_THREADS"], os.environ["TF_NUM_INTRAOP_THREADS"])
        """
    )
    assert out.splitlines() == ["[1]", "1 1"]


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_a_thread_count_that_is_not_a_positive_whole_number_is_refused(bad):
    with pytest.raises(ConfigError, match="threads"):
        limit_threads(bad)


def test_workers_sharing_a_machine_get_its_cores_divided_at_least_one_each():
    assert fair_share(4, cores=8) == 2
    assert fair_share(4, cores=2) == 1
    assert fair_share(1, cores=2) == 2
    assert fair_share(0, cores=2) == 2


def test_the_worker_config_file_carries_threads_and_refuses_a_bad_value(tmp_path):
    path = tmp_path / "w.toml"
    WorkerConfig("w", "amqp://w:p@localhost/%2F", KEY, threads=2).write(path)

    assert load_worker_config(path).threads == 2

    path.write_text(path.read_text().replace("threads = 2", "threads = 0"))
    with pytest.raises(ConfigError, match="threads must be a whole number >= 1"):
        load_worker_config(path)


def test_the_worker_config_file_carries_the_cache_retention_and_refuses_a_bad_value(tmp_path):
    path = tmp_path / "w.toml"
    WorkerConfig("w", "amqp://w:p@localhost/%2F", KEY).write(path)
    assert load_worker_config(path).cache_versions == 3  # the default, not written

    WorkerConfig("w", "amqp://w:p@localhost/%2F", KEY, cache_versions=1).write(path)
    assert load_worker_config(path).cache_versions == 1

    path.write_text(path.read_text().replace("cache_versions = 1", "cache_versions = 0"))
    with pytest.raises(ConfigError, match="cache_versions must be a whole number >= 1"):
        load_worker_config(path)


_RSS_AFTER_FREE = """
    import threading
    import numpy as np
    from common.memory import keep_freed_memory
    applied = keep_freed_memory()

    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024

    def work():  # like a consumer thread handling a 100 MB model
        a = np.ones(25_000_000, np.float32)
        b = a * 2.0
        del a, b

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    print(applied, rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is what is tuned")
def test_a_daemon_keeps_freed_large_buffers_for_reuse_unless_told_not_to():
    applied, kept_mb = run(_RSS_AFTER_FREE).split()
    off, returned_mb = run(_RSS_AFTER_FREE, FEDMQ_KEEP_FREED_MEMORY="0").split()
    operator, _ = run(_RSS_AFTER_FREE, MALLOC_ARENA_MAX="2").split()

    assert (applied, off, operator) == ("True", "False", "False")
    assert int(kept_mb) > 150  # two 100 MB buffers freed, kept by the process
    assert int(returned_mb) < 100  # handed back to the OS at once
