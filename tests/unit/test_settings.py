"""Settings: defaults, config file, environment, overrides, and one clear error per bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ConfigError
from common.settings import Settings, load_settings, redact_url


def test_defaults_work_on_a_developer_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)

    settings = load_settings(environ={})

    assert settings.database_url == "sqlite:///fedmq.db" and settings.is_sqlite
    assert settings.keys_dir == Path(".fedmq/keys")
    assert settings.chunk_size == 4 * 1024 * 1024


def test_environment_variables_override_the_config_file(tmp_path: Path):
    config = tmp_path / "fedmq.toml"
    config.write_text('database_url = "postgresql://u@db/fedmq"\nchunk_size = 1048576\nkeys_dir = "/k"\n')

    settings = load_settings(environ={"FEDMQ_CHUNK_SIZE": "2097152"}, config_file=config)

    assert settings.database_url == "postgresql://u@db/fedmq"
    assert settings.chunk_size == 2 * 1024 * 1024
    assert settings.keys_dir == Path("/k")


def test_config_file_from_the_environment_and_a_fedmq_table(tmp_path: Path):
    config = tmp_path / "other.toml"
    config.write_text('[fedmq]\nlog_level = "debug"\n')

    settings = load_settings(environ={"FEDMQ_CONFIG_FILE": str(config)})

    assert settings.log_level == "DEBUG"


def test_fedmq_toml_in_the_working_directory_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fedmq.toml").write_text('database_url = "sqlite:///other.db"\n')

    assert load_settings(environ={}).database_url == "sqlite:///other.db"


def test_overrides_win_and_none_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    env = {"FEDMQ_DATABASE_URL": "sqlite:///env.db"}

    assert load_settings(environ=env, database_url=None).database_url == "sqlite:///env.db"
    assert load_settings(environ=env, database_url="sqlite:///cli.db").database_url == "sqlite:///cli.db"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FEDMQ_CHUNK_SIZE": "lots"}, "FEDMQ_CHUNK_SIZE: chunk_size must be an integer"),
        ({"FEDMQ_CHUNK_SIZE": str(32 * 1024 * 1024)}, "chunk_size must be between"),
        ({"FEDMQ_DATABASE_URL": "mysql://x"}, "database_url must start with"),
        ({"FEDMQ_AMQP_URL": "http://x"}, "amqp_url must start with"),
        ({"FEDMQ_ENVIRONMENT": "staging"}, "environment must be one of"),
        ({"FEDMQ_DB_BUSY_TIMEOUT_S": "0"}, "db_busy_timeout_s must be positive"),
        ({"FEDMQ_ENVIRONMENT": "production"}, "default guest password"),
        ({"FEDMQ_CONFIG_FILE": "/nonexistent/fedmq.toml"}, "cannot read config file"),
    ],
)
def test_bad_values_give_one_clear_error(env: dict[str, str], message: str, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ConfigError, match=message):
        load_settings(environ=env)


def test_bad_config_files_are_refused(tmp_path: Path):
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('databse_url = "sqlite:///typo.db"\n')
    broken = tmp_path / "broken.toml"
    broken.write_text("database_url = \n")

    with pytest.raises(ConfigError, match=r"unknown setting.*databse_url"):
        load_settings(environ={}, config_file=unknown)
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(environ={}, config_file=broken)


def test_production_accepts_real_credentials():
    settings = Settings(environment="production", amqp_url="amqps://fedmq:s3cret@broker:5671/fedmq")

    assert settings.environment == "production"


def test_passwords_are_redacted_in_messages():
    assert redact_url("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_url("sqlite:///fedmq.db") == "sqlite:///fedmq.db"
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"FEDMQ_DATABASE_URL": "mysql://u:secret@h/db"})
    assert "secret" not in str(info.value)
