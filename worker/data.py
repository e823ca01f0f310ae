"""A worker's local data: a directory of ``.npz`` files holding ``x`` (inputs) and ``y`` (targets).

The data never leaves the worker: only the model delta, the sample count and training metrics do.
Files are read in name order and concatenated; a file without ``x``/``y``, with mismatched lengths
or with object arrays (which would need pickle) is refused with a clear error.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalData:
    x: np.ndarray
    y: np.ndarray
    files: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.x)


def load_local_data(path: str | Path) -> LocalData:
    """Load every ``*.npz`` in ``path`` (or the single file ``path``)."""
    root = Path(path)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(root.glob("*.npz"))
    else:
        raise ConfigError(f"local data {root}: no such file or directory")
    if not files:
        raise ConfigError(f"local data {root}: no .npz files")
    xs, ys = [], []
    for file in files:
        try:
            with np.load(file, allow_pickle=False) as npz:
                if "x" not in npz or "y" not in npz:
                    raise ConfigError(f"{file}: needs arrays 'x' and 'y', has {sorted(npz.files)}")
                x, y = npz["x"], npz["y"]
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise ConfigError(f"{file}: not a readable .npz file ({exc})") from exc
        if len(x) != len(y):
            raise ConfigError(f"{file}: {len(x)} inputs but {len(y)} targets")
        xs.append(x)
        ys.append(y)
    data = LocalData(np.concatenate(xs), np.concatenate(ys), tuple(f.name for f in files))
    logger.info("local data: %d samples from %d file(s) in %s", len(data), len(files), root)
    return data
