"""Retention: a final job's files leave the disk once they are due; the job's rows and log stay.

What a job leaves on disk: its instances in ``spool/``, ``jobs/<id>/`` (input links, output, logs) and
``outbox/<id>/`` (results). They are removed when the job is ``done`` (every delivery done) for
``retention.done_days`` or ``failed`` (no delivery still pending) for ``retention.failed_days``; 0 keeps them
forever. An instance a newer whole-study job of the same study needs (``late_instances: rerun`` of a finished
study reads the earlier jobs' instances) stays until that job is purgeable too; the next purge takes it. Until
that job has staged its results, the folders stay as well (its IOCM rejection note is made of the objects in this
job's outbox); they go with the instances kept.
A job still receiving, queued, running or delivering is never touched, and neither is anything it needs.

Each job is purged in three steps, each safe to repeat: (1) the store records the purge (which instances,
``purge_started_at``); from then on no job takes those instances as input and a file left behind is never
indexed again; (2) the files go; (3) the store marks the job ``purged_at`` with a ``purged`` event saying
what was removed and how many bytes that freed. A crash or an error between (1) and (3) leaves the purge
recorded but unfinished, and the next purge (the node runs one at start, then every
``retention.interval_minutes``; or ``radnode purge``) finishes it. Nothing outside ``data_dir`` is removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from radnode.config import Config
from radnode.node.store import JobState, JobStore, PurgePlan, store_target

log = logging.getLogger(__name__)

DAY = 86400.0


@dataclass(frozen=True)
class PurgeResult:
    """What a purge removed (or, in a dry run, would remove) of one job."""

    job_id: int
    state: JobState
    instances: int
    """Spool instances removed."""
    kept_for: tuple[tuple[int, int], ...]
    """(job id, instances) kept because that newer job still needs them."""
    folders: tuple[str, ...]
    """``jobs/<id>``, ``outbox/<id>`` as far as they were there."""
    files: int
    """Files removed, spool instances and everything in the folders."""
    bytes_freed: int
    """Bytes of the removed files whose last link went (a spool file still linked from another job's input
    folder frees nothing yet)."""
    resumed: bool
    """This finished a purge that had been interrupted."""
    finished: bool
    """The store records the job as purged (False in a dry run, on an error, or when another purge finished
    it first)."""
    error: str | None = None
    folders_kept_for: int | None = None
    """The newer job this job's folders were kept for (see :attr:`PurgePlan.folders_kept_for`)."""

    def describe(self, dry_run: bool = False) -> str:
        """One line, as the ``purged`` event and ``radnode purge`` say it."""
        what = [f"{self.instances} spool instance(s)", *self.folders]
        text = f"{'would remove' if dry_run else 'removed'} {', '.join(what)}: {self.files} file(s), " \
               f"{_size(self.bytes_freed)} {'to free' if dry_run else 'freed'} ({self.bytes_freed} bytes)"
        if self.kept_for:
            text += "; kept " + ", ".join(f"{n} instance(s) job {job} still needs" for job, n in self.kept_for)
        if self.folders_kept_for is not None:
            text += f"; kept its folders, which job {self.folders_kept_for} still reads before it delivers"
        if self.error:
            text += f"; unfinished, the next purge carries on: {self.error}"
        return text


@dataclass
class PurgeReport:
    """One purge pass: what it did per job."""

    dry_run: bool
    results: list[PurgeResult] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return sum(r.bytes_freed for r in self.results)

    def summary(self) -> str:
        """A line for the log and the command: jobs, instances, bytes."""
        if not self.results:
            return "retention: nothing due"
        verb = "would purge" if self.dry_run else "purged"
        errors = sum(1 for r in self.results if r.error)
        return (f"retention: {verb} {len(self.results)} job(s), {sum(r.instances for r in self.results)} spool "
                f"instance(s), {_size(self.bytes_freed)}" + (f"; {errors} unfinished" if errors else ""))


class Retention:
    """Purges what ``config.retention`` says is due, in the data folder of ``config``."""

    def __init__(self, config: Config, store: JobStore, should_stop: Callable[[], bool] = lambda: False) -> None:
        self.config = config
        self.store = store
        self.data_dir = config.data_dir.resolve()
        self.spool = self.data_dir / "spool"
        self.should_stop = should_stop
        self._last_pass: float | None = None

    def cutoffs(self, now: float) -> tuple[float | None, float | None]:
        """Jobs done / failed before these times are due; None: that state is kept forever."""
        retention = self.config.retention
        return (now - retention.done_days * DAY if retention.done_days else None,
                now - retention.failed_days * DAY if retention.failed_days else None)

    def tick(self) -> None:
        """The node's retention loop: a purge at the first call, then every ``retention.interval_minutes``."""
        now = time.monotonic()
        if self._last_pass is not None and now - self._last_pass < self.config.retention.interval_minutes * 60:
            return
        self._last_pass = now
        report = self.purge()
        if report.results:
            log.info("%s", report.summary())

    def purge(self, now: float | None = None, dry_run: bool = False) -> PurgeReport:
        """Purge every job due at ``now`` (default: the current time), unfinished purges first; a dry run
        records and removes nothing."""
        done_before, failed_before = self.cutoffs(time.time() if now is None else now)
        report = PurgeReport(dry_run)
        for job_id in self.store.purge_due(done_before, failed_before):
            if self.should_stop():
                break
            plan = self.store.begin_purge(job_id, done_before, failed_before, dry_run=dry_run)
            if plan is None:
                continue
            result = self._remove(plan, dry_run)
            report.results.append(result)
            if result.error:
                log.error("retention: job %d: %s", job_id, result.describe())
        return report

    def _remove(self, plan: PurgePlan, dry_run: bool) -> PurgeResult:
        """Remove the plan's spool files and the job's folders (step 2), then record it (step 3)."""
        outside = [p for p in plan.paths if not _inside(Path(p), self.spool)]
        spool_files = [Path(p) for p in plan.paths if _inside(Path(p), self.spool)]
        folders = [(f"{name}/{plan.job_id}", self.data_dir / name / str(plan.job_id)) for name in ("jobs", "outbox")]
        folders.append((f"outbox/{plan.job_id}.partial", self.data_dir / "outbox" / f"{plan.job_id}.partial"))
        folders = [(name, path) for name, path in folders if path.is_dir() and plan.folders_kept_for is None]
        stats = [s for s in map(_lstat, spool_files) if s is not None]
        counts = []
        for name, path in folders:
            inside = _tree_stats(path)
            counts.append(f"{name} ({len(inside)} files)")
            stats += inside
        freed = _freed_bytes(stats)
        error = None
        if not dry_run:
            error = self._delete(spool_files, [path for _, path in folders])
        result = PurgeResult(plan.job_id, plan.state, len(spool_files), plan.kept_for, tuple(counts), len(stats),
                             freed, plan.resumed, finished=False, error=error, folders_kept_for=plan.folders_kept_for)
        if dry_run or error:
            return result
        message = result.describe()
        age = (time.time() - plan.final_at) / DAY
        days = self.config.retention.done_days if plan.state is JobState.DONE else self.config.retention.failed_days
        message += f"; {plan.state} {age:.1f} days ago (retention.{plan.state}_days: {days:g})"
        if plan.resumed:
            started = datetime.fromtimestamp(plan.marker, timezone.utc).isoformat(timespec="seconds")
            message = f"finished the purge interrupted since {started}: {message}"
        if outside:
            message += f"; {len(outside)} instance file(s) outside {self.spool} left alone"
        finished = self.store.finish_purge(plan.job_id, plan.marker, message)
        return replace(result, finished=finished)

    def _delete(self, spool_files: list[Path], folders: list[Path]) -> str | None:
        """Unlink the files (already gone is fine), remove emptied spool folders and the job's folders; the
        first error, or None."""
        errors: list[str] = []
        for path in spool_files:
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                errors.append(f"{path}: {e.strerror}")
        for folder in {p.parent for p in spool_files}:  # series, then study folder, when empty
            for empty in (folder, folder.parent):
                if empty != self.spool and _inside(empty, self.spool):
                    try:
                        empty.rmdir()
                    except OSError:
                        break
        def failed(_function: object, path: str, exc_info: tuple) -> None:
            if not isinstance(exc_info[1], FileNotFoundError):
                errors.append(f"{path}: {exc_info[1]}")

        for folder in folders:
            shutil.rmtree(folder, onerror=failed)
        return errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "") if errors else None


def purge_data_dir(config: Config, dry_run: bool = False, now: float | None = None) -> PurgeReport:
    """``radnode purge``: one purge pass over ``config.data_dir`` (beside a running node is fine: the store
    serialises the two, and a job one of them is purging the other finishes or leaves)."""
    config = config.model_copy(update={"data_dir": config.data_dir.resolve()})
    target = store_target(config.data_dir, config.store.url)
    if isinstance(target, Path) and not target.exists():
        raise FileNotFoundError(f"no job store at {target} (data_dir {config.data_dir})")
    store = JobStore(target)
    try:
        return Retention(config, store).purge(now=now, dry_run=dry_run)
    finally:
        store.close()


def _inside(path: Path, root: Path) -> bool:
    return Path(os.path.normpath(path)).is_relative_to(root)


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except FileNotFoundError:
        return None


def _tree_stats(root: Path) -> list[os.stat_result]:
    """lstat of every file (not folder) under ``root``, links not followed."""
    stats = []
    for folder, _, names in os.walk(root):
        for name in names:
            if (s := _lstat(Path(folder, name))) is not None:
                stats.append(s)
    return stats


def _freed_bytes(stats: list[os.stat_result]) -> int:
    """Bytes freed by removing these files: a file's size counts when every link to it is among them."""
    links = Counter((s.st_dev, s.st_ino) for s in stats)
    sizes = {(s.st_dev, s.st_ino): (s.st_size, s.st_nlink) for s in stats}
    return sum(size for key, (size, nlink) in sizes.items() if links[key] >= nlink)


def _size(n: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} bytes"
