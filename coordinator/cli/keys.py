"""`fedmq keys`: create and inspect the coordinator's Ed25519 signing key pair.

The private key (``coordinator.key``, mode 0600) stays on the coordinator and signs model envelopes;
the public key (``coordinator.pub``) is copied to every worker, which trusts only envelopes it verifies.
Errors are :class:`~common.errors.KeyFileError`; ``fedmq``'s entry point prints them as one line.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console

from common.keyfiles import PASSPHRASE_ENV, key_pair_paths, load_public_key, write_key_pair
from common.signing import key_id

KEYS_DIR_ENV = "FEDMQ_KEYS_DIR"

app = typer.Typer(
    help="Create and inspect the coordinator's Ed25519 key pair that signs model releases.",
    no_args_is_help=True,
)
_console = Console(soft_wrap=True, highlight=False)


def default_keys_dir() -> Path:
    """The keys directory when --dir is not given: the settings' keys_dir ($FEDMQ_KEYS_DIR, the
    config file, else ./.fedmq/keys)."""
    from common.settings import load_settings

    return load_settings().keys_dir


@app.command()
def generate(
    directory: Path | None = typer.Option(
        None, "--dir", help=f"Directory for the key pair (default: ${KEYS_DIR_ENV}, else ./.fedmq/keys)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing key pair."),
) -> None:
    """Write a new key pair: DIR/coordinator.key (mode 0600) and DIR/coordinator.pub.

    Keep coordinator.key secret (encrypted when FEDMQ_KEY_PASSPHRASE is set); copy coordinator.pub to workers.

    After --force, workers refuse the new key's envelopes until they are given the new coordinator.pub.

    Example: fedmq keys generate --dir /etc/fedmq/keys
    """
    files = write_key_pair(directory or default_keys_dir(), force=force)
    encrypted = f"encrypted with ${PASSPHRASE_ENV}" if os.environ.get(PASSPHRASE_ENV) else "unencrypted"
    _console.print(f"private key  {files.private_path}  (mode 0600, {encrypted}; keep it secret)")
    _console.print(f"public key   {files.public_path}  (copy it to every worker)")
    _console.print(f"key id       {files.key_id}")


@app.command()
def show(
    directory: Path | None = typer.Option(
        None, "--dir", help=f"Directory of the key pair (default: ${KEYS_DIR_ENV}, else ./.fedmq/keys)."
    ),
    public: Path | None = typer.Option(None, "--public", help="A public key file to inspect instead."),
) -> None:
    """Print the key id and path of a public key, to compare with the key id workers log.

    Example: fedmq keys show --dir /etc/fedmq/keys

    Example: fedmq keys show --public ./coordinator.pub
    """
    if directory is not None and public is not None:
        raise typer.BadParameter("give --dir or --public, not both")
    path = public or key_pair_paths(directory or default_keys_dir())[1]
    key = load_public_key(path)
    _console.print(f"public key   {path}")
    _console.print(f"key id       {key_id(key)}")
