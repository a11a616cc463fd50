"""When is a study complete? The policy, as pure functions of what the job store recorded.

DICOM has no "end of study" message, so the node combines three signals per series, fastest first:

1. **Expected count** — the modality said how many instances the series has (Images in Acquisition;
   Number of Slices × Number of Time Slices for PET/NM; an enhanced multi-frame object with Number of
   Frames is a whole series in one instance) and that many arrived.
2. **Release** — every association that delivered to the series has been released (direct SCP), or
   Orthanc reported the study stable, and no more instances came within ``series_grace`` seconds.
3. **Idle** — the fallback timer: nothing arrived for ``idle`` seconds.

A study is complete when all its series are, and a study-level grace has passed since its last
instance: the route's ``study_idle_seconds`` when a rule sets it (senders that pause between series in
separate associations need it), else ``study_grace`` while an association is still open (a series that
reached its count may be followed by another one in the same association), else none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from radnode.pipelines.routing import SeriesDecision

COMPLETENESS_TAGS = ["ImagesInAcquisition", "NumberOfSlices", "NumberOfTimeSlices", "NumberOfFrames"]
"""Tags read at ingest for the expected instance count of a series."""


@dataclass(frozen=True)
class CompletenessSettings:
    """The node's defaults (``ingress.*``); a route's completeness settings override them per study."""

    idle_seconds: float = 3.0
    series_grace_seconds: float = 0.5
    study_grace_seconds: float = 1.0


@dataclass(frozen=True)
class SeriesProgress:
    """One series of a receiving study as the job store knows it: its routing decision (its completeness
    settings override the node's) and what arrived of it."""

    series_instance_uid: str
    decision: SeriesDecision
    received: int
    expected: int | None
    last_instance_at: float
    released_at: float | None
    """When the association that last delivered to it was released; None while it is open."""
    stable_at: float | None
    """When Orthanc reported its study stable (no release is visible through Orthanc)."""


@dataclass(frozen=True)
class Verdict:
    """Whether a study is complete now and, in words, why (or what it waits for)."""

    complete: bool
    reason: str


def expected_instances(attributes: Mapping[str, Any] | Any) -> int | None:
    """The number of instances a series will have, from the first instance's attributes; None if unknown."""
    def number(keyword: str) -> int | None:
        value = attributes.get(keyword)
        try:
            n = int(value) if value not in (None, "") else None
        except (TypeError, ValueError):
            return None
        return n if n and n > 0 else None

    if (images := number("ImagesInAcquisition")) is not None:
        return images
    if (slices := number("NumberOfSlices")) is not None:
        return slices * (number("NumberOfTimeSlices") or 1)
    frames = number("NumberOfFrames")
    if frames is not None and frames > 1:
        return 1
    return None


def series_complete_at(series: SeriesProgress, settings: CompletenessSettings) -> tuple[float, str]:
    """The earliest time the series counts as complete, and which signal says so."""
    if series.expected is not None and series.received >= series.expected:
        return series.last_instance_at, f"{series.received}/{series.expected} expected instances"
    candidates = [(series.last_instance_at + settings.idle_seconds, f"idle {settings.idle_seconds:g} s")]
    if series.stable_at is not None:
        candidates.append((series.stable_at, "study stable in Orthanc"))
    if series.released_at is not None:
        route_grace = series.decision.completeness.series_grace_seconds
        grace = route_grace if route_grace is not None else settings.series_grace_seconds
        at = max(series.released_at, series.last_instance_at) + grace
        candidates.append((at, f"association released + {grace:g} s"))
    return min(candidates)


def study_verdict(series: Sequence[SeriesProgress], now: float, settings: CompletenessSettings) -> Verdict:
    """Whether the study made of ``series`` is complete at ``now``."""
    if not series:
        return Verdict(False, "no series yet")
    last = max(s.last_instance_at for s in series)
    reasons = []
    for s in series:
        at, why = series_complete_at(s, settings)
        if now < at:
            return Verdict(False, f"series {s.series_instance_uid} incomplete ({s.received} instances)")
        reasons.append(why)
    route_waits = [s.decision.completeness.study_idle_seconds for s in series
                   if s.decision.completeness.study_idle_seconds is not None]
    if route_waits:
        grace, source = max(route_waits), "route study_idle_seconds"
    elif any(s.released_at is None and s.stable_at is None for s in series):
        grace, source = settings.study_grace_seconds, "study grace (association open)"
    else:
        grace, source = 0.0, ""
    if now < last + grace:
        return Verdict(False, f"waiting {grace:g} s after the last instance ({source})")
    signals = ", ".join(sorted(set(reasons)))
    return Verdict(True, signals + (f"; {source} {grace:g} s" if grace else ""))
