"""The routing vocabulary (series decisions and their merge into a study's route), the node's recognition of
its own results, and a series routed once whatever number of instances and duplicates arrive."""

from __future__ import annotations

from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from factories import phantom_result, write_chest_phantom
from radnode.imaging.series import VolumeCriteria, load_volume
from radnode.node.scp import Ingest, Origin, Router, Spool, index_tags
from radnode.node.store import Arrival, JobState, JobStore
from radnode.outputs.algorithm import AlgorithmInfo
from radnode.phantom import make_ct_phantom, write_ct_series
from radnode.outputs.provenance import own_result
from radnode.outputs.seg import build_segmentation
from radnode.outputs.sr import build_measurement_report
from radnode.pipelines.routing import (
    Completeness, Execution, ExecutionMode, LateInstances, Priority, Provenance, RoutingContext, SeriesDecision,
    merge_decisions, study_route,
)
from radnode.pipelines.rules import DEFAULT_RULES, RuleSet, load_rules

UID_ROOT = "1.2.826.0.1.3680043.8.498."


# --- the vocabulary --------------------------------------------------------------------------------


def test_a_studys_route_merges_its_series_decisions_per_pipeline() -> None:
    ct = SeriesDecision(("ct_tissue", "lung"), forwards=("ARCHIVE",), priority=Priority.OFF_PEAK,
                        execution=Execution(ExecutionMode.SUBPROCESS, 60), matched_rules=("ct",))
    chest = SeriesDecision(("lung", "nodules"), forwards=("ARCHIVE", "RESEARCH"), priority=Priority.STAT,
                           execution=Execution(None, 300), matched_rules=("chest",))
    scout = SeriesDecision(discard=True, matched_rules=("scouts",))
    seg = SeriesDecision(provenance=Provenance.OWN_RESULT, note="the SEG is a result of radnode")
    route = study_route([ct, chest, scout, seg, SeriesDecision()])
    assert route.pipelines == ("ct_tissue", "lung", "nodules") and route.main_pipeline == "ct_tissue"
    assert route.sibling_pipelines == ("lung", "nodules") and route.forwards == ("ARCHIVE", "RESEARCH")
    assert route.priority is Priority.STAT
    assert route.execution("ct_tissue") == Execution(ExecutionMode.SUBPROCESS, 60)
    assert route.execution("lung") == Execution(ExecutionMode.SUBPROCESS, 300)
    assert route.execution("nodules") == Execution(None, 300)
    assert route.skipped == ("discard (rules: scouts)", "no rule matched: nothing to do",
                             "the SEG is a result of radnode")
    nothing = study_route([scout, seg])
    assert nothing.nothing_to_do and nothing.main_pipeline == "" and nothing.priority is Priority.ROUTINE
    assert study_route([replace(ct, priority=Priority.OFF_PEAK)]).priority is Priority.OFF_PEAK


def test_matching_rules_merge_field_by_field_and_a_discard_wins() -> None:
    research = SeriesDecision(("ct_tissue",), priority=Priority.OFF_PEAK, matched_rules=("research",),
                              completeness=Completeness(study_idle_seconds=5))
    slow = SeriesDecision(completeness=Completeness(10, 1, LateInstances.RERUN), matched_rules=("slow",))
    assert merge_decisions([research]).priority is Priority.OFF_PEAK  # not raised by the empty decision
    merged = merge_decisions([research, slow])
    assert merged.priority is Priority.ROUTINE  # every matching rule has a priority (routine unless given)
    assert merged.completeness == Completeness(10, 1, LateInstances.RERUN)
    assert merged.matched_rules == ("research", "slow") and merged.late_instances is LateInstances.RERUN
    dropped = merge_decisions([research, SeriesDecision(discard=True, matched_rules=("drop",))])
    assert dropped.discard and dropped.pipelines == () and dropped.skipped
    assert dropped.late_instances is LateInstances.IGNORE  # a skipped series never re-runs anything
    assert merge_decisions([]) == SeriesDecision() and SeriesDecision().skipped


def test_a_decision_is_recorded_by_field_name_and_read_back_whole() -> None:
    decision = SeriesDecision(("ct_tissue",), forwards=("PACS",), priority=Priority.STAT,
                              completeness=Completeness(2.5, None, LateInstances.NEW_JOB),
                              execution=Execution(ExecutionMode.CONTAINER, 30), matched_rules=("ct",))
    record = decision.to_record()
    assert record["priority"] == "stat" and record["execution"] == {"mode": "container", "timeout_seconds": 30}
    assert SeriesDecision.from_record(record) == decision
    # a record an older release wrote (fewer fields) or a newer one (more) still reads
    older = {k: v for k, v in record.items() if k not in ("provenance", "note")} | {"result_versioning": "supersede"}
    assert SeriesDecision.from_record(older) == decision
    assert decision.with_defaults(LateInstances.RERUN) == decision
    assert SeriesDecision(("p",)).with_defaults(LateInstances.RERUN).late_instances is LateInstances.RERUN


# --- the node's own results ------------------------------------------------------------------------


@dataclass(frozen=True)
class Objects:
    source: Path
    seg: Path
    sr: Path


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> Objects:
    """A phantom CT series and the SEG and SR radnode's writers make from it."""
    folder = tmp_path_factory.mktemp("routing")
    write_chest_phantom(folder / "ct", 12, 32, 32)
    volume, _ = load_volume(folder / "ct", VolumeCriteria())
    result = phantom_result(volume)
    algorithm = AlgorithmInfo(name="ct_tissue", version="0.1.0")
    seg = build_segmentation(volume, result.segments, algorithm, uid_root=UID_ROOT)
    seg.save_as(folder / "seg.dcm")
    build_measurement_report(volume, seg, result, algorithm, uid_root=UID_ROOT).save_as(folder / "sr.dcm")
    return Objects(folder / "ct", folder / "seg.dcm", folder / "sr.dcm")


def _as_received(path: Path, rules: RuleSet) -> Dataset:
    """The attributes ingest parses of a file (only the tags routing reads)."""
    return index_tags(BytesIO(path.read_bytes()), Router(rules).tags)


def test_the_nodes_own_seg_and_sr_are_recognised_and_never_routed(objects: Objects) -> None:
    everything = load_rules(DEFAULT_RULES)
    catch_all = RuleSet(everything.rules[1:], "test")  # without the rule keeping derived objects out
    for path in (objects.seg, objects.sr):
        ds = _as_received(path, catch_all)
        reason = own_result(ds)
        assert reason is not None and "result of radnode (ct_tissue 0.1.0" in reason, reason
        decision = catch_all.route(ds, RoutingContext("PACS"))
        assert decision.provenance is Provenance.OWN_RESULT and decision.skipped and decision.pipelines == ()
        assert decision.late_instances is LateInstances.IGNORE  # even where the node's policy says rerun
        assert Router(catch_all, LateInstances.RERUN).route(ds, Origin("PACS", "", "a1")).late_instances \
            is LateInstances.IGNORE


def test_an_input_or_a_correction_is_not_taken_for_an_own_result(objects: Objects, tmp_path: Path) -> None:
    (phantom, *_) = write_ct_series(make_ct_phantom(n_slices=20, size=128), tmp_path / "phantom")  # radnode demo's
    source = pydicom.dcmread(phantom, stop_before_pixels=True)
    assert source.Manufacturer == "radnode" and own_result(source) is None  # radnode wrote it, as an input
    assert load_rules(DEFAULT_RULES).route(source).pipelines == ("ct_tissue",)
    corrected = pydicom.dcmread(objects.seg)
    corrected.Manufacturer = "Slicer"
    assert own_result(corrected) is None
    edited = pydicom.dcmread(objects.seg)  # radnode's SEG changed by another system, which says so
    item = Dataset()
    item.Manufacturer = "Viewer Inc"
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator = codes.DCM.ModifyingEquipment.value, "DCM"
    purpose.CodeMeaning = "Modifying Equipment"
    item.PurposeOfReferenceCodeSequence = [purpose]
    edited.ContributingEquipmentSequence.append(item)
    assert own_result(edited) is None


# --- routed once -----------------------------------------------------------------------------------


class CountingRules(RuleSet):
    """The shipped rules, counting how often a series is routed."""

    def __init__(self, rules: RuleSet) -> None:
        super().__init__(rules.rules, rules.source)
        object.__setattr__(self, "calls", 0)

    def route(self, *args, **kwargs) -> SeriesDecision:  # type: ignore[no-untyped-def, override]
        object.__setattr__(self, "calls", self.calls + 1)
        return super().route(*args, **kwargs)


def test_a_series_is_routed_on_its_first_instance_only(objects: Objects, tmp_path: Path) -> None:
    rules = CountingRules(load_rules(DEFAULT_RULES))
    store = JobStore(tmp_path / "radnode.db")
    ingest = Ingest(Spool(tmp_path / "spool"), store, Router(rules))
    origin = Origin("CT01", "127.0.0.1:4000", "a1")
    files = sorted(objects.source.iterdir())
    arrivals = [ingest.receive(p.read_bytes(), b"", origin) for p in [*files, *files[:3]]]
    assert arrivals == [Arrival.NEW] * len(files) + [Arrival.DUPLICATE] * 3
    assert rules.calls == 1
    ingest.receive(objects.seg.read_bytes(), b"", origin)
    ingest.receive(objects.sr.read_bytes(), b"", origin)
    assert rules.calls == 3  # one per series
    (job,) = store.jobs()
    assert job.state is JobState.RECEIVED and job.pipeline == "ct_tissue" and job.own_results == 2
    assert [i.sop_instance_uid for i in store.job_inputs(job.id)] == [
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]  # the CT alone
    store.close()


def test_shadow_pipelines_merge_as_a_union_apart_from_the_production_ones() -> None:
    """Two rules' shadows are both run; a pipeline that is also production is not shadowed; no production
    pipeline, nothing to compare with; a discard drops the shadows too."""
    ct = SeriesDecision(("ct_tissue",), shadow=("ct_candidate",), execution=Execution(None, 120), matched_rules=("ct",))
    trial = SeriesDecision(shadow=("ct_candidate", "model_seg", "ct_tissue"), matched_rules=("trial",))
    merged = merge_decisions([ct, trial])
    assert merged.shadow == ("ct_candidate", "model_seg", "ct_tissue")
    assert "shadow ct_candidate, model_seg, ct_tissue" in merged.describe()
    route = study_route([merged])
    assert route.pipelines == ("ct_tissue",) and route.shadow == ("ct_candidate", "model_seg")
    assert route.execution("ct_candidate") == Execution(None, 120)  # its own timeout, from the rules naming it
    assert study_route([merge_decisions([trial])]).shadow == ()  # a shadow alone: nothing to compare with
    assert merge_decisions([ct, SeriesDecision(discard=True, matched_rules=("drop",))]).shadow == ()
    assert SeriesDecision.from_record(merged.to_record()) == merged
