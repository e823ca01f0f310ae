"""The model registry against real databases: every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import signal
import subprocess
import sys
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select, text, update

from common.errors import (
    AlreadyExistsError,
    IncompatibleModelError,
    NotFoundError,
    PayloadMismatchError,
    RequestError,
    SignatureError,
    StorageError,
)
from common.keyfiles import generate_key
from common.model.bundle import ModelCode
from common.settings import Settings
from coordinator.db import Database, upgrade
from coordinator.db.blobs import read_blob, write_blobs
from coordinator.db.models import ModelVersion
from coordinator.registry import KeySigner, ModelRegistry, verify_version

pytestmark = pytest.mark.integration

CODE = ModelCode(
    model_id="linear",
    functions={"init_model_function": "def init_model_function():\n    return None\n",
               "apply_model_function": "def apply_model_function(modelObj, data):\n    return data\n"},
    type="DynamicDLModel",
    data_dimensionality=1,
    metadata={"classes": 10},
)  # fmt: skip


def weights(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(64, 10)).astype(np.float32), rng.normal(size=10).astype(np.float32)]


@pytest.fixture
def db(database_url: str):
    database = Database.from_settings(Settings(database_url=database_url))
    upgrade(database)
    yield database
    database.dispose()


@pytest.fixture
def key():
    return generate_key()


@pytest.fixture
def registry(db: Database, key) -> ModelRegistry:
    return ModelRegistry(db, KeySigner(key))


class TestRegistry:
    def test_register_then_read_back_code_weights_and_version_1(self, registry: ModelRegistry):
        w = weights()

        info = registry.register("digits", CODE, w, description="digits classifier")

        assert (info.version, info.parent_version, info.status) == (1, None, "active")
        assert info.array_count == 2 and info.parameter_count == 650
        assert [m.name for m in registry.list_models()] == ["digits"]
        assert registry.model_code("digits").to_bytes() == CODE.to_bytes()
        back = registry.weights("digits")
        assert all(np.array_equal(a, b) for a, b in zip(back, w, strict=True))
        assert not back[0].flags.writeable

    def test_versions_keep_lineage_round_strategy_and_metrics(self, registry: ModelRegistry):
        registry.register("digits", CODE, weights(0))

        v2 = registry.add_version(
            "digits", weights(1), round_id=3, strategy="fedavg", strategy_config={"lr": 1.0},
            metrics={"accuracy": 0.9},
        )  # fmt: skip
        v3 = registry.add_version("digits", weights(2), parent_version=1)

        assert (v2.version, v2.parent_version, v2.round_id, v2.strategy) == (2, 1, 3, "fedavg")
        assert v2.metrics == {"accuracy": 0.9} and v2.strategy_config == {"lr": 1.0}
        assert (v3.version, v3.parent_version) == (3, 1)
        listed = registry.versions("digits")
        assert [(v.version, v.parent_version) for v in listed] == [(1, None), (2, 1), (3, 1)]
        assert listed[0].timestamp_id < listed[1].timestamp_id < listed[2].timestamp_id
        assert np.array_equal(registry.weights("digits", 2)[0], weights(1)[0])

    def test_rollback_makes_a_new_version_and_marks_later_ones(self, registry: ModelRegistry):
        registry.register("digits", CODE, weights(0))
        registry.add_version("digits", weights(1))
        registry.add_version("digits", weights(2))

        v4 = registry.rollback("digits", 1)

        assert (v4.version, v4.parent_version, v4.status, v4.strategy) == (4, 1, "active", "rollback")
        statuses = {v.version: v.status for v in registry.versions("digits")}
        assert statuses == {1: "active", 2: "rolled_back", 3: "rolled_back", 4: "active"}
        assert np.array_equal(registry.weights("digits")[0], weights(0)[0])
        assert registry.version("digits").weights_sha256 == registry.version("digits", 1).weights_sha256

    def test_rollback_to_the_latest_version_is_refused(self, registry: ModelRegistry):
        registry.register("digits", CODE, weights(0))

        with pytest.raises(RequestError, match="already the latest"):
            registry.rollback("digits", 1)

    def test_diff_reports_per_layer_l2_norms(self, registry: ModelRegistry):
        w1 = weights(0)
        w2 = [w1[0] + 1.0, w1[1].copy()]
        registry.register("digits", CODE, w1)
        registry.add_version("digits", w2)

        layers = registry.diff("digits", 1, 2)

        assert [layer.l2 for layer in layers] == [pytest.approx(np.sqrt(640)), 0.0]

    def test_signatures_verify_and_bind_the_weights(self, registry: ModelRegistry, key):
        registry.register("digits", CODE, weights(0))
        info = registry.version("digits", 1)
        frame = registry.weights_frame("digits", 1)

        manifest = verify_version(info.signature, key.public_key(), "digits", 1, frame)

        assert manifest["sha256"] == info.weights_sha256
        tampered = bytearray(frame)
        tampered[-1] ^= 1
        with pytest.raises(PayloadMismatchError):
            verify_version(info.signature, key.public_key(), "digits", 1, bytes(tampered))
        with pytest.raises(SignatureError):
            verify_version(info.signature, generate_key().public_key(), "digits", 1, frame)

    def test_errors_for_missing_duplicate_and_mismatched_input(self, registry: ModelRegistry):
        registry.register("digits", CODE, weights(0))

        with pytest.raises(AlreadyExistsError):
            registry.register("digits", CODE, weights(0))
        with pytest.raises(NotFoundError, match="'nope' does not exist"):
            registry.versions("nope")
        with pytest.raises(NotFoundError, match="no version 7"):
            registry.weights("digits", 7)
        with pytest.raises(IncompatibleModelError):
            registry.add_version("digits", [weights(0)[0]])
        with pytest.raises(RequestError):
            registry.register("bad name", CODE, weights(0))
        assert [v.version for v in registry.versions("digits")] == [1]

    def test_versions_are_immutable_in_the_database(self, registry: ModelRegistry, db: Database):
        registry.register("digits", CODE, weights(0))

        with pytest.raises(StorageError, match="immutable"), db.session(write=True) as session:
            session.execute(update(ModelVersion).values(weights_sha256="0" * 64))
        with pytest.raises(StorageError, match="immutable"), db.session(write=True) as session:
            session.execute(text("UPDATE blob_chunks SET seq = seq + 100"))
        with db.session(write=True) as session:  # the status is the one column that may change
            session.execute(update(ModelVersion).values(status="rolled_back"))

    def test_delete_needs_force_then_removes_everything(self, registry: ModelRegistry, db: Database):
        registry.register("digits", CODE, weights(0))
        registry.add_version("digits", weights(1))

        with pytest.raises(RequestError, match="--force"):
            registry.delete("digits")
        assert registry.delete("digits", force=True) == 2

        assert registry.list_models() == []
        with db.session() as session:
            assert session.execute(text("SELECT count(*) FROM blob_chunks")).scalar() == 0

    def test_a_failed_version_write_leaves_nothing_behind(self, registry: ModelRegistry, db: Database):
        registry.register("digits", CODE, weights(0))

        class FailingSigner:
            def sign(self, payload, *, kind, model, version):
                raise StorageError("signing failed")

        broken = ModelRegistry(db, FailingSigner())
        with pytest.raises(StorageError):
            broken.add_version("digits", weights(1))

        assert [v.version for v in registry.versions("digits")] == [1]
        with db.session() as session:
            assert session.execute(text("SELECT count(*) FROM blobs")).scalar() == 1

    def test_concurrent_writers_get_distinct_version_numbers(self, registry: ModelRegistry):
        registry.register("digits", CODE, weights(0))

        with ThreadPoolExecutor(max_workers=4) as pool:
            stored = list(pool.map(lambda seed: registry.add_version("digits", weights(seed)), range(1, 9)))

        assert sorted(v.version for v in stored) == list(range(2, 10))
        assert [v.version for v in registry.versions("digits")] == list(range(1, 10))

    def test_a_100_mb_version_round_trips_within_2_5x_its_size(self, registry: ModelRegistry):
        big = [np.random.default_rng(0).random(25 * 1024 * 1024, dtype=np.float32).reshape(-1, 1024)]
        size = big[0].nbytes
        registry.register("big", CODE, [np.zeros((1, 1), np.float32)])

        tracemalloc.start()
        try:
            registry.register("big2", CODE, big)
            _, write_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            back = registry.weights("big2")
            _, read_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

        assert np.array_equal(back[0], big[0])
        assert write_peak < 2.5 * size, f"write peak {write_peak / size:.2f}x the model size"
        assert read_peak < 2.5 * size, f"read peak {read_peak / size:.2f}x the model size"


_REGISTER_THEN_KILL = """
import os, signal, sys
import numpy as np
from common.keyfiles import generate_key
from common.settings import Settings
from coordinator.db import Database
from coordinator.registry import KeySigner, ModelRegistry
from tests.integration.test_registry import CODE, weights

db = Database.from_settings(Settings(database_url=sys.argv[1]))
registry = ModelRegistry(db, KeySigner(generate_key()))
registry.add_version("digits", weights(1), metrics={"accuracy": 0.5})
print("stored", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_committed_sqlite_version_survives_kill_9(tmp_path):
    url = f"sqlite:///{tmp_path / 'fedmq.db'}"
    db = Database.from_settings(Settings(database_url=url))
    upgrade(db)
    ModelRegistry(db, KeySigner(generate_key())).register("digits", CODE, weights(0))

    result = subprocess.run(
        [sys.executable, "-c", _REGISTER_THEN_KILL, url], capture_output=True, text=True, timeout=120
    )

    assert result.returncode == -signal.SIGKILL and "stored" in result.stdout, result.stderr
    registry = ModelRegistry(Database.from_settings(Settings(database_url=url)), KeySigner(generate_key()))
    assert registry.version("digits").version == 2
    assert np.array_equal(registry.weights("digits", 2)[1], weights(1)[1])


def test_a_stored_versions_frame_is_served_from_memory_and_read_from_sql_when_not_held(db, registry):
    from coordinator.db.blobs import BlobCache

    info = registry.register("linear", CODE, weights(0))
    with db.session() as session:
        row = session.scalar(select(ModelVersion).where(ModelVersion.version == info.version))
        blob_id, sha = row.weights_blob_id, row.weights_sha256
    held = registry.frames.read(None, blob_id, sha)  # type: ignore[arg-type]  # no SQL on a hit
    fresh = BlobCache(capacity=1)

    with db.session() as session:
        from_sql = fresh.read(session, blob_id, sha)
    fresh.put("0" * 64, b"other")  # the capacity is one blob: the first is dropped

    assert bytes(held) == bytes(from_sql) == bytes(registry.weights_frame("linear", info.version))
    assert held.readonly and from_sql.readonly
    with pytest.raises(AttributeError):  # dropped: this read goes to SQL, and the None session fails
        fresh.read(None, blob_id, sha)  # type: ignore[arg-type]


def test_a_new_sqlite_database_uses_wal_full_sync_and_large_pages(tmp_path):
    from coordinator.db.engine import SQLITE_AUTOCHECKPOINT_PAGES, SQLITE_PAGE_SIZE

    database = Database.from_settings(Settings(database_url=f"sqlite:///{tmp_path / 'new.db'}"))
    upgrade(database)
    with database.engine.connect() as conn:
        pragmas = ("journal_mode", "synchronous", "page_size", "wal_autocheckpoint")
        settings = [conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in pragmas]
    database.dispose()

    # 2: FULL, every commit fsynced; checkpoints left to Database.checkpoint below 1 GiB of WAL
    assert settings == ["wal", 2, SQLITE_PAGE_SIZE, SQLITE_AUTOCHECKPOINT_PAGES]


def test_the_coordinators_checkpoint_moves_a_large_wal_into_the_database(tmp_path):
    path = tmp_path / "ckpt.db"
    database = Database.from_settings(Settings(database_url=f"sqlite:///{path}"))
    upgrade(database)
    small = database.checkpoint()
    # 80 MB of blobs small enough to stay in SQL (larger ones go to files: test_blob_files.py)
    parts = [np.full(256 * 1024, i, np.float32).tobytes() for i in range(80)]
    with database.session(write=True) as session:
        ids = write_blobs(session, parts)
    wal_before = Path(f"{path}-wal").stat().st_size
    db_before = path.stat().st_size

    ran = database.checkpoint()

    assert not small and ran and wal_before > 64 << 20
    assert path.stat().st_size > db_before + (64 << 20)  # the pages are in the database file now
    assert not database.checkpoint(min_wal_bytes=wal_before * 2)
    with database.session() as session:
        assert bytes(read_blob(session, ids[-1])) == parts[-1]
    database.dispose()
