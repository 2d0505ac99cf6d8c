"""The persistent job store: job records in memory and on disk."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from pydantic import ValidationError

from deployments.jobs.records import JobNotFoundError, JobRecord
from graph.common.files import atomic_write_text

logger = logging.getLogger("camgraph.jobs")


class JobStore:
    """Job records in memory and one JSON file each under `directory`, written atomically
    (temp file + fsync + rename): a crash leaves the old or the new record, never half."""

    def __init__(self, directory: Path, keep_finished: int = 1000) -> None:
        self.directory = directory
        self.keep_finished = keep_finished
        self._records: dict[str, JobRecord] = {}
        self._lock = threading.Lock()  # the dict: `persist` runs in worker threads
        self._write_lock = threading.Lock()  # the files: one writer at a time

    def open(self) -> list[JobRecord]:
        """Load every record; jobs that were queued or running are now `interrupted`
        (persisted). Temp files of an interrupted write are removed. Returns those."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.glob("*.tmp"):
            leftover.unlink(missing_ok=True)
        downloads = self.directory / "downloads"
        if downloads.is_dir():
            for partial in downloads.iterdir():
                partial.unlink(missing_ok=True)
        interrupted: list[JobRecord] = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                record = JobRecord.model_validate_json(path.read_bytes())
            except (OSError, ValidationError) as exc:
                logger.warning("ignoring unreadable job record %s: %s", path, exc)
                continue
            if record.active:
                record = record.model_copy(
                    update={
                        "status": "interrupted",
                        "finished_at": time.time(),
                        "error": f"the jobs actor restarted while the job was {record.status}",
                    }
                )
                interrupted.append(record)
            self._records[record.job_id] = record
        for record in interrupted:
            self.persist(record.job_id)
        self.prune()
        return interrupted

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            record = self._records.get(job_id)
        if record is None:
            raise JobNotFoundError(job_id)
        return record

    def put(self, record: JobRecord) -> None:
        """Memory only; `persist` writes it."""
        with self._lock:
            self._records[record.job_id] = record

    def active_for(self, media_id: str) -> JobRecord | None:
        with self._lock:
            return next(
                (r for r in self._records.values() if r.media_id == media_id and r.active), None
            )

    def newest(self, limit: int = 100) -> list[JobRecord]:
        """Newest first."""
        with self._lock:
            records = sorted(self._records.values(), key=lambda r: r.created_at, reverse=True)
        return records[:limit]

    def persist(self, job_id: str) -> None:
        """Write the job's current record: whatever `put` stored last, so writes that race
        still leave the newest state on disk. The dict stays free while the file syncs."""
        with self._write_lock:
            with self._lock:
                record = self._records.get(job_id)
            if record is None:  # pruned meanwhile
                return
            atomic_write_text(self.directory / f"{job_id}.json", record.model_dump_json())

    def prune(self) -> list[str]:
        """Forget the oldest finished jobs beyond `keep_finished` (memory and disk)."""
        with self._write_lock, self._lock:
            finished = [r for r in self._records.values() if not r.active]
            finished.sort(key=lambda r: r.created_at if r.finished_at is None else r.finished_at)
            excess = finished[: max(0, len(finished) - self.keep_finished)]
            for record in excess:
                del self._records[record.job_id]
                (self.directory / f"{record.job_id}.json").unlink(missing_ok=True)
        return [r.job_id for r in excess]
