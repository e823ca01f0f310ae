"""Federated rounds end to end: real RabbitMQ, real database, coordinator and workers as processes."""

from __future__ import annotations

import numpy as np
import pytest

from common.model.numpy_model import make_linear_model
from coordinator.registry import KeySigner, ModelRegistry
from tests.integration.cluster import Cluster

pytestmark = pytest.mark.integration


def blobs(
    n_workers: int, seed: int = 0, per_worker: int = 200
) -> tuple[list[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """Three gaussian classes in 4 dimensions, split so each worker sees mostly one class."""
    rng = np.random.default_rng(seed)
    centers = np.array([[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0]], dtype=np.float32)

    def sample(n: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        y = rng.choice(3, size=n, p=weights)
        return (centers[y] + rng.normal(0, 0.7, size=(n, 4))).astype(np.float32), y.astype(np.int64)

    parts = []
    for i in range(n_workers):
        weights = np.full(3, 0.1)
        weights[i % 3] = 0.8
        x, y = sample(per_worker, weights)
        parts.append({"x": x, "y": y})
    return parts, sample(600, np.full(3, 1 / 3))


def accuracy(cluster: Cluster, version: int, test: tuple[np.ndarray, np.ndarray]) -> float:
    from common.model.bundle import join_model

    with cluster.database() as db:
        registry = ModelRegistry(db, KeySigner.from_settings(cluster.settings))
        model = join_model(
            registry.model_code("blobs"), [np.array(w) for w in registry.weights("blobs", version)]
        )
    return float((model(test[0]).argmax(1) == test[1]).mean())


def test_three_workers_three_rounds_every_delta_accounted(cluster: Cluster):
    parts, test = blobs(3)
    cluster.register("blobs", make_linear_model(4, 3, model_id="blobs", learning_rate=0.2))
    for i, part in enumerate(parts):
        cluster.add_worker(f"w{i}", part)
    cluster.start_coordinator()
    for i in range(3):
        cluster.start_worker(f"w{i}")

    run_id = cluster.start_run("blobs", rounds=3, min_workers=3, train={"epochs": 2, "batch_size": 16})
    view = cluster.wait_run(run_id)

    assert view.state == "completed", view
    assert [r.result_version for r in view.rounds] == [2, 3, 4]
    for r in view.rounds:
        assert r.state == "closed" and r.tasks == 3 and r.accepted == 3
        assert sorted(d.worker or "" for d in r.deltas) == ["w0", "w1", "w2"]
        assert all(d.status == "aggregated" for d in r.deltas)
        assert r.metrics["deltas"] == 3 and r.metrics["samples"] == 600
    with cluster.database() as db:
        versions = ModelRegistry(db, KeySigner.from_settings(cluster.settings)).versions("blobs")
    assert [(v.version, v.parent_version) for v in versions] == [(1, None), (2, 1), (3, 2), (4, 3)]
    assert accuracy(cluster, 4, test) > accuracy(cluster, 1, test) + 0.3


def test_an_apply_job_runs_at_a_worker_and_its_outputs_are_kept(sqlite_cluster: Cluster):
    cluster = sqlite_cluster
    from typer.testing import CliRunner

    from coordinator.cli.main import app

    # Prepare
    model = make_linear_model(4, 3, model_id="blobs", seed=4)
    parts, (x_test, _) = blobs(1)
    cluster.register("blobs", model)
    cluster.add_worker("w0", parts[0])
    cluster.start_coordinator()
    cluster.start_worker("w0")
    np.save(cluster.root / "inputs.npy", x_test[:5])

    # Execute: the CLI submits through the control queue and waits for the worker's answer.
    result = CliRunner().invoke(
        app,
        [
            "jobs",
            "submit",
            "apply",
            "blobs",
            "--input",
            str(cluster.root / "inputs.npy"),
            "--wait",
            "--out",
            str(cluster.root / "out.npy"),
        ],
        env=cluster.env(),
    )

    # Assert
    assert result.exit_code == 0, result.output
    assert "done" in result.output
    np.testing.assert_allclose(np.load(cluster.root / "out.npy"), model(x_test[:5]), rtol=1e-6)


def digits_split(n_workers: int) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)
    order = np.random.default_rng(3).permutation(len(x))
    test, train = order[:400], order[400:]
    return [{"x": x[i], "y": y[i]} for i in np.array_split(train, n_workers)], {"x": x[test], "y": y[test]}


def test_a_poisoned_worker_is_withstood_by_a_robust_strategy(sqlite_cluster: Cluster):
    # Prepare: three copies of one digits model; four honest workers and one whose deltas are x(-20).
    cluster = sqlite_cluster
    parts, test = digits_split(5)
    np.savez(cluster.root / "heldout.npz", **test)
    for name in ("clean", "robust", "naive"):
        cluster.register(name, make_linear_model(64, 10, model_id="digits", learning_rate=0.5))
    for i, part in enumerate(parts):
        cluster.add_worker(f"w{i}", part)
    cluster.start_coordinator()
    for i in range(4):
        cluster.start_worker(f"w{i}")
    cluster.start_worker("w4", malicious=True)
    cluster.wait_workers_seen([f"w{i}" for i in range(5)])
    common = {
        "rounds": 4,
        "deadline_s": 120.0,
        "train": {"epochs": 3, "batch_size": 16},
        "eval_data": str(cluster.root / "heldout.npz"),
    }

    # Execute: FedAvg of the honest workers only; trimmed mean and FedAvg with the attacker.
    honest = [f"w{i}" for i in range(4)]
    clean = cluster.wait_run(cluster.start_run("clean", min_workers=4, workers=honest, **common))
    everyone = [f"w{i}" for i in range(5)]
    robust = cluster.wait_run(
        cluster.start_run(
            "robust",
            min_workers=5,
            workers=everyone,
            strategy="trimmed-mean",
            options={"beta": 0.2},
            **common,
        )
    )
    naive = cluster.wait_run(cluster.start_run("naive", min_workers=5, workers=everyone, **common))

    # Assert: the robust run reaches the clean accuracy within 2 points; plain FedAvg does not.
    def final(view) -> float:
        assert view.state == "completed", view
        return float(view.rounds[-1].metrics["eval_accuracy"])

    assert final(clean) > 0.85
    assert final(robust) >= final(clean) - 0.02
    assert final(naive) < final(clean) - 0.2
    assert robust.strategy == "trimmed-mean"
