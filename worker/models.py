"""The worker's model store: verified releases on disk, keyed by model, version and weights sha256.

A release reaches the worker three ways: from the cache directory, from the releases fanout (every
new version), or fetched by request/reply (the RabbitMQ counterpart of dafne-dl's
``RemoteModelProvider``). Whatever the way, :func:`common.release.open_release` verifies it against
the coordinator's key before anything in it is parsed or compiled; the cache holds the release
bytes and is verified again when read, so a tampered cache file is refused like a tampered message.

Replays: a release that arrives unasked (the releases fanout announces the newest version) must not
be older than the newest version the store has accepted for that model, or it is refused with
:class:`~common.errors.StaleVersionError` before anything in it is read. A release the store asked
for (a task names an explicit version, which the store fetches or reads from its cache) may be
older: tasks legitimately train older versions. The high-water mark is kept in memory and starts,
when the worker starts, from the newest version in its cache (releases are cached only once verified).

Retention: the cache directory keeps the newest ``keep_versions`` releases of each model (and the
one just added, when a task asked for an older one); older files are removed as new versions
arrive. A worker in a long run would otherwise keep every version it ever trained (a 100 MB model:
100 GB after 1,000 rounds), and every cached byte is written to its disk. A task that names a
version no longer cached fetches it again.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.errors import DecodeError, FedmqError, SignatureError, StaleVersionError
from common.messages import ModelRelease, decode
from common.model import DynamicDLModel
from common.model.bundle import join_model
from common.release import VerifiedRelease, open_release, release_frame_size
from worker.config import KEEP_VERSIONS

logger = logging.getLogger(__name__)

Fetcher = Callable[[str, int], None]


class ModelStore:
    """Verified releases by (model, version); :meth:`get` waits for a fetched one to arrive."""

    def __init__(
        self, cache_dir: Path, trusted: Ed25519PublicKey, keep_versions: int = KEEP_VERSIONS
    ) -> None:
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1, not {keep_versions}")
        self.cache_dir = cache_dir
        self.trusted = trusted
        self.keep_versions = keep_versions
        self._releases: dict[tuple[str, int], VerifiedRelease] = {}
        self._latest: dict[str, int] = {}
        self._requested: set[tuple[str, int]] = set()
        self._arrived = threading.Condition()
        self._built: dict[str, tuple[str, DynamicDLModel]] = {}  # model -> (code sha256, model)
        self._latest.update(self._cached_versions())

    def _cached_versions(self) -> dict[str, int]:
        """The newest version of each model in the cache directory (releases are cached only
        after they verified), so the replay rule and the broadcast wait survive a restart."""
        newest: dict[str, int] = {}
        for path in self.cache_dir.glob("*/v*.release"):
            digits = path.stem[1:]
            if digits.isdigit():
                newest[path.parent.name] = max(int(digits), newest.get(path.parent.name, 0))
        return newest

    def _path(self, model: str, version: int) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)
        return self.cache_dir / safe / f"v{version}.release"

    def _prune(self, model: str, added: int) -> None:
        """Remove cached releases of ``model`` but the newest ``keep_versions`` and ``added``."""
        versions: list[tuple[int, Path]] = []
        for path in self._path(model, added).parent.glob("v*.release"):
            digits = path.stem[1:]
            if digits.isdigit():
                versions.append((int(digits), path))
        versions.sort()
        for version, path in versions[: -self.keep_versions]:
            if version != added:
                path.unlink(missing_ok=True)
                logger.debug("cache: removed %s v%d (keeping %d)", model, version, self.keep_versions)

    def latest(self, model: str) -> int | None:
        """The newest version of ``model`` this store has accepted, if any."""
        with self._arrived:
            return self._latest.get(model)

    def add(
        self,
        body: bytes | bytearray | memoryview,
        *,
        explicit: bool = False,
        source: Path | None = None,
        verified_tail: tuple[int, str] | None = None,
    ) -> VerifiedRelease:
        """Verify a release body and keep it (memory and disk). Raises SignatureError / DecodeError.

        An unasked release (not ``explicit``, not fetched by :meth:`get`) older than the newest
        accepted version of its model is a replay: StaleVersionError (see the module docstring).
        ``source`` is a file holding exactly ``body`` (a reassembled transfer): it is linked into
        the cache instead of written again. ``verified_tail`` is ``(offset, sha256 of
        body[offset:])`` as the transport checked it (:attr:`common.broker.Delivery.verified_tail`):
        when it covers exactly the weight frame, the frame is not hashed again.
        """
        release = decode(body, ModelRelease)
        with self._arrived:
            asked = explicit or (release.model, release.version) in self._requested
            newest = self._latest.get(release.model)
        if not asked and newest is not None and release.version < newest:
            raise StaleVersionError(
                f"{release.model} v{release.version} announced after v{newest}: a replayed release"
            )
        frame_sha256 = None
        if verified_tail is not None and verified_tail[0] == len(body) - release_frame_size(release):
            frame_sha256 = verified_tail[1]
        verified = open_release(release, self.trusted, frame_sha256=frame_sha256)
        path = self._path(verified.model, verified.version)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        try:
            if source is None:
                raise OSError("no file to link")
            os.link(source, tmp)
        except OSError:  # another file system, or no file: write the bytes
            tmp.write_bytes(body)
        os.replace(tmp, path)
        self._prune(verified.model, verified.version)
        with self._arrived:
            self._releases[(verified.model, verified.version)] = verified
            self._requested.discard((verified.model, verified.version))
            self._latest[verified.model] = max(verified.version, self._latest.get(verified.model, 0))
            # Keep the newest two versions of each model in memory; older ones stay on disk.
            versions = sorted(v for (m, v) in self._releases if m == verified.model)
            for old in versions[:-2]:
                del self._releases[(verified.model, old)]
            self._arrived.notify_all()
        logger.info("release %s v%d verified and cached", verified.model, verified.version)
        return verified

    def _from_disk(self, model: str, version: int) -> VerifiedRelease | None:
        path = self._path(model, version)
        if not path.exists():
            return None
        try:
            return self.add(path.read_bytes(), explicit=True)
        except (SignatureError, DecodeError) as exc:
            logger.warning("cached release %s refused (%s); fetching it again", path, exc)
            path.unlink(missing_ok=True)
            return None

    def get(
        self,
        model: str,
        version: int,
        weights_sha256: str,
        fetch: Fetcher,
        timeout_s: float,
        broadcast_wait_s: float = 0.0,
    ) -> VerifiedRelease:
        """The verified release of ``model`` ``version``, fetching it if needed.

        A version newer than every one this store holds of ``model`` is being announced: the
        coordinator publishes a version's release before any task that names it, so its broadcast
        is already queued for this worker. It is awaited for up to ``broadcast_wait_s`` before a
        fetch, which would have the coordinator build and send the same release once more. Older
        versions, and models this store has never held, are fetched at once.
        """
        with self._arrived:
            found = self._releases.get((model, version))
        if found is None:
            found = self._from_disk(model, version)
        if found is None and broadcast_wait_s > 0 and version > (self.latest(model) or version):
            with self._arrived:
                self._arrived.wait_for(lambda: (model, version) in self._releases, timeout=broadcast_wait_s)
                found = self._releases.get((model, version))
            if found is None:
                logger.info(
                    "%s v%d not broadcast within %.0f s: fetching it", model, version, broadcast_wait_s
                )
        if found is None:
            with self._arrived:
                self._requested.add((model, version))
            fetch(model, version)
            with self._arrived:
                self._arrived.wait_for(
                    lambda: (model, version) in self._releases or self._path(model, version).exists(),
                    timeout=timeout_s,
                )
                found = self._releases.get((model, version))
            if found is None:
                found = self._from_disk(model, version)
            if found is None:
                raise FedmqError(f"{model} v{version} did not arrive within {timeout_s:.0f} s")
        if found.weights_sha256 != weights_sha256:
            raise SignatureError(f"{model} v{version}: the task names other weights than the signed release")
        return found

    def load(self, release: VerifiedRelease) -> DynamicDLModel:
        """The model of a verified release: its code compiled, the version's weights set.

        The model built from one code (same model, same code sha256) is kept and reused for its
        later versions: building runs the model's ``init_model_function`` (a Keras model is
        constructed, a large model's initial weights drawn), which can cost more than a task's
        training, while every version carries all its weights and :meth:`load` sets all of them.
        What a model keeps besides its weights (e.g. a Keras optimizer's slots) carries over from
        task to task, as in a long-lived client. The worker runs one task at a time, so one model
        per code is never used by two tasks at once.
        """
        code_sha256, built = self._built.get(release.model, ("", None))
        if built is None or code_sha256 != release.code_sha256:
            built = join_model(release.code, release.weights)
            self._built[release.model] = (release.code_sha256, built)  # one model per name
        else:
            built.set_weights(release.weights)
            built.reset_timestamp()
        return built
