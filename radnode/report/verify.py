"""Checks report text against the structured findings, sentence by sentence, before anything is released.

A sentence is kept only if everything it states is supported: every number (with its unit) is a measured
value or a reference limit of a structure the sentence names (on the side it names), every structure it
names was segmented, every side word belongs to a named structure on that side, every finding it affirms
is present and every finding it negates was assessed and is absent, and "normal"/"abnormal" claims agree
with the findings in scope. A sentence that names none of these says nothing checkable and is removed too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from radnode.report.findings import Finding, StructuredFindings
from radnode.report.template import limitations, template_report

STRUCTURE_TERMS: dict[str, str] = {
    r"lungs?|pulmonary|(?<!brain )parenchyma": "lung", r"bones?|osseous|skeleton": "bone",
    r"adipose|fat(?!ty)": "adipose_tissue", r"(?:skeletal )?muscles?|muscular": "skeletal_muscle", r"body": "body",
    r"liver|hepatic": "liver", r"vertebra[el]?|spine|spinal|l1": "vertebral_body_l1", r"intracranial": "intracranial", r"brain|cerebral": "brain",
    r"kidneys?|renal": "kidney", r"spleen|splenic": "spleen", r"heart|cardiac": "heart", r"aorta|aortic": "aorta",
    r"pleura|pleural": "pleura", r"trachea|bronch\w*|airways?": "airway", r"thyroid": "thyroid",
    r"pancrea\w*": "pancreas", r"stomach|bowel|colon|intestin\w*": "bowel", r"mediastin\w*": "mediastinum",
    r"lymph nodes?": "lymph_node", r"adrenals?": "adrenal", r"gall ?bladder|bladder": "bladder",
}
"""Anatomy words → structure key family (lung covers lung_left/lung_right). Names outside the findings are
invented structures."""

FINDING_TERMS: dict[str, str] = {
    r"emphysema\w*": "emphysema",
    r"low bone (?:attenuation|density)|osteopeni\w*|osteoporo\w*|reduced bone density": "low bone attenuation",
    r"low vertebral trabecular attenuation": "low vertebral trabecular attenuation",
    r"steatosis|fatty liver|fatty infiltration": "hepatic steatosis",
    r"atrophy|reduced brain (?:volume|parenchymal fraction)": "reduced brain parenchymal fraction",
    r"nodules?|mass(?:es)?|tumou?rs?|lesions?|fractures?|effusions?|pneumothorax|consolidation|fibrosis|"
    r"infiltrates?|opacit\w+|calcifications?|metasta\w+|cancer|malignan\w+|pneumonia|o?edema|ha?emorrhage|"
    r"cysts?|aneurysms?|embol\w+|stenos[ie]s|lymphadenopathy|atelectasis|bronchiectasis|sarcopeni\w*|"
    r"obesity|cardiomegaly|inflammation|infection": "unmeasured finding",
}
"""Finding words → canonical finding names of the reference ranges; the last group is findings no
measurement can support, so stating or denying them is always unsupported."""

REPORTING_WORDS = frozenset("""
a an the of in on at and or with without is are was were be been there this these those its their both each
either neither nor no not none shows show showing shown demonstrates demonstrate demonstrating measures measure
measured measuring measurement measurements has have total volume volumes mean average attenuation value values
percent percentage fraction low below above under over within reference range ranges limit limits threshold
normal abnormal abnormality abnormalities evidence findings finding impression seen noted present absent
consistent compatible which that than for to by as from hu ml mm cc laa hounsfield units unit milliliters
millilitres assessed segmented segment segmentation structure structures side sides also respectively
""".split())
"""Words any report may use to state measurements; everything else must come from the findings' own text."""

NEGATION = re.compile(r"\b(?:no|not|without|absent|negative for|free of|nor|neither|none|rules? out|"
                      r"excluded?)\b(?:\W+\w+){0,4}\W*$")
"""A negation cue at most four words before a finding term, in the same clause."""
POST_NEGATION = re.compile(r"^\W*(?:is|are|was|were)?\s*(?:not\b|absent\b|excluded\b)")
NORMAL_CLAIM = re.compile(r"\b(?:normal|unremarkable|no abnormalit\w*|within (?:the )?(?:normal|reference)|"
                          r"no significant)\b")
ABNORMAL_CLAIM = re.compile(r"(?<!no )\babnormal(?:ity|ities)?\b")
SIDE = re.compile(r"\b(left|right|bilateral(?:ly)?|both)\b")
NUMBER = re.compile(r"(?<![\w.])([-−–]?\d+(?:[.,]\d+)?)\s*(ml|milliliters?|millilitres?|cc|hu|hounsfield units?|"
                    r"%|percent)?(?![\w])")
UNITS = {"ml": "mL", "milliliter": "mL", "milliliters": "mL", "millilitre": "mL", "millilitres": "mL", "cc": "mL",
         "hu": "HU", "hounsfield unit": "HU", "hounsfield units": "HU", "%": "%", "percent": "%"}
INDEX_NAMES = re.compile(r"\blaa[- ]?950\b|-950 hu|\bl1\b")
"""Names that contain digits but are not measurements (LAA-950, the L1 vertebra)."""
BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")
HEADER = re.compile(r"^\s*(?:findings|impression|report)\s*:\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Rejection:
    """A sentence the verifier removed and why."""

    sentence: str
    reason: str


@dataclass
class Verified:
    """Outcome of verifying one section: the kept sentences and the removals."""

    kept: list[str]
    removed: list[Rejection]


def split_sentences(text: str) -> list[str]:
    """Sentences of a section: split at line breaks and at . ! ? followed by space (not at decimal points)."""
    sentences = []
    for line in text.splitlines():
        line = HEADER.sub("", BULLET.sub("", line)).strip()
        sentences += [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z(])", line) if s.strip()]
    return sentences


def _structures_named(text: str, findings: StructuredFindings) -> tuple[set[str], list[str]]:
    """Structure keys of the findings the text names, and names of structures the findings lack."""
    named: set[str] = set()
    unknown: list[str] = []
    for pattern, family in STRUCTURE_TERMS.items():
        for match in re.finditer(rf"\b(?:{pattern})\b", text):
            keys = {k for k in findings.structures if k == family or k.startswith(f"{family}_")}
            if keys:
                named |= keys
            else:
                unknown.append(match.group(0))
    return named, unknown


def _in_scope(keys: set[str], sides: set[str], findings: StructuredFindings) -> set[str]:
    """The named structures (all if none named) on the named sides (any side if none named)."""
    scope = keys or set(findings.structures)
    if sides:
        lateral = {k for k in scope if findings.structures[k].laterality is not None}
        scope = {k for k in lateral if str(findings.structures[k].laterality.meaning).lower() in sides}
    return scope


def _sides(text: str) -> set[str]:
    sides: set[str] = set()
    for word in SIDE.findall(text):
        sides |= {"left", "right"} if word.startswith(("bilateral", "both")) else {word}
    return sides


def _number_supported(value_text: str, unit: str | None, scope: set[str], findings: StructuredFindings) -> bool:
    """The written number equals, at its written precision, a value or limit of a structure in scope."""
    written = float(value_text.replace(",", ".").replace("−", "-").replace("–", "-"))
    decimals = len(value_text.split(".")[1]) if "." in value_text else 0
    candidates = [(q.value, q.unit) for q in findings.quantities if q.structure_key in scope]
    for f in findings.findings:
        if f.quantity.structure_key in scope:
            unit_symbol = f.quantity.unit
            candidates += [(limit, unit_symbol) for limit in (f.limit.lower, f.limit.upper) if limit is not None]
            if f.limit.age_band is not None:  # "for age 60 to 69 years"
                candidates += [(f.limit.age_band.min_years, ""), (f.limit.age_band.max_years, "")]
    return any(round(value, decimals) == written and (unit is None or unit == value_unit)
               for value, value_unit in candidates)


def _finding_mentions(text: str, labels: tuple[str, ...] = ()) -> list[tuple[str, bool]]:
    """(canonical finding, negated) for every finding term in the text, except a term that is just one of the
    findings' own structure ``labels`` (a model's segment called "lesion" names a measured structure)."""
    label_spans = [m.span() for label in labels for m in re.finditer(rf"\b{re.escape(label)}\b", text)]
    mentions = []
    for pattern, name in FINDING_TERMS.items():
        for match in re.finditer(rf"\b(?:{pattern})\b", text):
            if any(start <= match.start() and match.end() <= end for start, end in label_spans):
                continue
            clause_before = re.split(r"[;:,]|\bbut\b|\bhowever\b", text[:match.start()])[-1]
            clause_after = re.split(r"[;:,.]", text[match.end():])[0]
            negated = bool(NEGATION.search(clause_before)) or bool(POST_NEGATION.match(clause_after))
            mentions.append((name, negated))
    return mentions


def check_sentence(sentence: str, findings: StructuredFindings) -> str | None:
    """Why the sentence is not supported by the findings, or None when everything in it is."""
    text = " ".join(sentence.lower().split())
    structures, unknown = _structures_named(text, findings)
    if unknown:
        return f"names structure(s) not in the findings: {', '.join(sorted(set(unknown)))}"
    sides = _sides(text)
    scope = _in_scope(structures, sides, findings)
    if sides and not scope:
        return f"names side(s) {', '.join(sorted(sides))} for structures that have no such side"
    grounded = bool(structures)

    for value_text, unit_text in NUMBER.findall(INDEX_NAMES.sub(" ", text)):
        grounded = True
        unit = UNITS.get(unit_text) if unit_text else None
        if not _number_supported(value_text, unit, scope, findings):
            return f"number {value_text}{' ' + unit if unit else ''} is not a measurement of {_names(scope, findings)}"

    in_scope: list[Finding] = [f for f in findings.findings if f.quantity.structure_key in scope]
    for name, negated in _finding_mentions(text, tuple(s.label.lower() for s in findings.structures.values())):
        grounded = True
        assessed = [f for f in in_scope if f.finding == name]
        if not assessed:
            return f"{'denies' if negated else 'states'} {name}, which was not assessed for {_names(scope, findings)}"
        if negated and any(f.present for f in assessed):
            return f"denies {name}, which the measurements show"
        if not negated and not any(f.present for f in assessed):
            return f"states {name}, which the measurements do not show"

    if NORMAL_CLAIM.search(text):
        grounded = True
        if any(f.present for f in in_scope):
            return f"calls {_names(scope, findings)} normal, but a finding is present"
    if ABNORMAL_CLAIM.search(text):
        grounded = True
        if not any(f.present for f in in_scope):
            return f"calls {_names(scope, findings)} abnormal, but no finding is present"
    if not grounded:
        return "states nothing that the findings contain"
    if foreign := sorted(set(re.findall(r"[a-z]+", text)) - _vocabulary(findings)):
        return f"uses words the findings do not support: {', '.join(foreign[:8])}"
    return None


def _vocabulary(findings: StructuredFindings) -> frozenset[str]:
    """The closed vocabulary of a released sentence: the template's own wording of these findings, the
    structure and finding names, and plain reporting words. A model can reorder and shorten, not add:
    "diagnosed", "history", "transplantation" or "COPD" never reach the report."""
    template = template_report(findings)
    text = " ".join([*template.findings, *template.impression, *limitations(findings),
                     *(s.label for s in findings.structures.values()), *(f.finding for f in findings.findings)])
    return REPORTING_WORDS | frozenset(re.findall(r"[a-z]+", text.lower()))


def _names(scope: set[str], findings: StructuredFindings) -> str:
    return ", ".join(sorted(findings.structures[k].label.lower() for k in scope)) or "any structure"


def verify_sentences(sentences: list[str], findings: StructuredFindings) -> Verified:
    """Keep the supported sentences, record each removal with its reason."""
    kept, removed = [], []
    for sentence in sentences:
        reason = check_sentence(sentence, findings)
        if reason is None:
            kept.append(sentence)
        else:
            removed.append(Rejection(sentence, reason))
    return Verified(kept, removed)


def missing_from_impression(impression: list[str], findings: StructuredFindings) -> list[Finding]:
    """Present findings that no Impression sentence affirms for their structure."""
    missing = []
    for finding in findings.present:
        stated = False
        for sentence in impression:
            text = " ".join(sentence.lower().split())
            structures, _ = _structures_named(text, findings)
            scope = _in_scope(structures, _sides(text), findings)  # a sentence must name where the finding is
            if (structures and finding.quantity.structure_key in scope
                    and (finding.finding, False) in _finding_mentions(text)):
                stated = True
                break
        if not stated:
            missing.append(finding)
    return missing
