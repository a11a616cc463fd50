"""Who and what a study is: the patient and study attributes every report, FHIR resource and reference range reads.

One reading of the DICOM Patient and General Study modules, so the report header, the FHIR Patient and the
age- or sex-dependent reference ranges never disagree. Missing or malformed values are kept as *problems*
(empty PatientID, a StudyDate that is not a date, …): the DICOM results still go out, FHIR leaves the field
out or says why it is absent, and the run records a warning naming what was missing. A folder whose series
name more than one patient is refused here, with both identities in the message, never narrowed silently.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pydicom import Dataset

ADMINISTRATIVE_SEX = {"M": "male", "F": "female", "O": "other"}
"""DICOM Patient's Sex (0010,0040) → FHIR AdministrativeGender."""
_AGE = re.compile(r"^(\d{3})([DWMY])$")
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


class PatientIdentityError(ValueError):
    """The study's series do not belong to one patient; the message names every identity found."""


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _date(text: str) -> dt.date | None:
    """A DICOM DA (YYYYMMDD) as a date; None when empty or not a date."""
    try:
        return dt.datetime.strptime(text, "%Y%m%d").date() if re.fullmatch(r"\d{8}", text) else None
    except ValueError:
        return None


@dataclass(frozen=True)
class SeriesDescription:
    """The series a result was computed from, as a report names it."""

    uid: str
    number: int | None
    description: str
    modality: str
    instances: int

    def text(self) -> str:
        number = f"series {self.number}" if self.number is not None else "series (no number)"
        described = f" '{self.description}'" if self.description else ""
        return f"{number}{described} ({self.modality}, {self.instances} images)"


@dataclass(frozen=True)
class StudyIdentity:
    """Patient and study attributes of one study, with what was missing or malformed."""

    patient_name: str
    patient_id: str
    issuer_of_patient_id: str
    birth_date: dt.date | None
    sex: str
    """DICOM code M, F, O, or empty."""
    age_years: float | None
    """From Patient's Age (0010,1010), else birth date and study date; None when neither is known."""
    accession: str
    study_uid: str
    study_date: dt.date | None
    study_time: str
    study_description: str
    series: tuple[SeriesDescription, ...] = ()
    problems: tuple[str, ...] = field(default_factory=tuple)
    """What was missing or malformed, one sentence each (the run's warnings)."""

    @classmethod
    def from_dataset(cls, ds: Dataset, series: Sequence[SeriesDescription] = ()) -> "StudyIdentity":
        """Read the Patient and General Study modules of ``ds`` (any instance of the study)."""
        problems: list[str] = []
        patient_id = _text(ds, "PatientID")
        if not patient_id:
            problems.append("Patient ID (0010,0020) is empty: FHIR resources carry no subject")
        birth_text = _text(ds, "PatientBirthDate")
        birth = _date(birth_text)
        if birth_text and birth is None:
            problems.append(f"Patient's Birth Date (0010,0030) {birth_text!r} is not a date")
        study_text = _text(ds, "StudyDate")
        study_date = _date(study_text)
        if study_text and study_date is None:
            problems.append(f"Study Date (0008,0020) {study_text!r} is not a date")
        elif not study_text:
            problems.append("Study Date (0008,0020) is empty or was not a valid date: FHIR resources carry no dates")
        sex = _text(ds, "PatientSex").upper()
        if sex and sex not in ADMINISTRATIVE_SEX:
            problems.append(f"Patient's Sex (0010,0040) {sex!r} is not M, F or O")
            sex = ""
        age = _age_years(_text(ds, "PatientAge"), birth, study_date)
        return cls(
            patient_name=str(ds.get("PatientName", "") or "").replace("^", " ").strip(),
            patient_id=patient_id, issuer_of_patient_id=_text(ds, "IssuerOfPatientID"), birth_date=birth,
            sex=sex, age_years=age, accession=_text(ds, "AccessionNumber"), study_uid=_text(ds, "StudyInstanceUID"),
            study_date=study_date, study_time=_text(ds, "StudyTime"), study_description=_text(ds, "StudyDescription"),
            series=tuple(series), problems=tuple(problems),
        )

    @property
    def gender(self) -> str:
        """FHIR AdministrativeGender of Patient's Sex (``unknown`` when not given)."""
        return ADMINISTRATIVE_SEX.get(self.sex, "unknown")

    def header_lines(self) -> list[str]:
        """The lines a report opens with: patient, study and the series analysed."""
        born = self.birth_date.isoformat() if self.birth_date else "unknown"
        sex = {"M": "male", "F": "female", "O": "other"}.get(self.sex, "unknown")
        when = self.study_date.isoformat() if self.study_date else "unknown"
        return [
            f"Patient: {self.patient_name or 'unknown'}; ID: {self.patient_id or 'unknown'}; "
            f"born: {born}; sex: {sex}",
            f"Accession: {self.accession or 'none'}; study date: {when}; "
            f"study: {self.study_description or 'no description'}",
            *(f"Series analysed: {s.text()}" for s in self.series),
        ]


def _age_years(age_text: str, birth: dt.date | None, study_date: dt.date | None) -> float | None:
    """Age at the study in years: Patient's Age (nnnD/W/M/Y) first, else the birth and study dates."""
    match = _AGE.match(age_text)
    if match:
        return int(match.group(1)) * _AGE_UNIT_YEARS[match.group(2)]
    if birth and study_date and study_date >= birth:
        return (study_date - birth).days / 365.25
    return None


def _identity_key(ds: Dataset) -> tuple[str, str]:
    return _text(ds, "PatientID"), _text(ds, "IssuerOfPatientID")


def _describe_identity(ds: Dataset) -> str:
    issuer = f" (issuer {_text(ds, 'IssuerOfPatientID')})" if _text(ds, "IssuerOfPatientID") else ""
    name = str(ds.get("PatientName", "") or "").strip()
    return f"PatientID {_text(ds, 'PatientID')!r}{issuer}" + (f" name {name!r}" if name else "")


def check_one_patient(series: Iterable[tuple[str, Dataset]]) -> None:
    """Refuse a study whose series name different patients or disagree on who the patient is.

    ``series``: (series label, one dataset of it). Different Patient ID / Issuer pairs are two patients;
    the same ID with a different name, birth date or sex is a disagreement. Raises PatientIdentityError
    naming both identities and their series.
    """
    seen: dict[tuple[str, str], tuple[str, Dataset]] = {}
    for label, ds in series:
        key = _identity_key(ds)
        if key not in seen:
            seen[key] = (label, ds)
            continue
        first_label, first = seen[key]
        for keyword in ("PatientName", "PatientBirthDate", "PatientSex"):
            a, b = _text(first, keyword), _text(ds, keyword)
            if a and b and a != b:
                raise PatientIdentityError(
                    f"the series disagree on patient identity: {first_label} has {keyword} {a!r}, "
                    f"{label} has {b!r} for the same {_describe_identity(ds)}; refusing the study")
    if len(seen) > 1:
        listed = "; ".join(f"{_describe_identity(ds)} in {label}" for label, ds in seen.values())
        raise PatientIdentityError(f"the folder holds {len(seen)} patients ({listed}); a study is one patient's, "
                                   "send each patient's study on its own")
