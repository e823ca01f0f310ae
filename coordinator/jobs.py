"""Apply (inference) jobs: submitted through the control queue, run by a worker, results kept in SQL.

``submit_job`` records the job with its input (a weight frame of arrays) and sends an ``ApplyTask`` to
one worker through the outbox, in one transaction; ``record_result`` stores the worker's outputs (or
its error) once — a second delivery of the same result changes nothing, and a result from any other
broker user than the job's worker is ignored.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select

from common import codec
from common.broker.topology import TASKS_EXCHANGE
from common.errors import ConfigError, DecodeError, NotFoundError
from common.messages import ApplyTask, JobResult, SubmitJob
from coordinator.db.blobs import read_blob, write_blob
from coordinator.db.engine import Database
from coordinator.db.models import Job, Model, ModelVersion, OutboxMessage, Worker
from coordinator.rounds import utcnow

logger = logging.getLogger(__name__)

JOB_PENDING, JOB_DONE, JOB_FAILED = "pending", "done", "failed"


@dataclass(frozen=True)
class JobView:
    job_id: str
    model: str
    version: int
    state: str
    worker: str | None
    error: str | None
    outputs: list[np.ndarray] | None


def submit_job(db: Database, msg: SubmitJob, rng: random.Random | None = None) -> bool:
    """Record the job and queue its task; False when the job id is already known."""
    inputs = codec.decode_weights(msg.payload)  # refuse a malformed input now, not on a worker
    del inputs
    with db.session(write=True) as session:
        if session.scalar(select(Job.id).where(Job.job_id == msg.job_id)) is not None:
            return False
        model = session.scalar(select(Model).where(Model.name == msg.model))
        if model is None:
            raise NotFoundError(f"model {msg.model!r} does not exist")
        query = select(ModelVersion).where(ModelVersion.model_pk == model.id)
        if msg.version is None:
            query = (
                query.where(ModelVersion.status == "active").order_by(ModelVersion.version.desc()).limit(1)
            )
        else:
            query = query.where(ModelVersion.version == msg.version)
        version = session.scalar(query)
        if version is None:
            raise NotFoundError(f"model {msg.model!r} has no version {msg.version}")
        workers = list(session.scalars(select(Worker).where(Worker.status == "active")))
        if msg.worker is not None:
            workers = [w for w in workers if w.name == msg.worker]
        if not workers:
            raise ConfigError(f"no active worker {'named ' + msg.worker if msg.worker else 'to run the job'}")
        seen = [w for w in workers if w.last_seen_at is not None]
        worker = (
            max(seen, key=lambda w: w.last_seen_at or utcnow()) if seen else (rng or random).choice(workers)
        )
        blob = write_blob(session, msg.payload)
        session.add(
            Job(
                job_id=msg.job_id,
                kind="apply",
                model_pk=model.id,
                version_id=version.id,
                state=JOB_PENDING,
                worker_id=worker.id,
                input_blob_id=blob.id,
            )
        )
        task = ApplyTask(
            job_id=msg.job_id,
            model=model.name,
            version=version.version,
            weights_sha256=version.weights_sha256,
            payload=msg.payload,
        )
        session.add(
            OutboxMessage(
                message_id=f"job-{msg.job_id}",
                exchange=TASKS_EXCHANGE,
                routing_key=worker.name,
                body=task.encode(),
            )
        )
    logger.info("job %s: %s v%d on %s", msg.job_id, msg.model, version.version, worker.name)
    return True


def record_result(db: Database, msg: JobResult, user_id: str | None) -> bool:
    """Store a job's outputs or error; False for duplicates and results from the wrong sender."""
    if msg.error is None:
        try:
            codec.decode_weights(msg.payload)
        except DecodeError as exc:
            msg = JobResult(job_id=msg.job_id, worker=msg.worker, error=f"outputs do not decode: {exc}")
    with db.session(write=True) as session:
        job = session.scalar(select(Job).where(Job.job_id == msg.job_id))
        if job is None or job.state != JOB_PENDING:
            return False
        worker = session.get(Worker, job.worker_id) if job.worker_id else None
        if worker is None or worker.name != msg.worker or user_id != worker.name:
            logger.warning("result of job %s from %r ignored: not the job's worker", msg.job_id, user_id)
            return False
        if msg.error is None:
            job.result_blob_id = write_blob(session, msg.payload).id
            job.state = JOB_DONE
        else:
            job.state, job.error = JOB_FAILED, msg.error[:2000]
        job.finished_at = utcnow()
    return True


def job_view(db: Database, job_id: str) -> JobView:
    with db.session() as session:
        job = session.scalar(select(Job).where(Job.job_id == job_id))
        if job is None:
            raise NotFoundError(f"job {job_id!r} does not exist")
        model = session.get(Model, job.model_pk)
        version = session.get(ModelVersion, job.version_id)
        worker = session.get(Worker, job.worker_id) if job.worker_id else None
        outputs = None
        if job.result_blob_id is not None:
            outputs = [np.array(a) for a in codec.decode_weights(read_blob(session, job.result_blob_id))]
        return JobView(
            job_id=job.job_id,
            model=model.name if model else "?",
            version=version.version if version else 0,
            state=job.state,
            worker=worker.name if worker else None,
            error=job.error,
            outputs=outputs,
        )
