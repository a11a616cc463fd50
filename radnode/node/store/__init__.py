"""The node's durable job store: instances, series decisions, jobs, their event log and deliveries.

The spool on disk is the source of truth for received data; this store is its index plus the state of
every job, in SQLite under ``data_dir`` (the default) or PostgreSQL (``store.url``), on SQLAlchemy Core
with Alembic revisions (``database.py``). :class:`JobStore` is the one facade the node uses; each area
lives in its own module:

============== ===========================================================================================
``schema``     the tables, one section per area (a new area adds its table there and one revision)
``records``    the records the node sees (``Job``, ``Instance``, ``Delivery``, …), rows mapped by column name
``policy``     pure functions: late instances, a study with nothing to do, what a purge keeps
``ingest``     arrivals: instances under their study's job, each series' routing decision, once; refusals
``jobs``       scheduling: queueing with the study's route, siblings, runs, restarts, failure
``deliveries`` egress: per-destination queues of deliveries, retries, re-sends, settling a job
``results``    result versions per study and pipeline: which job's results supersede which
``retention``  the purge's records
``cluster``    the distributed engine: broker outbox, claims with fencing, leases, reaper, workers
``queries``    the job list, one job, counts
``identity``   patient identifiers sealed at rest under the site key, opened on reading
``console``    the web console's people, tokens and sessions, operators' actions, settings, study details
``feedback``   clinicians' corrections of the node's segmentations, recorded at arrival, settled once
``drift``      each study's input and output attributes, their comparison with the baseline, one alert per episode
``shadow``     shadow runs: candidate pipelines' jobs, never delivered, and their comparison with production
============== ===========================================================================================

Job states: ``received → queued → running → delivering → done / failed``. When the rules select several
pipelines for a study, its job (the *main* job) runs the first and, when it is queued, starts one *sibling*
job per other pipeline (``sibling_of`` = the main job) on the main job's input; only the main job forwards.
A rule's ``shadow`` pipelines get a *shadow* job each (a sibling with ``shadow`` set): run after the main job,
never delivered, compared with it (``shadow``).
Late instances are recorded under the main job; when they send it back to wait for its study (``rerun``), its
siblings wait too (none starts on an incomplete study), a running one is stopped and one already run is run
again, its results superseded. A study whose every series is skipped (discarded by the rules,
or results of the node's own) is ``done`` at once with ``reason`` ``not processed: …``; the node's own
results arriving after their study's job started are recorded with it (``own-result`` event), never
processed, whatever the late-instance policy.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from radnode.node.store.cluster import Claim, Cluster, Publication
from radnode.node.store.console import Console, StudyDetails
from radnode.node.store.database import SQLITE_FILE, Database, StoreError, head_revision, open_database
from radnode.node.store.deliveries import Deliveries
from radnode.node.store.events import EventLog
from radnode.node.store.identity import Identities
from radnode.node.store.drift import Drift
from radnode.node.store.feedback import Feedback
from radnode.node.store.ingest import Arrivals, Decide
from radnode.node.store.jobs import Scheduling
from radnode.node.store.queries import Queries
from radnode.node.store.records import (
    CANCELLED_BY, FINAL_STATES, ActionRefused, Arrival, Attempt, Correction, CorrectionState, Delivery, Event,
    ForeignInstance, Instance, InstanceBeingPurged, InstanceFileGone, Job, JobState, PurgePlan, ReissuePlan,
    ResultsOutOfDate, ShadowComparison, ShadowNotDelivered, WorkerInfo,
)
from radnode.node.store.results import Results, Supersession
from radnode.node.store.retention import Purges
from radnode.node.store.shadow import Shadows

if TYPE_CHECKING:
    from radnode.node.store.identity import Seal

__all__ = ["CANCELLED_BY", "FINAL_STATES", "SQLITE_FILE", "ActionRefused", "Arrival", "Attempt", "Claim", "Correction",
           "CorrectionState", "Decide", "Delivery", "Event", "ForeignInstance", "Instance", "InstanceBeingPurged",
           "InstanceFileGone", "Job", "JobState", "JobStore", "Publication", "PurgePlan", "ReissuePlan",
           "ResultsOutOfDate", "ShadowComparison", "ShadowNotDelivered", "StoreError", "StudyDetails", "Supersession",
           "WorkerInfo",
           "head_revision", "store_target", "upgrade_store"]


class JobStore(Arrivals, Scheduling, Deliveries, Results, Purges, Queries, EventLog, Identities, Console, Feedback,
               Drift, Cluster, Shadows):
    """Thread- and process-safe access to the node's job store (see the module docstring for its areas).

    ``target``: a SQLite file (``data_dir/radnode.db``) or a ``postgresql://`` URL. ``upgrade``: migrate an
    older schema on open (default: SQLite yes, PostgreSQL no: ``radnode store upgrade`` does it). ``seal``:
    patient identifiers are kept sealed with it and opened on reading (the node passes its site key's,
    :class:`radnode.security.privacy.IdentitySeal`); without one they are kept and returned as they are. Raises
    :class:`StoreError` with one line when the store is unreachable or at a schema this release cannot use.
    """

    def __init__(self, target: Path | str, upgrade: bool | None = None, seal: "Seal | None" = None) -> None:
        self._db: Database = open_database(target, upgrade)
        self._db.seal = seal

    @property
    def label(self) -> str:
        """The store as messages name it (URL without password, or the SQLite file)."""
        return self._db.label

    @property
    def opened(self) -> str:
        """What opening did to the store (created, upgraded, found current), in words."""
        return self._db.opened

    def close(self) -> None:
        """Close the store's connections; it cannot be used afterwards."""
        self._db.close()


def store_target(data_dir: Path, url: str | None) -> Path | str:
    """Where a node's job store is: ``url`` when set (PostgreSQL), else ``data_dir/radnode.db``."""
    return url if url else data_dir / SQLITE_FILE


def upgrade_store(target: Path | str) -> str:
    """``radnode store upgrade``: bring the store to this release's schema; what was done, in words."""
    database = open_database(target, upgrade=True)
    database.close()
    return database.opened
