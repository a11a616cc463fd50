"""Prometheus ``/metrics`` (prometheus_client): read from the job store at each scrape, so the figures match
the store exactly, survive restarts and agree between several node processes sharing one store.

=========================================== ======= ==========================================================
``radnode_instances_received_total``         counter instances indexed, by ``calling_ae``
``radnode_studies_received_total``           counter studies (a study's main job), by ``calling_ae``
``radnode_associations_rejected_total``      counter associations refused at A-ASSOCIATE, by ``reason``
``radnode_tls_handshake_failures_total``     counter DICOM TLS handshakes refused or failed
``radnode_jobs``                             gauge   jobs by ``state`` and ``pipeline``
``radnode_queue_depth``                      gauge   jobs queued, waiting for a worker
``radnode_queue_paused``                     gauge   1 while an operator paused the queue
``radnode_job_duration_seconds``             histo.  first instance to done, by ``pipeline`` (done jobs)
``radnode_job_phase_duration_seconds``       histo.  by ``pipeline`` and ``phase``: wait (study assembly), queue,
                                                     run, delivery
``radnode_trigger_latency_seconds``          histo.  last instance to queued, by ``pipeline``
``radnode_deliveries_total``                 counter settled deliveries by ``destination`` and ``outcome``
``radnode_deliveries_pending``               gauge   deliveries still to make, by ``destination``
``radnode_delivery_retries_total``           counter attempts past the first, by ``destination``
``radnode_job_retries_total``                counter runs past the first, by ``pipeline``
``radnode_jobs_flagged_for_review``          gauge   jobs flagged for human review, by ``pipeline``
``radnode_spool_free_bytes``                 gauge   free space on the spool's file system
``radnode_http_requests_refused_total``      counter refused web requests, by ``reason``
``radnode_studies_feedback``                 gauge   by ``pipeline`` and ``outcome``: processed, reviewed,
                                                     accepted_unchanged, corrected, rejected
``radnode_correction_dice``                  gauge   by ``pipeline``, ``segment`` and ``statistic`` (median,
                                                     worst_decile): Dice to clinicians' corrections
``radnode_correction_hd95_mm``               gauge   median HD95 to the corrections, by ``pipeline``, ``segment``
``radnode_uncertainty_spearman``             gauge   Spearman(score, 1 − Dice), by ``pipeline`` and ``score``
``radnode_review_flag_auroc``                gauge   AUROC of the review flag for "needed a correction"
``radnode_drift_psi``                        gauge   latest PSI of the window against the baseline, by
                                                     ``pipeline``, ``attribute`` and ``kind`` (input, output)
``radnode_drift_alerts_total``               counter drift alerts raised (one per episode), by ``pipeline``,
                                                     ``attribute``
``radnode_drift_alert_active``               gauge   1 while an attribute's drift alert is open
``radnode_shadow_studies_compared``          gauge   shadow runs compared, by ``production`` and ``candidate``
``radnode_shadow_dice``                      gauge   by ``production``, ``candidate``, ``segment`` and ``statistic``
                                                     (median, worst_decile): Dice of a candidate's segments to
                                                     production's
``radnode_shadow_time_ratio``                gauge   candidate over production time (median), by ``production``,
                                                     ``candidate`` and ``clock`` (wall, cpu)
=========================================== ======= ==========================================================

The feedback figures are ``radnode.feedback.performance``'s, the same ``radnode performance`` prints; the drift
figures the store's (``JobStore.drift_document``), the same ``GET /api/drift`` and ``radnode drift`` show; the
shadow figures ``radnode.feedback.shadow.summarise``'s, the same ``radnode performance --compare`` prints.

Histograms are built from the event log of final jobs; each job is read once and kept as bucket counts.
"""

from __future__ import annotations

import bisect
import shutil
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from radnode.feedback.performance import PipelinePerformance
from radnode.feedback.shadow import ShadowSummary

DURATION_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
"""Seconds: a study's run takes seconds to tens of minutes; delivery waits may reach hours in an outage."""
LATENCY_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900)

PHASES = ("wait", "queue", "run", "delivery")


class MetricsSource(Protocol):
    """What the collector reads: rows of one of :data:`QUERIES` or :data:`TIMINGS` (the node's job store)."""

    def metric_rows(self, query: str, params: dict[str, object] | None = None) -> list[tuple]: ...


@dataclass(frozen=True)
class JobTiming:
    """A final job's milestones (epoch seconds; None where the job never got there)."""

    job_id: int
    pipeline: str
    state: str
    updated_at: float
    created_at: float
    last_instance_at: float
    queued_at: float | None
    running_at: float | None
    finished_at: float | None
    done_at: float | None


@dataclass
class _Histogram:
    buckets: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        running, out = 0, []
        for bound, count in zip([*map(str, self.buckets), "+Inf"], self.counts or [0] * (len(self.buckets) + 1)):
            running += count
            out.append((bound, running))
        return out


QUERIES = {
    "instances": "SELECT calling_ae, COUNT(*) FROM instances GROUP BY calling_ae",
    "studies": "SELECT calling_ae, COUNT(*) FROM jobs WHERE sibling_of IS NULL GROUP BY calling_ae",
    "jobs": "SELECT state, pipeline, COUNT(*) FROM jobs GROUP BY state, pipeline",
    "flagged": "SELECT pipeline, COUNT(*) FROM jobs WHERE needs_review IS TRUE GROUP BY pipeline",
    "job_retries": "SELECT pipeline, SUM(CASE WHEN runs > 1 THEN runs - 1 ELSE 0 END) FROM jobs GROUP BY pipeline",
    "deliveries": "SELECT destination, state, COUNT(*), SUM(CASE WHEN attempts > 1 THEN attempts - 1 ELSE 0 END) "
                  "FROM deliveries GROUP BY destination, state",
}
"""Plain SQL that SQLite and PostgreSQL both run (the store's own tables, read only)."""

TIMINGS = (
    "SELECT j.id, j.pipeline, j.state, j.updated_at, j.created_at, j.last_instance_at, "
    + ", ".join(f"(SELECT {agg}(e.at) FROM events e WHERE e.job_id = j.id AND e.kind = '{kind}')"
                for agg, kind in (("MIN", "queued"), ("MAX", "running"), ("MAX", "finished"), ("MAX", "done")))
    + " FROM jobs j WHERE j.state IN ('done', 'failed') AND j.updated_at >= :after"
)
"""Milestones of the jobs final since ``:after`` (a :class:`JobTiming` per row)."""


class NodeCollector(Collector):
    """The node's metrics, computed at scrape time (see the module docstring)."""

    def __init__(self, source: MetricsSource, spool: Path, rejected: Callable[[], dict[str, int]] = dict,
                 tls_failures: Callable[[], int] = lambda: 0, paused: Callable[[], bool] = lambda: False,
                 performance: Callable[[], list[PipelinePerformance]] = list,
                 drift: Callable[[], list[dict]] = list,
                 shadow: Callable[[], list[ShadowSummary]] = list) -> None:
        self.source = source
        self.performance = performance
        self.drift = drift
        self.shadow = shadow
        self.spool = spool
        self.rejected = rejected
        self.tls_failures = tls_failures
        self.paused = paused
        self.refused: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._seen: set[int] = set()
        self._watermark = 0.0
        self._durations: dict[str, _Histogram] = defaultdict(lambda: _Histogram(DURATION_BUCKETS))
        self._phases: dict[tuple[str, str], _Histogram] = defaultdict(lambda: _Histogram(DURATION_BUCKETS))
        self._latency: dict[str, _Histogram] = defaultdict(lambda: _Histogram(LATENCY_BUCKETS))

    def count_refused(self, reason: str) -> None:
        with self._lock:
            self.refused[reason] += 1

    def collect(self) -> Iterator[Metric]:
        rows = {name: self.source.metric_rows(sql, {}) for name, sql in QUERIES.items()}
        yield _counter("radnode_instances_received", "Instances received and indexed", ["calling_ae"],
                       [((ae,), n) for ae, n in rows["instances"]])
        yield _counter("radnode_studies_received", "Studies received (one main job each)", ["calling_ae"],
                       [((ae,), n) for ae, n in rows["studies"]])
        yield _counter("radnode_associations_rejected", "Associations refused at A-ASSOCIATE", ["reason"],
                       [((reason,), n) for reason, n in self.rejected().items()])
        yield CounterMetricFamily("radnode_tls_handshake_failures", "DICOM TLS handshakes refused or failed",
                                  value=self.tls_failures())
        yield _gauge("radnode_jobs", "Jobs by state and pipeline", ["state", "pipeline"],
                     [((state, pipeline), n) for state, pipeline, n in rows["jobs"]])
        queued = sum(n for state, _, n in rows["jobs"] if state == "queued")
        yield GaugeMetricFamily("radnode_queue_depth", "Jobs queued, waiting for a worker", value=queued)
        yield GaugeMetricFamily("radnode_queue_paused", "1 while the queue is paused by an operator",
                                value=1 if self.paused() else 0)
        yield _gauge("radnode_jobs_flagged_for_review", "Jobs flagged for human review", ["pipeline"],
                     [((pipeline,), n) for pipeline, n in rows["flagged"]])
        yield _counter("radnode_job_retries", "Job runs past the first", ["pipeline"],
                       [((pipeline,), n or 0) for pipeline, n in rows["job_retries"]])
        settled = [r for r in rows["deliveries"] if r[1] != "pending"]
        yield _counter("radnode_deliveries", "Settled deliveries by destination and outcome",
                       ["destination", "outcome"],
                       [((dest, "delivered" if state == "done" else state), n) for dest, state, n, _ in settled])
        yield _gauge("radnode_deliveries_pending", "Deliveries still to make", ["destination"],
                     [((dest,), n) for dest, state, n, _ in rows["deliveries"] if state == "pending"])
        retries: Counter[str] = Counter()
        for dest, _, _, extra in rows["deliveries"]:
            retries[dest] += extra or 0
        yield _counter("radnode_delivery_retries", "Delivery attempts past the first", ["destination"],
                       [((dest,), n) for dest, n in retries.items()])
        try:
            free = shutil.disk_usage(self.spool).free
        except OSError:
            free = 0
        yield GaugeMetricFamily("radnode_spool_free_bytes", "Free space on the spool's file system", value=free)
        with self._lock:
            refused = dict(self.refused)
        yield _counter("radnode_http_requests_refused", "Web requests refused", ["reason"],
                       [((reason,), n) for reason, n in refused.items()])
        yield from self._histograms()
        yield from self._feedback(self.performance())
        yield from self._drift(self.drift())
        yield from self._shadow(self.shadow())

    @staticmethod
    def _drift(pipelines: list[dict]) -> Iterator[Metric]:
        yield _gauge("radnode_drift_psi", "Population stability index of the latest window against the baseline",
                     ["pipeline", "attribute", "kind"], [((p["pipeline"], a["attribute"], a["kind"]), a["psi"])
                                                         for p in pipelines for a in p["attributes"]])
        raised: Counter[tuple[str, str]] = Counter((p["pipeline"], a["attribute"]) for p in pipelines
                                                   for a in p["alerts"])
        yield _counter("radnode_drift_alerts", "Drift alerts raised, one per episode", ["pipeline", "attribute"],
                       list(raised.items()))
        yield _gauge("radnode_drift_alert_active", "1 while a drift alert is open", ["pipeline", "attribute"],
                     [(key, 1 if any(a["cleared_at"] is None and (p["pipeline"], a["attribute"]) == key
                                     for p in pipelines for a in p["alerts"]) else 0) for key in raised])

    @staticmethod
    def _shadow(summaries: list[ShadowSummary]) -> Iterator[Metric]:
        yield _gauge("radnode_shadow_studies_compared", "Studies a candidate pipeline's shadow run was compared on",
                     ["production", "candidate"], [((s.production, s.candidate), s.studies_compared)
                                                   for s in summaries])
        yield _gauge("radnode_shadow_dice", "Dice of a candidate pipeline's segments to the production pipeline's",
                     ["production", "candidate", "segment", "statistic"],
                     [((s.production, s.candidate, g.segment, stat), getattr(g, f"{stat}_dice")) for s in summaries
                      for g in s.segments for stat in ("median", "worst_decile")])
        yield _gauge("radnode_shadow_time_ratio", "A candidate pipeline's run time over the production pipeline's "
                     "(median over the studies compared)", ["production", "candidate", "clock"],
                     [((s.production, s.candidate, clock), value) for s in summaries
                      for clock, value in (("wall", s.wall_time_ratio), ("cpu", s.cpu_time_ratio)) if value is not None])

    @staticmethod
    def _feedback(performance: list[PipelinePerformance]) -> Iterator[Metric]:
        outcomes = ("processed", "reviewed", "accepted_unchanged", "corrected", "rejected")
        yield _gauge("radnode_studies_feedback", "Studies processed and what reviewers did with them",
                     ["pipeline", "outcome"], [((p.pipeline, o), getattr(p, o)) for p in performance for o in outcomes])
        yield _gauge("radnode_correction_dice", "Dice of the node's segments to clinicians' corrections",
                     ["pipeline", "segment", "statistic"],
                     [((p.pipeline, s.segment, stat), getattr(s, f"{stat}_dice")) for p in performance
                      for s in p.segments for stat in ("median", "worst_decile")])
        yield _gauge("radnode_correction_hd95_mm", "Median 95th-percentile surface distance to the corrections",
                     ["pipeline", "segment"], [((p.pipeline, s.segment), s.median_hd95_mm) for p in performance
                                               for s in p.segments if s.median_hd95_mm is not None])
        yield _gauge("radnode_uncertainty_spearman", "Spearman's rho between an uncertainty score and 1 - Dice",
                     ["pipeline", "score"], [((p.pipeline, code), rho) for p in performance
                                             for code, rho in p.spearman.items() if rho is not None])
        yield _gauge("radnode_review_flag_auroc", "AUROC of the review flag for 'needed a correction'", ["pipeline"],
                     [((p.pipeline,), p.review_flag_auroc) for p in performance if p.review_flag_auroc is not None])

    def _histograms(self) -> Iterator[Metric]:
        with self._lock:
            for row in self.source.metric_rows(TIMINGS, {"after": self._watermark}):
                timing = JobTiming(*row)
                if timing.job_id in self._seen:
                    continue
                self._seen.add(timing.job_id)
                self._watermark = max(self._watermark, timing.updated_at - 60)  # late commits of a busy store
                self._observe(timing)
            families = [
                _histogram("radnode_job_duration_seconds", "First instance to done, per pipeline", ["pipeline"],
                           [((p,), h) for p, h in self._durations.items()]),
                _histogram("radnode_job_phase_duration_seconds", "Time in each phase of a job, per pipeline",
                           ["pipeline", "phase"], [(key, h) for key, h in self._phases.items()]),
                _histogram("radnode_trigger_latency_seconds", "Last instance received to job queued, per pipeline",
                           ["pipeline"], [((p,), h) for p, h in self._latency.items()]),
            ]
        yield from families

    def _observe(self, t: JobTiming) -> None:
        if t.queued_at is not None:
            self._latency[t.pipeline].observe(max(0.0, t.queued_at - t.last_instance_at))
        marks = [t.created_at, t.queued_at, t.running_at, t.finished_at, t.done_at]
        for phase, start, end in zip(PHASES, marks, marks[1:]):
            if start is not None and end is not None:
                self._phases[(t.pipeline, phase)].observe(max(0.0, end - start))
        if t.state == "done" and t.done_at is not None:
            self._durations[t.pipeline].observe(max(0.0, t.done_at - t.created_at))


def _counter(name: str, documentation: str, labels: list[str], samples: Iterable[tuple[tuple, float]]) -> Metric:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for values, n in samples:
        family.add_metric([str(v) for v in values], n)
    return family


def _gauge(name: str, documentation: str, labels: list[str], samples: Iterable[tuple[tuple, float]]) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for values, n in samples:
        family.add_metric([str(v) for v in values], n)
    return family


def _histogram(name: str, documentation: str, labels: list[str],
               samples: Iterable[tuple[tuple, _Histogram]]) -> Metric:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for values, h in samples:
        family.add_metric([str(v) for v in values], h.cumulative(), h.total)
    return family


def node_registry(collector: NodeCollector) -> CollectorRegistry:
    """A registry holding only the node's collector (no process metrics of the test runner's Python)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
