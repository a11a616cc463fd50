"""When is a study complete? The policy, as pure functions of what the job store recorded.

DICOM has no "end of study" message, so the node combines three signals per series, fastest first:

1. **Expected count** — the sender said how many instances the series has (Number of Series Related
   Instances, Images in Acquisition; Number of Slices × Number of Time Slices for PET/NM) and that many
   arrived. Number of Frames says nothing about the series: an enhanced CT or MR series may be several
   multi-frame instances (stacks, dimensions split by the scanner), so such a series completes by release
   or idle like any series whose count is not declared.
2. **Release** — every association that delivered to the series has been released (direct SCP), or
   Orthanc reported the study stable, and no more instances came within ``series_grace`` seconds.
3. **Idle** — the fallback timer: nothing arrived for ``idle`` seconds.

A study is complete when all its series are, and a study-level wait has passed since its last
instance: the route's ``study_idle_seconds`` when a rule sets it, else ``study_grace`` while an association is
still open (a series that reached its count may be followed by another one in the same association), else
the **quiet time** after release (``study_quiet_seconds``, per sending AE in ``ingress.peers``): a sender
that sends a study in batches, or re-sends after a restart, pauses between associations. When the sender
said how many instances the whole study has (Number of Study Related Instances), the study is complete as
soon as that many arrived, and not before ``missing_wait_seconds`` of silence while fewer did.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from radnode.pipelines.routing import SeriesDecision

COMPLETENESS_TAGS = ["NumberOfSeriesRelatedInstances", "NumberOfStudyRelatedInstances", "ImagesInAcquisition",
                     "NumberOfSlices", "NumberOfTimeSlices"]
"""Tags read at ingest for the expected instance counts of a series and of its study."""


@dataclass(frozen=True)
class CompletenessSettings:
    """The node's defaults (``ingress.*``); a route's completeness settings override them per study."""

    idle_seconds: float = 3.0
    series_grace_seconds: float = 0.5
    study_grace_seconds: float = 1.0
    study_quiet_seconds: float = 0.5
    """The wait after the study's associations were all released."""
    missing_wait_seconds: float = 60.0
    """How long a study short of its declared Number of Study Related Instances waits in silence."""
    peers: Mapping[str, "PeerCompleteness"] = field(default_factory=dict)
    """Per calling AE title: its own waits."""

    def for_sender(self, calling_ae: str) -> "CompletenessSettings":
        """These settings with the sending AE's own waits (``ingress.peers``) where it has them."""
        peer = self.peers.get(calling_ae.strip())
        if peer is None:
            return self
        return replace(self, idle_seconds=peer.idle_seconds if peer.idle_seconds is not None else self.idle_seconds,
                       study_quiet_seconds=(peer.study_quiet_seconds if peer.study_quiet_seconds is not None
                                            else self.study_quiet_seconds))


@dataclass(frozen=True)
class PeerCompleteness:
    """One sending AE's completeness waits (None: the node's)."""

    idle_seconds: float | None = None
    study_quiet_seconds: float | None = None


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
    calling_ae: str = ""
    """The AE that sent the study (its ``ingress.peers`` settings apply)."""
    study_expected: int | None = None
    """The study's Number of Study Related Instances, when the sender gave it."""


@dataclass(frozen=True)
class Verdict:
    """Whether a study is complete now and, in words, why (or what it waits for)."""

    complete: bool
    reason: str


def expected_instances(attributes: Mapping[str, Any] | Any) -> int | None:
    """The number of instances a series will have, from the first instance's attributes; None if unknown."""
    number = _counter(attributes)
    if (related := number("NumberOfSeriesRelatedInstances")) is not None:
        return related
    if (images := number("ImagesInAcquisition")) is not None:
        return images
    if (slices := number("NumberOfSlices")) is not None:
        return slices * (number("NumberOfTimeSlices") or 1)
    return None


def study_expected_instances(attributes: Mapping[str, Any] | Any) -> int | None:
    """The number of instances the whole study will have (Number of Study Related Instances); None if unknown."""
    return _counter(attributes)("NumberOfStudyRelatedInstances")


def _counter(attributes: Mapping[str, Any] | Any) -> Callable[[str], int | None]:
    def number(keyword: str) -> int | None:
        value = attributes.get(keyword)
        try:
            n = int(value) if value not in (None, "") else None
        except (TypeError, ValueError):
            return None
        return n if n and n > 0 else None
    return number


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
    settings = settings.for_sender(series[0].calling_ae)
    last = max(s.last_instance_at for s in series)
    received = sum(s.received for s in series)
    declared = next((s.study_expected for s in series if s.study_expected is not None), None)
    if declared is not None:
        if received >= declared:
            return Verdict(True, f"{received}/{declared} instances of the study (Number of Study Related Instances)")
        if now < last + settings.missing_wait_seconds:
            return Verdict(False, f"{received}/{declared} instances of the study arrived")
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
        grace, source = settings.study_quiet_seconds, "quiet time after release"
        last = max([last, *(s.released_at for s in series if s.released_at is not None)])
    if now < last + grace:
        return Verdict(False, f"waiting {grace:g} s after the last instance ({source})")
    signals = ", ".join(sorted(set(reasons)))
    return Verdict(True, signals + (f"; {source} {grace:g} s" if grace else ""))
