"""Drift's records: each study's input and output attributes, each attribute's latest figures, its alerts.

An observation is written when a pipeline's run ends well (the scheduler's ``_finish``); the node's drift
thread (``radnode/feedback/drift.py``) compares and calls :meth:`Drift.record_drift`, which keeps one open
alert per (pipeline, attribute) while the shift lasts and clears it when the attribute is back.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, delete, func, insert, select, update

from radnode.node.store.database import Database
from radnode.node.store.schema import drift_alerts, drift_observations, drift_states

if TYPE_CHECKING:
    from radnode.config import DriftConfig
    from radnode.feedback.drift import Observation, Shift, Value


@dataclass(frozen=True)
class DriftChange:
    """What one evaluation changed in a pipeline's alerts."""

    raised: list["Shift"]
    """The attributes that began drifting (an alert opened for each)."""
    cleared: list[str]
    """The attributes whose open alert closed: back under the threshold, or no longer compared."""


class Drift:
    """The store's side of drift monitoring."""

    _db: Database

    def record_observation(self, job_id: int, pipeline: str, inputs: Mapping[str, "Value"],
                           outputs: Mapping[str, "Value"]) -> None:
        """One study's attributes (once per job: a run recorded again replaces its row)."""
        with self._db.write() as conn:
            conn.execute(delete(drift_observations).where(drift_observations.c.job_id == job_id))
            conn.execute(insert(drift_observations).values(job_id=job_id, pipeline=pipeline, recorded_at=time.time(),
                                                           inputs=dict(inputs), outputs=dict(outputs)))

    def drift_heads(self) -> dict[str, tuple[int, int]]:
        """Per pipeline, (observations, newest job id): what tells the drift thread something changed."""
        with self._db.read() as conn:
            return {row.pipeline: (row.n, row.last) for row in conn.execute(
                select(drift_observations.c.pipeline, func.count().label("n"),
                       func.max(drift_observations.c.job_id).label("last")).group_by(drift_observations.c.pipeline))}

    def drift_observations(self, pipeline: str, settings: "DriftConfig") -> list["Observation"]:
        """The observations of one pipeline its comparison uses, in job order: the baseline's, and the last
        ``window`` after it (``radnode.feedback.drift.split`` picks them apart), so a long history is not read
        at each study."""
        from radnode.feedback.drift import Observation

        t = drift_observations
        mine = select(t).where(t.c.pipeline == pipeline)
        with self._db.read() as conn:
            if settings.baseline_to is not None:
                start = settings.baseline_from.timestamp() if settings.baseline_from else float("-inf")
                end = settings.baseline_to.timestamp()
                rows = list(conn.execute(mine.where(t.c.recorded_at >= start, t.c.recorded_at <= end)
                                         .order_by(t.c.job_id)))
                after = mine.where(t.c.recorded_at > end)
            else:
                rows = list(conn.execute(mine.order_by(t.c.job_id).limit(settings.baseline_studies)))
                after = mine.where(t.c.job_id > (rows[-1].job_id if rows else -1))
            rows += reversed(list(conn.execute(after.order_by(t.c.job_id.desc()).limit(settings.window))))
        return [Observation(r.job_id, r.pipeline, r.recorded_at, r.inputs or {}, r.outputs or {}) for r in rows]

    def record_drift(self, pipeline: str, baseline_n: int, window_n: int, shifts: Sequence["Shift"],
                     messages: Mapping[str, str]) -> "DriftChange":
        """Replace the pipeline's latest figures with ``shifts``; open an alert for each drifting attribute that
        has none open, raise an open one's peak, clear those no longer drifting (returned: what opened and
        what cleared)."""
        now, raised, cleared = time.time(), [], []
        with self._db.write() as conn:
            conn.execute(delete(drift_states).where(drift_states.c.pipeline == pipeline))
            if shifts:
                conn.execute(insert(drift_states), [
                    {"pipeline": pipeline, "attribute": s.attribute, "kind": s.kind, "psi": s.psi,
                     "p_value": s.p_value, "drifting": s.drifting, "baseline_n": s.baseline_n, "window_n": s.window_n,
                     "baseline": s.baseline, "window": s.window, "evaluated_at": now} for s in shifts])
            open_alerts = {row.attribute: row for row in conn.execute(select(drift_alerts).where(and_(
                drift_alerts.c.pipeline == pipeline, drift_alerts.c.cleared_at.is_(None))))}
            drifting = {s.attribute: s for s in shifts if s.drifting}
            for attribute, row in open_alerts.items():
                if attribute in drifting:
                    conn.execute(update(drift_alerts).where(drift_alerts.c.id == row.id)
                                 .values(peak_psi=max(row.peak_psi, drifting[attribute].psi)))
                else:  # back under the threshold, or no longer compared (the window was emptied)
                    conn.execute(update(drift_alerts).where(drift_alerts.c.id == row.id).values(cleared_at=now))
                    cleared.append(attribute)
            for attribute, shift in drifting.items():
                if attribute not in open_alerts:
                    conn.execute(insert(drift_alerts).values(
                        pipeline=pipeline, attribute=attribute, kind=shift.kind, psi=shift.psi, peak_psi=shift.psi,
                        p_value=shift.p_value, message=messages[attribute], raised_at=now))
                    raised.append(shift)
        return DriftChange(raised, cleared)

    def drift_document(self, pipeline: str | None = None) -> list[dict[str, Any]]:
        """Per pipeline: how many studies are recorded, each attribute's latest figures and every alert (what
        ``GET /api/drift`` answers and ``/metrics`` exports)."""
        where = [] if pipeline is None else [drift_observations.c.pipeline == pipeline]
        with self._db.read() as conn:
            counts = {r.pipeline: r.n for r in conn.execute(
                select(drift_observations.c.pipeline, func.count().label("n")).where(*where)
                .group_by(drift_observations.c.pipeline))}
            states = conn.execute(select(drift_states).order_by(drift_states.c.pipeline, drift_states.c.kind,
                                                                drift_states.c.attribute)).mappings().all()
            alerts = conn.execute(select(drift_alerts).order_by(drift_alerts.c.id)).mappings().all()
        names = sorted(set(counts) | ({s["pipeline"] for s in states} if pipeline is None else set(counts)))
        return [{"pipeline": name, "studies": counts.get(name, 0),
                 "attributes": [{k: v for k, v in dict(s).items() if k not in ("pipeline",)}
                                for s in states if s["pipeline"] == name],
                 "alerts": [{k: v for k, v in dict(a).items() if k != "pipeline"}
                            for a in alerts if a["pipeline"] == name]} for name in names]
