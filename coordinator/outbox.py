"""The outbox relay: publishes, with confirms, the messages committed to the ``outbox`` table.

State changes and the messages announcing them are written in one transaction (see
:mod:`coordinator.rounds`); this relay publishes unsent rows in id order and marks each sent only
after the broker confirmed it. A crash between the confirm and the mark publishes the row again
after restart: every consumer is idempotent (task ids, versions), so that is harmless.

Release rows carry no body: the relay builds the release (code envelope, signed manifest, weights
frame) from the registry when it publishes, so a 100 MB version is not stored twice. A release
nobody is bound to receive yet is not an error (workers fetch versions on demand).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import select

from common.broker import Broker, OutgoingMessage
from common.errors import BrokerError, FedmqError, UnroutableMessageError
from common.release import EncodedRelease
from coordinator.db.blobs import read_blob
from coordinator.db.engine import Database
from coordinator.db.models import OutboxMessage
from coordinator.rounds import RELEASE_HEADER, utcnow

logger = logging.getLogger(__name__)

ReleaseBuilder = Callable[[str, int], EncodedRelease]


class OutboxRelay:
    """Publishes outbox rows; :meth:`run` loops until ``stop`` is set, :meth:`wake` hurries it."""

    def __init__(
        self,
        db: Database,
        broker: Broker,
        build_release: ReleaseBuilder,
        poll_s: float = 0.5,
        batch: int = 100,
    ) -> None:
        self.db = db
        self.broker = broker
        self.build_release = build_release
        self.poll_s = poll_s
        self.batch = batch
        self._wake = threading.Event()

    def wake(self) -> None:
        self._wake.set()

    def pending(self) -> int:
        with self.db.session() as session:
            return len(list(session.scalars(select(OutboxMessage.id).where(OutboxMessage.sent_at.is_(None)))))

    def run_once(self) -> int:
        """Publish what is pending now; return how many rows were sent."""
        with self.db.session() as session:
            ids = list(
                session.scalars(
                    select(OutboxMessage.id)
                    .where(OutboxMessage.sent_at.is_(None))
                    .order_by(OutboxMessage.id)
                    .limit(self.batch)
                )
            )
        sent = 0
        for row_id in ids:
            if self._publish_row(row_id):
                sent += 1
        return sent

    def _publish_row(self, row_id: int) -> bool:
        with self.db.session() as session:
            row = session.get(OutboxMessage, row_id)
            if row is None or row.sent_at is not None:
                return False
            headers = dict(row.headers or {})
            release = headers.get(RELEASE_HEADER)
            tail_offset, tail_sha256 = 0, None
            if release is not None:
                built = self.build_release(str(release[0]), int(release[1]))
                body: bytes | bytearray = built.body
                tail_offset, tail_sha256 = built.frame_offset, built.weights_sha256
            elif row.body_blob_id is not None:
                body = bytes(read_blob(session, row.body_blob_id))
            else:
                body = row.body or b""
            message = OutgoingMessage(
                exchange=row.exchange,
                routing_key=row.routing_key,
                body=body,
                headers=headers,
                message_id=row.message_id,
                tail_offset=tail_offset,
                tail_sha256=tail_sha256,
            )
        error: str | None = None
        try:
            self.broker.publish(message)
        except UnroutableMessageError as exc:
            if release is None:
                error = str(exc)
        except BrokerError:
            raise
        except FedmqError as exc:  # a release that cannot be built (e.g. damaged weights)
            error = str(exc)
        with self.db.session(write=True) as session:
            row = session.get(OutboxMessage, row_id)
            assert row is not None
            row.attempts += 1
            if error is None:
                row.sent_at = utcnow()
            else:
                row.last_error = error[:2000]
                logger.warning("outbox message %s not delivered yet: %s", row.message_id, error)
        return error is None

    def run(self, stop: threading.Event) -> None:
        """Relay until ``stop`` is set; broker outages are waited out, never fatal."""
        while not stop.is_set():
            try:
                self.run_once()
            except FedmqError as exc:
                logger.warning("outbox relay: %s; retrying", exc)
                stop.wait(1.0)
            self._wake.wait(self.poll_s)
            self._wake.clear()
