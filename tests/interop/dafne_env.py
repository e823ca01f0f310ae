"""The dafne-dl environment: one virtualenv holding the PyPI releases of dafne-dl side by side.

fedmq claims its model format interoperates with the real ``dafne-dl`` package. To prove it without
installing dafne-dl where fedmq runs, the interop tests build a separate virtualenv at
``<repo>/.dafne-env`` (gitignored) with dafne-dl's runtime dependencies, and unpack each dafne-dl
release into its own ``--target`` directory inside it. A script runs against one release by putting
that directory on ``PYTHONPATH`` (:func:`run_dafne`).

dafne-dl calls ``flexidep.DependencyManager(...).install_auto()`` when imported, which pip-installs
whatever runtime dependency it cannot import (SimpleITK; tensorflow for 1.4). The environment
pre-installs all of them, so ``install_auto`` finds everything and installs nothing; as a guard, the
runner sets ``PIP_NO_INDEX=1`` so that any install attempted at run time fails loudly instead of
reaching the network, and points ``XDG_CONFIG_HOME`` into the environment so flexidep's config
directory is not created in the user's home.

The environment is reused when its marker file holds the same spec as :data:`ENV_SPEC`; otherwise it
is rebuilt from scratch. Building takes a minute or two on a fresh machine; progress goes to stderr.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV_DIR = REPO_ROOT / ".dafne-env"
DAFNE_SIDE = Path(__file__).resolve().parent / "dafne_side"

DAFNE_VERSIONS: tuple[str, ...] = ("1.4a2", "2.0.2b2")

# dafne-dl's runtime dependencies. TensorFlow and Keras are pinned to the versions in fedmq's own
# environment so that both sides compute with the same kernels; torch is the CPU build on this
# machine's disk (dafne-dl 2.x imports torch at import time); SimpleITK keeps flexidep quiet.
BASE_REQUIREMENTS: tuple[str, ...] = (
    "tensorflow-cpu==2.21.0",
    "keras==3.15.1",
    "torch==2.13.0",
    "dill",
    "numpy",
    "flexidep",
    "scikit-image",
    "scipy",
    "requests",
    "SimpleITK",
)

ENV_SPEC: dict[str, object] = {
    "format": 1,
    "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    "requirements": list(BASE_REQUIREMENTS),
    "dafne_dl": list(DAFNE_VERSIONS),
}

MARKER_NAME = "fedmq-dafne-env.json"
LOG_TAIL_CHARS = 4000


class DafneEnvError(RuntimeError):
    """The dafne-dl environment could not be built, or a dafne-side script failed."""


@dataclass(frozen=True)
class DafneEnv:
    """A built dafne-dl environment: one interpreter, one target directory per dafne-dl release."""

    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def marker(self) -> Path:
        return self.root / MARKER_NAME

    def target(self, version: str) -> Path:
        """The directory holding dafne-dl ``version`` (installed with ``pip --target``)."""
        if version not in DAFNE_VERSIONS:
            raise ValueError(f"dafne-dl {version!r} is not in this environment (have {DAFNE_VERSIONS})")
        return self.root / f"dafne-{version}"

    def is_complete(self) -> bool:
        """True when a previous build finished with the current spec."""
        try:
            recorded = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return False
        return (
            recorded.get("spec") == ENV_SPEC
            and self.python.exists()
            and all((self.target(v) / "dafne_dl" / "__init__.py").exists() for v in DAFNE_VERSIONS)
        )

    def child_env(self, version: str) -> dict[str, str]:
        """Environment variables for a process that imports dafne-dl ``version``."""
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP"}
        }
        env.update(
            {
                "PYTHONPATH": str(self.target(version)),
                "PYTHONHASHSEED": "0",
                "PYTHONDONTWRITEBYTECODE": "1",
                "PIP_NO_INDEX": "1",
                "XDG_CONFIG_HOME": str(self.root / "xdg-config"),
                "CUDA_VISIBLE_DEVICES": "",
                "TF_CPP_MIN_LOG_LEVEL": "2",
            }
        )
        return env

    def run(
        self, version: str, script: str | Path, *args: str, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """Run ``script`` (a path, or a file name in ``dafne_side/``) with dafne-dl ``version``.

        Raises :class:`DafneEnvError` with the output tail when the script exits non-zero.
        """
        script_path = Path(script) if Path(script).is_absolute() else DAFNE_SIDE / script
        result = subprocess.run(
            [str(self.python), str(script_path), *args],
            env=self.child_env(version),
            cwd=str(self.root),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise DafneEnvError(
                f"{script_path.name} failed under dafne-dl {version} (exit {result.returncode}):\n"
                f"--- stdout tail ---\n{result.stdout[-LOG_TAIL_CHARS:]}\n"
                f"--- stderr tail ---\n{result.stderr[-LOG_TAIL_CHARS:]}"
            )
        return result


def _log(message: str, stream: TextIO | None = None) -> None:
    print(f"[dafne-env] {message}", file=stream or sys.stderr, flush=True)


def _run_step(description: str, command: Sequence[str], **kwargs: object) -> None:
    _log(description)
    result = subprocess.run(list(command), capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-LOG_TAIL_CHARS:]
        raise DafneEnvError(
            f"building the dafne-dl environment failed at: {description}\n"
            f"command: {' '.join(command)}\n--- output tail ---\n{output}"
        )


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    """Serialise builds between concurrent test sessions sharing one checkout."""
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"fedmq-dafne-env-{digest}.lock"
    with open(lock_path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _base_python() -> str:
    """The interpreter to create the venv from: the one running fedmq's own environment."""
    return getattr(sys, "_base_executable", None) or sys.executable


def build_dafne_env(root: Path) -> DafneEnv:
    """Create the environment at ``root`` from scratch (removing any incomplete one) and verify it."""
    env = DafneEnv(root)
    if root.exists():
        _log(f"removing incomplete or outdated environment at {root}")
        shutil.rmtree(root)
    _run_step(f"creating virtualenv {root}", [_base_python(), "-m", "venv", str(root)])
    pip = [str(env.python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    _run_step(
        "installing dafne-dl's runtime dependencies (tensorflow-cpu, torch CPU, ...): takes a while",
        [*pip, *BASE_REQUIREMENTS],
    )
    for version in DAFNE_VERSIONS:
        _run_step(
            f"installing dafne-dl=={version} into {env.target(version)}",
            [*pip, "--no-deps", "--target", str(env.target(version)), f"dafne-dl=={version}"],
        )
    for version in DAFNE_VERSIONS:
        _log(f"checking that dafne-dl {version} imports without installing anything")
        env.run(version, "check_import.py", version)
    freeze = subprocess.run(
        [str(env.python), "-m", "pip", "freeze"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    env.marker.write_text(json.dumps({"spec": ENV_SPEC, "freeze": freeze}, indent=2) + "\n")
    _log(f"dafne-dl environment ready at {root}")
    return env


def ensure_dafne_env(root: Path = ENV_DIR) -> DafneEnv:
    """Return the environment at ``root``, building it first unless a complete one is there."""
    env = DafneEnv(root)
    if env.is_complete():
        return env
    with _build_lock(root):
        if env.is_complete():  # another session finished it while we waited
            return env
        return build_dafne_env(root)


def run_dafne(version: str, script: str | Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a ``dafne_side`` script with dafne-dl ``version`` in the (built or reused) environment."""
    return ensure_dafne_env().run(version, script, *args)


if __name__ == "__main__":
    ensure_dafne_env()
