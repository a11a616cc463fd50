"""De-identification for forwards and exports: DICOM PS3.15 Annex E, the Basic Application Level
Confidentiality Profile and its options, with UIDs, pseudonyms and date shifts fixed by the site key.

Built-in profiles (``deidentification.profiles`` adds a site's own):

``basic``
    The Basic Profile alone: every attribute Table E.1-1 lists is removed, emptied or replaced (X, Z, D, U),
    private attributes removed, dates and times with them.
``research``
    Basic Profile with Retain Longitudinal Temporal Information with Modified Dates (dates shifted by a
    per-patient number of days, the same for every study of that patient under the site key), Retain Patient
    Characteristics (sex, age, size, weight and the others the table marks K) and Clean Descriptors (a
    description kept only when it holds none of the patient's identifying values and no run of 4 or more
    digits; else removed).

The actions of the Basic Profile come from the ``dicom-anonymizer`` package (KitwareMedical, BSD-3): its copy
of Table E.1-1 (the 2026c edition) and its value functions per VR. radnode applies them at every level of
nesting (the package itself only treats the top level, which would leave a SEG's referenced SOP Instance
UIDs as they were), replaces its random UIDs with ones derived from the site key (so a study de-identified
twice, and the SEG made from it, keep matching references) and takes the options' K/C columns from the
standard's table in ``standard/confidentiality_profile_attributes.json``, which the package does not carry.
Why this package: idiscore implements the options too but is GPL-3.0 (this project is Apache-2.0) and pins
Pillow below 11; dicognito and deid are not driven by the standard's table.

Objects that may carry burned-in annotation are refused with the reason (:class:`Refused`):
``BurnedInAnnotation YES``, and secondary capture, ultrasound and encapsulated documents unless marked
``BurnedInAnnotation NO``. The pseudonym mapping (original Patient ID and Study UID → their replacements) is
kept in ``deidentification.mapping_dir`` (owner-only), the originals sealed with a key derived from the site
key. :mod:`radnode.security.annex_e` checks the result against the standard's table.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence

from radnode.config import Config, DeidentificationProfile
from radnode.security.annex_e import matches, option_tags
from radnode.security.privacy import SiteKey, owner_only

TABLE_EDITION = "dicomfields_2026c"
"""dicom-anonymizer's copy of Table E.1-1 the actions come from."""

BUILT_IN_PROFILES: dict[str, DeidentificationProfile] = {
    "basic": DeidentificationProfile(),
    "research": DeidentificationProfile(options=["retain_longitudinal_modified_dates",
                                                 "retain_patient_characteristics", "clean_descriptors"]),
}

OPTION_CODES = {  # PS3.16 CID 7050 De-identification Method
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "retain_longitudinal_modified_dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
}

BURNED_IN_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound Image",
    "1.2.840.10008.5.1.4.1.1.6.2": "Enhanced US Volume",
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame Image",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.104.2": "Encapsulated CDA",
}
"""SOP classes whose pixels (or document) commonly carry identifying text: refused unless marked clean."""


DUMMY_TIMES = {"DA": "19000101", "DT": "19000101000000", "TM": "000000"}
"""Dummy values (D) for dates and times: valid for their VR, obviously not real."""


class Refused(Exception):
    """An object that is not de-identified (and so must not be forwarded); the message says why."""


def profile_named(name: str, config: Config | None = None) -> DeidentificationProfile:
    """A built-in or site profile by name; KeyError naming the known ones."""
    profiles = {**BUILT_IN_PROFILES, **(config.deidentification.profiles if config else {})}
    if name not in profiles:
        raise KeyError(f"de-identification profile {name!r} is not defined (known: {', '.join(sorted(profiles))})")
    return profiles[name]


@dataclass
class Outcome:
    """What :func:`deidentify_folder` did: written files, and refused ones with their reasons."""

    written: list[Path] = field(default_factory=list)
    refused: dict[Path, str] = field(default_factory=dict)


class PseudonymMap:
    """Original → replacement (Patient ID, Study UID) per profile, in an owner-only SQLite file; the originals
    are sealed (Fernet, with a key derived from the site key), so the file alone names no patient."""

    def __init__(self, folder: Path, site_key: SiteKey) -> None:
        import base64

        from cryptography.fernet import Fernet

        with owner_only():
            folder.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(folder / "pseudonyms.db", check_same_thread=False)
            self._db.execute("CREATE TABLE IF NOT EXISTS pseudonyms (profile TEXT, kind TEXT, lookup TEXT, "
                             "sealed BLOB, pseudonym TEXT, created_at REAL, PRIMARY KEY (profile, kind, lookup))")
            self._db.commit()
        self._fernet = Fernet(base64.urlsafe_b64encode(site_key.digest("pseudonym-map", "v1")))
        self._site_key = site_key
        self._lock = threading.Lock()

    def record(self, profile: str, kind: str, original: str, pseudonym: str) -> None:
        lookup = self._site_key.pseudonym(f"map-{kind}", original, 32)
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO pseudonyms VALUES (?, ?, ?, ?, ?, ?)",
                             (profile, kind, lookup, self._fernet.encrypt(original.encode()), pseudonym, time.time()))
            self._db.commit()

    def original(self, profile: str, kind: str, pseudonym: str) -> str | None:
        """Re-identification (for the site's authorised staff): the original behind a pseudonym."""
        row = self._db.execute("SELECT sealed FROM pseudonyms WHERE profile = ? AND kind = ? AND pseudonym = ?",
                               (profile, kind, pseudonym)).fetchone()
        return self._fernet.decrypt(row[0]).decode() if row else None

    def close(self) -> None:
        self._db.close()


class Deidentifier:
    """Applies one profile to data sets (see the module docstring)."""

    def __init__(self, name: str, profile: DeidentificationProfile, site_key: SiteKey,
                 mapping: PseudonymMap | None = None) -> None:
        from dicomanonymizer import simpledicomanonymizer as library

        self.name, self.profile, self.site_key, self.mapping = name, profile, site_key, mapping
        self._library = library
        actions = library.initialize_actions(TABLE_EDITION)
        self._exact: dict[tuple[int, int], Callable] = {k: v for k, v in actions.items() if len(k) == 2}
        self._masked = [(k, v) for k, v in actions.items() if len(k) == 4]
        options = list(profile.options)
        self._keep = option_tags(options, "K")
        self._clean = option_tags(options, "C")
        self._shift_dates = "retain_longitudinal_modified_dates" in options
        self._date_tags = option_tags(["retain_longitudinal_modified_dates"], "C") if self._shift_dates else []

    # -- refusal -------------------------------------------------------------------------------------------

    def refusal(self, ds: Dataset) -> str | None:
        """Why ``ds`` cannot be de-identified by this profile, or None."""
        if not self.profile.refuse_burned_in:
            return None
        burned_in = str(ds.get("BurnedInAnnotation", "") or "").upper()
        if burned_in == "YES":
            return "BurnedInAnnotation is YES: the pixels carry identifying text (not cleaned by this profile)"
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class in BURNED_IN_SOP_CLASSES and burned_in != "NO":
            return (f"{BURNED_IN_SOP_CLASSES[sop_class]} without BurnedInAnnotation NO may carry burned-in "
                    "annotation (not cleaned by this profile)")
        return None

    # -- the profile ---------------------------------------------------------------------------------------

    def deidentify(self, ds: Dataset) -> Dataset:
        """De-identify ``ds`` in place and return it; :class:`Refused` when it must not go out."""
        if (why := self.refusal(ds)) is not None:
            raise Refused(why)
        patient_id = str(ds.get("PatientID", "") or "")
        identifying = _identifying_values(ds)
        original_study = str(ds.get("StudyInstanceUID", "") or "")
        pseudonym = "ANON" + self.site_key.pseudonym(f"patient-{self.name}", patient_id, 12).upper()
        shift = dt.timedelta(days=self.site_key.days(f"dates-{self.name}", patient_id))
        self._walk(ds, identifying, shift)
        ds.remove_private_tags()
        ds.PatientID, ds.PatientName = pseudonym, pseudonym
        ds.PatientIdentityRemoved = "YES"
        ds.LongitudinalTemporalInformationModified = "MODIFIED" if self._shift_dates else "REMOVED"
        codes = ["basic", *self.profile.options]
        ds.DeidentificationMethod = [f"radnode profile {self.name}"[:64], *(OPTION_CODES[c][1] for c in codes)]
        ds.DeidentificationMethodCodeSequence = Sequence([_code(*OPTION_CODES[c]) for c in codes])
        if hasattr(ds, "file_meta"):
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if self.mapping is not None:
            self.mapping.record(self.name, "patient", patient_id, pseudonym)
            if original_study:
                self.mapping.record(self.name, "study", original_study, str(ds.StudyInstanceUID))
        return ds

    def _action(self, group: int, element: int) -> Callable | None:
        action = self._exact.get((group, element))
        if action is None:
            action = next((a for k, a in self._masked if matches(k, group, element)), None)
        return action

    def _walk(self, ds: Dataset, identifying: set[str], shift: dt.timedelta) -> None:
        """Apply the profile to every element of ``ds`` and, recursively, of its sequences' items."""
        lib = self._library
        for elem in list(ds):
            group, element = elem.tag.group, elem.tag.element
            if elem.tag.is_private:
                continue  # removed as a whole afterwards
            tag = (group, element)
            action = self._action(group, element)
            if any(matches(k, group, element) for k in self._keep):
                action = lib.keep
            elif self._date_tags and elem.VR in ("DA", "DT", "TM") and any(matches(k, group, element)
                                                                         for k in self._date_tags):
                if elem.VR != "TM":  # a time of day says nothing once the date has moved
                    _shift(elem, shift)
                continue
            elif action is not None and any(matches(k, group, element) for k in self._clean):
                if elem.VR == "SQ" or not _is_clean(elem, identifying):
                    action = lib.delete
                else:
                    continue
            if action is lib.replace_UID or (action is lib.delete_or_empty_or_replace_UID and elem.VR == "UI"):
                self._remap_uid(elem)
                continue
            if action is lib.delete_or_empty_or_replace_UID and elem.VR == "SQ":
                action = None  # keep the reference sequence, remap the UIDs inside (U*: referential integrity)
            if action is not None and elem.VR in DUMMY_TIMES and action is not lib.keep:
                self._date_action(ds, elem, action)
                continue
            if action is not None and action is not lib.keep:
                action(ds, tag)
                continue
            if elem.VR == "SQ" and elem.value is not None:
                for item in elem.value:
                    self._walk(item, identifying, shift)

    def _date_action(self, ds: Dataset, elem: DataElement, action: Callable) -> None:
        """X, Z or D on a date or time as the standard says (the package writes 00010101 for all three, which
        is no valid DA: dciodvfy refuses it): removed, emptied, or a valid dummy value."""
        lib = self._library
        if action is lib.delete:
            del ds[elem.tag]
        elif action in (lib.empty, lib.delete_or_empty):
            elem.value = ""
        else:
            elem.value = DUMMY_TIMES[elem.VR]

    def _remap_uid(self, elem: DataElement) -> None:
        if elem.value in (None, ""):
            return
        values = list(elem.value) if elem.VM > 1 else [elem.value]
        mapped = [self.site_key.uid(str(v)) for v in values]
        elem.value = mapped if elem.VM > 1 else mapped[0]


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


def _identifying_values(ds: Dataset) -> set[str]:
    """The patient's identifying strings (name parts, IDs, birth date, accession), for Clean Descriptors."""
    values: set[str] = set()
    for keyword in ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "AccessionNumber",
                    "PatientAddress", "PatientMotherBirthName", "IssuerOfPatientID", "StudyID"):
        value = ds.get(keyword)
        if value in (None, ""):
            continue
        for part in re.split(r"[\^=\\ ,]+", str(value)):
            if len(part) >= 2:
                values.add(part.upper())
    return values


def _is_clean(elem: DataElement, identifying: set[str]) -> bool:
    """A descriptor holding none of the patient's identifying values and no run of 4+ digits (a date or ID)."""
    text = str(elem.value or "").upper()
    if re.search(r"\d{4,}", text):
        return False
    words = set(re.split(r"[^0-9A-Z]+", text))
    return not (words & identifying) and not any(v in text for v in identifying if len(v) >= 4)


def _shift(elem: DataElement, shift: dt.timedelta) -> None:
    """Move a DA or DT value back by ``shift`` (the same for every date of the patient)."""
    def one(value: str) -> str:
        value = value.strip()
        if len(value) < 8 or not value[:8].isdigit():
            return ""
        try:
            day = dt.date(int(value[:4]), int(value[4:6]), int(value[6:8])) - shift
        except ValueError:
            return ""
        return f"{day:%Y%m%d}{value[8:]}"

    if elem.value in (None, ""):
        return
    if elem.VM > 1:
        elem.value = [one(str(v)) for v in elem.value]
    else:
        elem.value = one(str(elem.value))


def deidentify_file(path: Path, deidentifier: Deidentifier) -> Dataset:
    """The de-identified data set of the DICOM file ``path``; :class:`Refused` says why not (not DICOM, or
    refused by the profile)."""
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError) as e:
        raise Refused(f"not a DICOM file ({e})") from None
    return deidentifier.deidentify(ds)


def deidentify_folder(source: Path, target: Path, deidentifier: Deidentifier) -> Outcome:
    """De-identify every DICOM file under ``source`` into ``target`` (named by the new SOP Instance UID);
    files that are refused, or not DICOM, are not written and are listed with the reason."""
    outcome = Outcome()
    target.mkdir(parents=True, exist_ok=True)
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for path in files:
        try:
            ds = deidentify_file(path, deidentifier)
        except Refused as e:
            outcome.refused[path] = str(e)
            continue
        out = target / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(out, enforce_file_format=True)
        outcome.written.append(out)
    return outcome


def deidentifier_for(config: Config, profile: str, site_key: SiteKey) -> Deidentifier:
    """The named profile with the node's site key and pseudonym mapping."""
    mapping = PseudonymMap(config.deidentification.mapping_dir or config.data_dir / "deid", site_key)
    return Deidentifier(profile, profile_named(profile, config), site_key, mapping)
