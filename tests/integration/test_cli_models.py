"""`fedmq db` and `fedmq models` as a user runs them: through the real entry point, on real databases.

Errors must come out as one line on stderr starting with ``error:`` and exit code 1, with nothing
half-written behind them.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from coordinator.cli.main import main
from tests.fixtures.ports import free_port

pytestmark = pytest.mark.integration

LINEAR_MODEL_FILE = """
from common.model.numpy_model import make_linear_model

def make_model():
    return make_linear_model(64, 10, model_id="digits-linear")

def make_other():
    return make_linear_model(8, 2, model_id="tiny")

def not_a_model():
    return 42
"""


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


@pytest.fixture
def fedmq(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Run ``fedmq ARGS`` in-process through the console-script entry point; return code and output."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDMQ_KEYS_DIR", str(tmp_path / "keys"))
    monkeypatch.delenv("FEDMQ_CONFIG_FILE", raising=False)

    def run(*args: str) -> Result:
        monkeypatch.setattr(sys, "argv", ["fedmq", *args])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def assert_one_line_error(result: Result, *fragments: str) -> None:
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.code == 1, (result.code, result.out, result.err)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def ready(fedmq, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A migrated database on each backend, a key pair, and the linear model file."""
    monkeypatch.setenv("FEDMQ_DATABASE_URL", database_url)
    assert fedmq("db", "upgrade").code == 0
    assert fedmq("keys", "generate").code == 0
    (tmp_path / "linear.py").write_text(LINEAR_MODEL_FILE)
    return fedmq


class TestModelsCommands:
    def test_register_list_show_versions_rollback_diff_export(self, ready, tmp_path: Path):
        stored = ready("models", "register", "digits", "linear.py", "--json", "-d", "first try")
        assert stored.code == 0, stored.err
        assert stored.json()["version"] == 1

        listed = ready("models", "list", "--json").json()
        shown = ready("models", "show", "digits", "--json").json()
        assert [(m["name"], m["model_id"], m["latest_version"]) for m in listed] == [
            ("digits", "digits-linear", 1)
        ]
        assert shown["description"] == "first try" and "apply_model_function" in shown["functions"]

        assert ready("models", "rollback", "digits", "1").code == 1  # v1 is already the latest
        assert ready("models", "register", "small", "linear.py", "-f", "make_other").code == 0
        exported = ready("models", "export", "digits", "--format", "weights-npz", "-o", "w.npz", "--json")
        assert exported.code == 0, exported.err
        with np.load(tmp_path / "w.npz") as npz:
            arrays = [npz[f"arr_{i}"] for i in range(len(npz.files))]
        assert [a.shape for a in arrays] == [(64, 10), (10,)]

        table = ready("models", "versions", "digits")
        diff = ready("models", "diff", "digits", "1", "1", "--json").json()
        assert table.code == 0 and "registered" in table.out
        assert [layer["l2"] for layer in diff] == [0.0, 0.0]

    def test_a_dafne_export_imports_back_with_trust(self, ready, tmp_path: Path):
        ready("models", "register", "digits", "linear.py")
        assert ready("models", "export", "digits", "--format", "dafne", "-o", "digits.model").code == 0

        refused = ready("models", "import", "copy", "digits.model")
        imported = ready("models", "import", "copy", "digits.model", "--trust", "--json")

        assert_one_line_error(refused, "--trust")
        assert imported.code == 0, imported.err
        original = ready("models", "show", "digits", "--json").json()
        copy = ready("models", "show", "copy", "--json").json()
        assert copy["latest"]["weights_sha256"] == original["latest"]["weights_sha256"]
        assert copy["code_sha256"] == original["code_sha256"]

    def test_delete_needs_force(self, ready):
        ready("models", "register", "digits", "linear.py")

        refused = ready("models", "delete", "digits")
        deleted = ready("models", "delete", "digits", "--force")

        assert_one_line_error(refused, "--force")
        assert deleted.code == 0
        assert ready("models", "list", "--json").json() == []

    def test_bad_input_gives_one_clear_line_and_changes_nothing(self, ready, tmp_path: Path):
        ready("models", "register", "digits", "linear.py")
        (tmp_path / "corrupt.model").write_bytes(b"\x80\x04garbage")
        (tmp_path / "folder.py").mkdir()
        (tmp_path / "existing.npz").write_bytes(b"keep me")

        assert_one_line_error(ready("models", "show", "nope"), "'nope' does not exist")
        assert_one_line_error(ready("models", "versions", "nope"), "does not exist")
        assert_one_line_error(
            ready("models", "export", "digits", "--version", "9", "--format", "dafne"), "no version 9"
        )
        assert_one_line_error(ready("models", "diff", "digits", "1", "2"), "no version 2")
        assert_one_line_error(
            ready("models", "import", "bad", "corrupt.model", "--trust"), "not a readable dafne model blob"
        )
        assert_one_line_error(ready("models", "register", "bad", "folder.py"), "cannot read Python file")
        assert_one_line_error(ready("models", "register", "bad", "missing.keras"), "cannot read Keras file")
        assert_one_line_error(ready("models", "register", "bad", "linear.py", "-f", "nope"), "no function")
        assert_one_line_error(
            ready("models", "register", "bad", "linear.py", "-f", "not_a_model"), "not a DynamicDLModel"
        )
        assert_one_line_error(ready("models", "register", "digits", "linear.py"), "already exists")
        assert_one_line_error(
            ready("models", "export", "digits", "--format", "weights-npz", "-o", "existing.npz"), "--force"
        )

        assert (tmp_path / "existing.npz").read_bytes() == b"keep me"
        assert not list(tmp_path.glob("digits-v9*"))
        assert [m["name"] for m in ready("models", "list", "--json").json()] == ["digits"]
        assert [v["version"] for v in ready("models", "versions", "digits", "--json").json()] == [1]


class TestDatabaseProblems:
    def test_an_out_of_date_schema_says_what_to_run(self, fedmq, tmp_path: Path, monkeypatch):
        monkeypatch.setenv("FEDMQ_DATABASE_URL", f"sqlite:///{tmp_path / 'fresh.db'}")

        before = fedmq("db", "current", "--check")
        refused = fedmq("models", "list")
        upgraded = fedmq("db", "upgrade", "--json")

        assert before.code == 1 and "out of date" in before.out
        assert_one_line_error(refused, "run `fedmq db upgrade`")
        assert upgraded.code == 0 and upgraded.json()["before"] is None
        assert fedmq("db", "current", "--check").code == 0

    def test_a_locked_sqlite_database(self, fedmq, tmp_path: Path, monkeypatch):
        path = tmp_path / "locked.db"
        monkeypatch.setenv("FEDMQ_DATABASE_URL", f"sqlite:///{path}")
        monkeypatch.setenv("FEDMQ_DB_BUSY_TIMEOUT_S", "0.2")
        (tmp_path / "linear.py").write_text(LINEAR_MODEL_FILE)
        fedmq("db", "upgrade")
        fedmq("keys", "generate")
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            locked = fedmq("models", "register", "digits", "linear.py")
        finally:
            holder.execute("ROLLBACK")
            holder.close()

        assert_one_line_error(locked, "is locked by another process")
        assert fedmq("models", "list", "--json").json() == []

    def test_an_unreachable_postgresql(self, fedmq, monkeypatch):
        monkeypatch.setenv("FEDMQ_DATABASE_URL", f"postgresql://fedmq:pw@127.0.0.1:{free_port()}/fedmq")
        monkeypatch.setenv("FEDMQ_DB_CONNECT_TIMEOUT_S", "2")

        listed = fedmq("models", "list")
        upgraded = fedmq("db", "upgrade")

        assert_one_line_error(listed, "cannot open PostgreSQL at postgresql+psycopg://fedmq:***@127.0.0.1")
        assert_one_line_error(upgraded, "cannot open PostgreSQL")
        assert "pw@" not in listed.err

    def test_a_bad_setting(self, fedmq, monkeypatch):
        monkeypatch.setenv("FEDMQ_DATABASE_URL", "mysql://nope")

        assert_one_line_error(fedmq("models", "list"), "database_url must start with")


def test_every_command_has_help_with_an_example(fedmq):
    commands = ["register", "import", "list", "show", "versions", "diff", "rollback", "export", "delete"]
    for group, names in (("models", commands), ("db", ["upgrade", "current"])):
        for name in names:
            shown = fedmq(group, name, "--help")
            assert shown.code == 0 and "Example:" in shown.out, (group, name, shown.out)


# ----------------------------------------------------------------------------- Keras and dafne-dl

DAFNE_APPLY = textwrap.dedent(
    """
    import sys
    import numpy as np
    from dafne_dl import DynamicDLModel

    with open(sys.argv[1], "rb") as f:
        model = DynamicDLModel.Loads(f.read())
    x = np.load(sys.argv[2])
    np.save(sys.argv[3], np.asarray(model.apply(x)))
    print(model.model_id, model.timestamp_id)
    """
)


@pytest.fixture(scope="module")
def keras_digits(tmp_path_factory: pytest.TempPathFactory):
    """A small Keras classifier trained briefly on scikit-learn's digits, saved as a .keras file."""
    import keras
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x[:600], y[:600], epochs=3, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("keras") / "digits.keras"
    model.save(path)
    sample = x[-32:]
    return path, sample, np.asarray(model.predict(sample, verbose=0))


@pytest.mark.interop
def test_keras_digits_register_list_export_and_load_in_dafne_dl(
    fedmq, keras_digits, tmp_path: Path, monkeypatch
):
    from common.model import DynamicDLModel
    from tests.interop.dafne_env import ensure_dafne_env

    keras_file, sample, expected = keras_digits
    monkeypatch.setenv("FEDMQ_DATABASE_URL", f"sqlite:///{tmp_path / 'fedmq.db'}")
    fedmq("db", "upgrade")
    fedmq("keys", "generate")

    stored = fedmq("models", "register", "digits", str(keras_file), "--json")
    listed = fedmq("models", "list", "--json")
    blob = fedmq("models", "export", "digits", "--format", "dafne", "-o", "digits.model")
    keras_out = fedmq("models", "export", "digits", "--format", "keras", "-o", "again.keras")

    assert stored.code == 0, stored.err
    assert [m["name"] for m in listed.json()] == ["digits"]
    assert blob.code == 0 and keras_out.code == 0, blob.err + keras_out.err
    ours = DynamicDLModel.Loads((tmp_path / "digits.model").read_bytes())
    np.testing.assert_allclose(np.asarray(ours.apply(sample)), expected, rtol=1e-5, atol=1e-6)
    import keras

    reloaded = keras.saving.load_model(tmp_path / "again.keras")
    np.testing.assert_allclose(
        np.asarray(reloaded.predict(sample, verbose=0)), expected, rtol=1e-5, atol=1e-6
    )

    script = tmp_path / "dafne_apply.py"
    script.write_text(DAFNE_APPLY)
    np.save(tmp_path / "x.npy", sample)
    run = ensure_dafne_env().run(
        "2.0.2b2", script, str(tmp_path / "digits.model"), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")
    )
    assert run.stdout.split()[0] == "digits"
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-6)
