"""`fedmq keys generate` and `fedmq keys show`, run as a user would through the CLI."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.errors import KeyFileError
from common.keyfiles import PASSPHRASE_ENV, load_private_key, load_public_key
from common.signing import key_id
from coordinator.cli import main as cli_main
from coordinator.cli.keys import KEYS_DIR_ENV
from coordinator.cli.main import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    monkeypatch.delenv(KEYS_DIR_ENV, raising=False)


def test_generate_writes_a_key_pair_and_prints_paths_and_key_id(tmp_path: Path) -> None:
    # Execute
    result = runner.invoke(app, ["keys", "generate", "--dir", str(tmp_path)])

    # Assert
    assert result.exit_code == 0, result.output
    private, public = tmp_path / "coordinator.key", tmp_path / "coordinator.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    expected_id = key_id(load_public_key(public))
    assert key_id(load_private_key(private).public_key()) == expected_id
    assert str(private) in result.output
    assert str(public) in result.output
    assert expected_id in result.output


def test_generate_refuses_to_replace_an_existing_key_with_a_one_line_error(tmp_path: Path) -> None:
    # Prepare
    runner.invoke(app, ["keys", "generate", "--dir", str(tmp_path)])
    before = (tmp_path / "coordinator.key").read_bytes()

    # Execute
    result = runner.invoke(app, ["keys", "generate", "--dir", str(tmp_path)])

    # Assert
    assert result.exit_code == 1
    assert isinstance(result.exception, KeyFileError)
    assert "\n" not in str(result.exception)
    assert "--force" in str(result.exception)
    assert (tmp_path / "coordinator.key").read_bytes() == before


def test_fedmq_entry_point_prints_the_refusal_as_one_line_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    runner.invoke(app, ["keys", "generate", "--dir", str(tmp_path)])
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["fedmq", "keys", "generate", "--dir", str(tmp_path)])

    # Execute
    with pytest.raises(SystemExit) as exited:
        cli_main.main()

    # Assert
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "coordinator.key already exists; pass --force" in err
    assert "Traceback" not in err


def test_generate_with_force_replaces_the_key(tmp_path: Path) -> None:
    # Prepare
    runner.invoke(app, ["keys", "generate", "--dir", str(tmp_path)])
    first_id = key_id(load_public_key(tmp_path / "coordinator.pub"))

    # Execute
    result = runner.invoke(app, ["keys", "generate", "--dir", str(tmp_path), "--force"])

    # Assert
    assert result.exit_code == 0, result.output
    new_id = key_id(load_public_key(tmp_path / "coordinator.pub"))
    assert new_id != first_id
    assert new_id in result.output


def test_default_directory_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEYS_DIR_ENV, str(tmp_path / "from-env"))
    result = runner.invoke(app, ["keys", "generate"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "from-env" / "coordinator.key").exists()


def test_default_directory_is_dot_fedmq_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["keys", "generate"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / ".fedmq" / "keys" / "coordinator.pub").exists()


def test_show_prints_the_key_id_of_a_directory_or_a_public_key_file(tmp_path: Path) -> None:
    # Prepare
    runner.invoke(app, ["keys", "generate", "--dir", str(tmp_path)])
    public = tmp_path / "coordinator.pub"
    expected_id = key_id(load_public_key(public))

    # Execute
    by_dir = runner.invoke(app, ["keys", "show", "--dir", str(tmp_path)])
    by_file = runner.invoke(app, ["keys", "show", "--public", str(public)])

    # Assert
    for result in (by_dir, by_file):
        assert result.exit_code == 0, result.output
        assert expected_id in result.output
        assert str(public) in result.output


def test_show_without_a_key_fails_with_key_file_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["keys", "show", "--dir", str(tmp_path)])
    assert result.exit_code == 1
    assert isinstance(result.exception, KeyFileError)
    assert str(tmp_path / "coordinator.pub") in str(result.exception)


def test_show_refuses_both_dir_and_public(tmp_path: Path) -> None:
    result = runner.invoke(app, ["keys", "show", "--dir", str(tmp_path), "--public", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "not both" in result.output


@pytest.mark.parametrize("command", ["generate", "show"])
def test_help_shows_an_example(command: str) -> None:
    result = runner.invoke(app, ["keys", command, "--help"])
    assert result.exit_code == 0
    assert f"fedmq keys {command} --" in result.output
