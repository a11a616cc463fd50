"""Routing rules: parsing with line-accurate errors, evaluation on real data sets, and the CLI helpers."""

from __future__ import annotations

import io
import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.uid import SegmentationStorage, generate_uid

from radnode.destinations import known_types
from radnode.outputs.provenance import PROVENANCE_TAGS
from radnode.pipelines import rules_cli
from radnode.pipelines.conditions import RuleError
from radnode.pipelines.registry import PIPELINES
from radnode.pipelines.routing import LateInstances, Priority, RoutingContext
from radnode.pipelines.rules import DEFAULT_RULES, load_rules, parse_rules
from radnode.pipelines.rules_cli import check_rules_file


def _ct() -> Dataset:
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)


def _mr_t1_brain() -> Dataset:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"), stop_before_pixels=True)
    ds.BodyPartExamined, ds.SeriesDescription = "HEAD", "t1_mprage_sag_p2"
    return ds


def _seg_from(ds: Dataset) -> Dataset:
    ds.Modality, ds.SOPClassUID = "SEG", SegmentationStorage
    ds.file_meta.MediaStorageSOPClassUID = SegmentationStorage
    ds.SeriesInstanceUID = generate_uid()
    return ds


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(text))
    return path


# --- the default rule file --------------------------------------------------------------------


def test_default_rules_route_real_data_sets() -> None:
    ruleset = load_rules(DEFAULT_RULES, known_pipelines=[*PIPELINES, "mri_brain"])

    ct = ruleset.route(_ct())
    assert ct.pipelines == ("ct_tissue",) and not ct.discard
    assert ct.matched_rules == ("ct-axial-volume",) and ct.priority is Priority.ROUTINE

    mr = ruleset.route(_mr_t1_brain())
    assert mr.pipelines == ("mri_brain",) and mr.matched_rules == ("mr-t1-brain",)


def test_default_rules_leave_other_series_alone() -> None:
    ruleset = load_rules(DEFAULT_RULES)
    localizer = _ct()
    localizer.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert ruleset.route(localizer).matched_rules == ()

    t2 = _mr_t1_brain()
    t2.SeriesDescription = "t2_tse_tra"  # "t2" must not pass as T1, nor "t10" below
    assert ruleset.route(t2).pipelines == ()
    t2.SeriesDescription = "AX T10 test"
    assert ruleset.route(t2).pipelines == ()


def _sr() -> Dataset:
    ds = Dataset()
    ds.Modality, ds.SOPClassUID = "SR", "1.2.840.10008.5.1.4.1.1.88.33"
    return ds


def _ct_secondary_capture() -> Dataset:
    ds = _ct()  # still Modality CT and ImageType AXIAL: only the SOP class tells
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    return ds


@pytest.mark.parametrize("make", [lambda: _seg_from(_ct()), _sr, _ct_secondary_capture],
                         ids=["seg", "sr", "secondary-capture"])
def test_default_rules_discard_derived_objects_and_stop(make: Callable[[], Dataset]) -> None:
    ruleset = load_rules(DEFAULT_RULES)
    ds = make()
    decision = ruleset.route(ds)
    assert decision.discard and decision.pipelines == () and decision.forwards == ()
    assert decision.matched_rules == ("never-process-derived-objects",)
    skipped = [o for o in ruleset.evaluate(ds) if o.skipped_by]
    assert [o.rule for o in skipped] == ["ct-axial-volume", "mr-t1-brain"]


def test_default_rules_name_only_registered_pipelines() -> None:
    rules = load_rules(DEFAULT_RULES, known_pipelines=PIPELINES)
    assert {p for rule in rules.rules for p in rule.decision.pipelines} <= set(PIPELINES)


def test_an_unregistered_pipeline_is_refused_on_its_line(tmp_path) -> None:
    text = DEFAULT_RULES.read_text().replace("pipelines: [mri_brain]", "pipelines: [mri_brian]")
    (tmp_path / "rules.yaml").write_text(text)
    with pytest.raises(RuleError, match="unknown pipeline 'mri_brian'") as err:
        load_rules(tmp_path / "rules.yaml", known_pipelines=PIPELINES)
    assert err.value.line == text.splitlines().index("    pipelines: [mri_brian]") + 1


# --- the language -----------------------------------------------------------------------------


LANGUAGE = """\
rules:
  - name: thin-chest-ct
    when:
      all:
        - Modality: CT
        - SliceThickness: {between: [0.5, 3.0]}
        - any:
            - SeriesDescription: {matches: "(?i)thorax|chest"}
            - BodyPartExamined: {in: [CHEST, THORAX]}
    pipelines: [lung]
    completeness: {study_idle_seconds: 5, late_instances: new-job}
  - name: any-ct
    when: {Modality: CT, SOPClassUID: CT Image Storage}
    pipelines: [ct_tissue, lung]
    completeness: {study_idle_seconds: 10, series_grace_seconds: 2}
  - name: emergency
    when:
      any:
        - calling_ae: {in: [ER_CT, TRAUMA]}
        - station: ER01
    priority: stat
  - name: archive-copy
    when:
      not: {ImageType: LOCALIZER}
      PatientID: {exists: true}
      InstanceNumber: {ge: 1}
    forward: [ARCHIVE]
    final: true
  - name: never-reached
    when: {Modality: {exists: true}}
    pipelines: [other]
"""


def test_union_of_matching_rules_with_reasons() -> None:
    ruleset = parse_rules(LANGUAGE)
    ct = _ct()  # SliceThickness 5.0, ImageType ORIGINAL\PRIMARY\AXIAL, StationName CT01_OC0
    outcomes = {o.rule: o for o in ruleset.evaluate(ct, RoutingContext(calling_ae="ER_CT"))}

    thin = outcomes["thin-chest-ct"]
    assert not thin.matched
    assert "  Modality = 'CT' matched 'CT'" in thin.reasons
    assert "  SliceThickness 5.0 not between 0.5 and 3.0" in thin.reasons
    assert outcomes["emergency"].matched
    assert "  calling_ae in ['ER_CT', 'TRAUMA'] matched 'ER_CT'" in outcomes["emergency"].reasons
    assert "  station = 'ER01' not matched: 'CT01_OC0'" in outcomes["emergency"].reasons
    assert outcomes["never-reached"].skipped_by == "archive-copy"

    decision = ruleset.route(ct, RoutingContext(calling_ae="ER_CT"))
    assert decision.matched_rules == ("any-ct", "emergency", "archive-copy")
    assert decision.pipelines == ("ct_tissue", "lung") and decision.forwards == ("ARCHIVE",)
    assert decision.priority is Priority.STAT
    assert decision.completeness.study_idle_seconds == 10 and decision.completeness.series_grace_seconds == 2


def test_ranges_regex_and_completeness_merge() -> None:
    ruleset = parse_rules(LANGUAGE)
    ct = _ct()
    ct.SliceThickness, ct.SeriesDescription = "1.25", "Thorax 1.25 B31f"
    decision = ruleset.route(ct)
    assert decision.matched_rules == ("thin-chest-ct", "any-ct", "archive-copy")
    assert decision.priority is Priority.ROUTINE
    assert decision.completeness.study_idle_seconds == 10  # the longer wait of both routes
    assert decision.completeness.late_instances is LateInstances.NEW_JOB
    reasons = ruleset.evaluate(ct)[0].reasons
    assert "  SliceThickness 1.25 between 0.5 and 3.0" in reasons
    assert "    SeriesDescription matches '(?i)thorax|chest' matched 'Thorax 1.25 B31f'" in reasons


def test_multi_valued_attribute_matches_any_value_and_mappings_work() -> None:
    ruleset = parse_rules("""
rules:
  - name: axial
    when: {ImageType: AXIAL, PixelSpacing: {lt: 0.7}}
    pipelines: [p]
""")
    ct = _ct()  # PixelSpacing 0.661468\0.661468
    assert ruleset.route(ct).pipelines == ("p",)
    ct.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert ruleset.route(ct).pipelines == ()
    assert ruleset.route({"ImageType": ["DERIVED", "AXIAL"], "PixelSpacing": [1.0, 0.5]}).pipelines == ("p",)
    assert ruleset.route({"ImageType": "AXIAL"}).pipelines == ()  # PixelSpacing absent
    assert ruleset.keywords == {"ImageType", "PixelSpacing", *PROVENANCE_TAGS}  # and what tells own results


def test_exists_false_and_absent_values() -> None:
    ruleset = parse_rules("""
rules:
  - name: no-contrast
    when: {ContrastBolusAgent: {exists: false}, SliceThickness: {gt: 1}}
    pipelines: [p]
""")
    outcome = ruleset.evaluate({"SliceThickness": "oops"})[0]
    assert not outcome.matched
    assert outcome.reasons == ("ContrastBolusAgent absent as required", "SliceThickness 'oops' is not a number")
    assert ruleset.route({"ContrastBolusAgent": "", "SliceThickness": 2}).pipelines == ("p",)
    assert ruleset.route({"ContrastBolusAgent": "Iomeron", "SliceThickness": 2}).pipelines == ()


def test_code_in_a_value_is_only_text(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_: object) -> None:
        raise AssertionError("a rule value was executed")

    monkeypatch.setattr(os, "system", forbidden)
    payload = "__import__('os').system('x')"
    ruleset = parse_rules(f"""
rules:
  - name: odd
    when: {{Modality: "{payload}"}}
    pipelines: [p]
""")
    assert ruleset.evaluate(_ct())[0].reasons == (f"Modality = {payload!r} not matched: 'CT'",)
    assert ruleset.route({"Modality": payload}).pipelines == ("p",)


# --- refused files, with the line that is wrong -------------------------------------------------


BAD_FILES = {
    "unknown rule key": ("""
rules:
  - name: a
    when: {Modality: CT}
    pipeline: [ct_tissue]   #!
""", "unknown key 'pipeline'; did you mean 'pipelines'?"),
    "unknown operator": ("""
rules:
  - name: a
    when:
      all:
        - Modality: CT
        - SeriesDescription:
            regex: thorax   #!
    pipelines: [ct_tissue]
""", "SeriesDescription: unknown operator 'regex'"),
    "bad regex": ("""
rules:
  - name: a
    when:
      SeriesDescription: {matches: "(thorax"}   #!
    pipelines: [ct_tissue]
""", "bad regular expression '(thorax': missing ), unterminated subpattern at position 0"),
    "range of text": ("""
rules:
  - name: a
    when:
      SliceThickness:
        between:
          - 0.5
          - thin   #!
    pipelines: [ct_tissue]
""", "SliceThickness: 'between' expects a number, got 'thin'"),
    "range with one value": ("""
rules:
  - name: a
    when: {SliceThickness: {between: [3]}}   #!
    pipelines: [ct_tissue]
""", "'between' expects [low, high]"),
    "unknown pipeline": ("""
rules:
  - name: a
    when: {Modality: CT}
    pipelines:
      - ct_tissue
      - ct_tisue   #!
""", "rule 'a': unknown pipeline 'ct_tisue' (known: ct_tissue)"),
    "unknown shadow pipeline": ("""
rules:
  - name: a
    when: {Modality: CT}
    pipelines: [ct_tissue]
    shadow: [ct_tisue_v2]   #!
""", "rule 'a': unknown shadow pipeline 'ct_tisue_v2' (known: ct_tissue)"),
    "shadow with discard": ("""
rules:
  - name: a
    when: {Modality: CT}
    discard: true   #!
    shadow: [ct_tissue]
""", "'discard' cannot be combined with pipelines, forward or shadow"),
    "unknown destination": ("""
rules:
  - name: a
    when: {Modality: CT}
    forward: [NOWHERE]   #!
""", "rule 'a': unknown destination 'NOWHERE' (known: PACS; or a one-line destination"),
    "unknown destination type": ("""
rules:
  - name: a
    when: {Modality: CT}
    forward:
      - PACS
      - "s3:results-bucket"   #!
""", f"rule 'a': forward 's3:results-bucket': unknown destination type 's3' (known: {known_types()})"),
    "yaml syntax": ("""
rules:
  - name: a
    when: {Modality: CT
    pipelines: [ct_tissue]   #!
""", "not valid YAML"),
    "python object tag": ("""
rules:
  - name: a
    when: {Modality: CT}
    pipelines: !!python/object/apply:os.system ["echo hi"]   #!
""", "YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed"),
    "python object tag on a mapping": ("""
rules:
  - name: a
    when: !!python/object:radnode.pipelines.rules.RoutingContext   #!
      calling_ae: X
    pipelines: [ct_tissue]
""", "is not allowed: rule files are plain data"),
    "unknown keyword": ("""
rules:
  - name: a
    when:
      Modalty: CT   #!
    pipelines: [ct_tissue]
""", "unknown DICOM keyword or field 'Modalty'; did you mean 'Modality'?"),
    "duplicate key": ("""
rules:
  - name: a
    when:
      Modality: CT
      Modality: MR   #!
    pipelines: [ct_tissue]
""", "duplicate key 'Modality'"),
    "alias": ("""
rules:
  - name: a
    when: &ct {Modality: CT}
    pipelines: [ct_tissue]
  - name: b
    when: *ct   #!
    pipelines: [ct_tissue]
""", "aliases"),
    "discard with pipelines": ("""
rules:
  - name: a
    when: {Modality: SEG}
    discard: true   #!
    pipelines: [ct_tissue]
""", "'discard' cannot be combined"),
    "no action": ("""
rules:
  - name: a   #!
    when: {Modality: SEG}
""", "rule 'a': no action"),
    "missing when": ("""
rules:
  - name: a   #!
    pipelines: [ct_tissue]
""", "missing 'when'"),
    "duplicate rule name": ("""
rules:
  - name: a
    when: {Modality: CT}
    pipelines: [ct_tissue]
  - name: a   #!
    when: {Modality: MR}
    pipelines: [ct_tissue]
""", "duplicate rule name 'a'"),
    "boolean where text is meant": ("""
rules:
  - name: a
    when: {PatientSex: {in: [M, NO]}}   #!
    pipelines: [ct_tissue]
""", "quote text such as 'ON' or 'NO'"),
    "quoted number": ("""
rules:
  - name: a
    when: {SeriesNumber: "2"}   #!
    pipelines: [ct_tissue]
""", "SeriesNumber is numeric (VR IS); write the number unquoted"),
    "unknown UID name": ("""
rules:
  - name: a
    when: {SOPClassUID: CT Image Storag}   #!
    pipelines: [ct_tissue]
""", "did you mean 'CT Image Storage'?"),
    "bad priority": ("""
rules:
  - name: a
    when: {Modality: CT}
    pipelines: [ct_tissue]
    priority: urgent   #!
""", "rule 'a': 'priority': Input should be 'stat', 'routine' or 'off-peak'"),
    "bad completeness": ("""
rules:
  - name: a
    when: {Modality: CT}
    pipelines: [ct_tissue]
    completeness:
      study_idle_seconds: 5
      late_instances: rerun-all   #!
""", "'completeness.late_instances'"),
    "list without operator": ("""
rules:
  - name: a
    when:
      Modality: [CT, MR]   #!
    pipelines: [ct_tissue]
""", "a list needs an operator, e.g. {in: [...]}"),
    "unknown top-level key": ("""
rules:
  - name: a
    when: {Modality: CT}
    pipelines: [ct_tissue]
rule: []   #!
""", "unknown top-level key 'rule'"),
    "empty any": ("""
rules:
  - name: a
    when:
      any: []   #!
    pipelines: [ct_tissue]
""", "'any' expects a non-empty list of conditions"),
    "sequence compared": ("""
rules:
  - name: a
    when:
      ReferencedImageSequence: x   #!
    pipelines: [ct_tissue]
""", "is a sequence; only 'exists' can test it"),
}


@pytest.mark.parametrize("text, reason", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_mistakes_are_refused_with_file_line_and_reason(tmp_path: Path, text: str, reason: str) -> None:
    path = _write(tmp_path, text.lstrip("\n"))
    expected_line = next(i for i, line in enumerate(path.read_text().splitlines(), 1) if "#!" in line)
    with pytest.raises(RuleError) as err:
        load_rules(path, known_pipelines=["ct_tissue"], known_destinations=["PACS"])
    assert (err.value.path, err.value.line) == (str(path), expected_line)
    assert reason in err.value.reason
    assert str(err.value) == f"{path}:{expected_line}: {err.value.reason}"
    assert isinstance(err.value, ValueError)


def test_unreadable_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match="cannot read rule file") as err:
        load_rules(tmp_path / "missing.yaml")
    assert err.value.line is None
    with pytest.raises(RuleError, match="empty rule file"):
        load_rules(_write(tmp_path, "# nothing\n"))


# --- CLI helpers --------------------------------------------------------------------------------


def test_check_rules_file(tmp_path: Path) -> None:
    out = io.StringIO()
    assert check_rules_file(DEFAULT_RULES, out) == 0
    assert "3 rules OK" in out.getvalue() and "ct-axial-volume: pipelines ct_tissue" in out.getvalue()

    bad = _write(tmp_path, BAD_FILES["unknown operator"][0].lstrip("\n"))
    out = io.StringIO()
    assert check_rules_file(bad, out) == 1
    assert out.getvalue().startswith(f"{bad}:7: rule 'a': SeriesDescription: unknown operator 'regex'")


def test_rules_test_groups_series_and_explains(tmp_path: Path) -> None:
    data = tmp_path / "study" / "nested"
    data.mkdir(parents=True)
    for number in (1, 2):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        ds.save_as(data / f"ct{number}.dcm", enforce_file_format=True)
    seg = _seg_from(pydicom.dcmread(get_testdata_file("CT_small.dcm")))
    seg.save_as(tmp_path / "study" / "seg.dcm", enforce_file_format=True)
    (tmp_path / "study" / "README.txt").write_text("not DICOM")

    out = io.StringIO()
    assert rules_cli.test_rules_on_path(DEFAULT_RULES, tmp_path / "study", out) == 0
    text = out.getvalue()
    assert "2 series, 1 files skipped" in text
    ct_block, = [b for b in text.split("\n\n") if "(CT, 2 files)" in b]
    assert "  MATCH ct-axial-volume" in ct_block
    assert "        ImageType = 'AXIAL' matched 'AXIAL'" in ct_block
    assert "  no    mr-t1-brain" in ct_block
    assert "  => pipelines ct_tissue; priority routine (rules: ct-axial-volume)" in ct_block
    seg_block, = [b for b in text.split("\n\n") if "(SEG, 1 files)" in b]
    assert "  MATCH never-process-derived-objects" in seg_block
    assert "  skip  ct-axial-volume" in seg_block
    assert "  => discard (rules: never-process-derived-objects)" in seg_block


def test_rules_test_exit_codes(tmp_path: Path) -> None:
    out = io.StringIO()
    assert rules_cli.test_rules_on_path(tmp_path / "none.yaml", tmp_path, out) == 1
    assert "cannot read rule file" in out.getvalue()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert rules_cli.test_rules_on_path(DEFAULT_RULES, empty, io.StringIO()) == 2
