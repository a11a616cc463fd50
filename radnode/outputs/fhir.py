"""The measurement report as a FHIR R4 transaction Bundle: DiagnosticReport + one Observation per measurement.

Numbers come from the TID 1500 SR (:func:`radnode.outputs.sr.read_measurements`), not from the pipeline
objects, so the FHIR values are exactly those of the DICOM report. fhir.resources' R4B models are used:
the resources written here (Patient, ImagingStudy, Device, Observation, DiagnosticReport) have the same
shape in R4, which is what the receiving servers speak.
"""

from __future__ import annotations

import base64
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from pydicom import Dataset

from radnode.imaging.volume import Volume
from radnode.outputs.algorithm import AlgorithmInfo
from radnode.outputs.sr import procedure_reported, read_measurements
from radnode.results import PipelineResult, Structure
from radnode.uncertainty import NEEDS_REVIEW, UNCERTAINTY_CONCEPTS, UncertainPipelineResult

CODE_SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "LN": "http://loinc.org",
    "UCUM": "http://unitsofmeasure.org",
    "RADLEX": "http://radlex.org",
    "NCIt": "http://ncicb.nci.nih.gov/xml/owl/EVS/Thesaurus.owl",
}
"""FHIR system URIs of the DICOM Coding Scheme Designators the node uses (PS3.16 Section 8)."""

DICOM_UID_SYSTEM = "urn:dicom:uid"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DIAGNOSTIC_IMAGING_STUDY = {"system": CODE_SYSTEMS["LN"], "code": "18748-4", "display": "Diagnostic imaging study"}
"""DiagnosticReport.code when the modality has no LOINC study code in :data:`radnode.outputs.sr.PROCEDURE_REPORTED`."""
ADMINISTRATIVE_SEX = {"M": "male", "F": "female", "O": "other"}
DEVICE_OBSERVER_UID = ("121012", "DCM")
V3_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_PAST_LIMIT = {"UNC-AGREEMENT": ("L", "Low")}
"""Interpretation of an uncertainty score past its limit: agreement is too low, the others too high."""


def _system(designator: str, private_schemes: dict[str, str]) -> str:
    """FHIR system of a DICOM coding scheme; private (99…) schemes by their declared Coding Scheme UID."""
    if designator in CODE_SYSTEMS:
        return CODE_SYSTEMS[designator]
    if designator in private_schemes:
        return f"urn:oid:{private_schemes[designator]}"
    raise ValueError(f"coding scheme {designator!r} has no FHIR system (private schemes need a Coding Scheme UID)")


def _coding(code: dict[str, str] | Dataset, private_schemes: dict[str, str]) -> dict[str, str]:
    """A FHIR Coding from a DICOM code (a CodedConcept or a read_measurements mapping)."""
    if isinstance(code, Dataset):
        code = {"value": code.value, "scheme_designator": code.scheme_designator, "meaning": code.meaning}
    return {"system": _system(str(code["scheme_designator"]), private_schemes), "code": str(code["value"]),
            "display": str(code["meaning"])}


def _uid_identifier(uid: str) -> dict[str, str]:
    """A DICOM UID as a FHIR Identifier (system urn:dicom:uid, value urn:oid:…)."""
    return {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}


def _entry(resource: dict[str, Any], if_none_exist: str | None = None) -> dict[str, Any]:
    """A transaction entry creating ``resource`` under a fresh urn:uuid (conditionally when asked)."""
    request = {"method": "POST", "url": resource["resourceType"]}
    if if_none_exist:
        request["ifNoneExist"] = if_none_exist
    return {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": resource, "request": request}


def _study_datetime(study: Dataset) -> str | None:
    """Study Date/Time as a FHIR dateTime; a time without DICOM offset is taken in the node's time zone."""
    date = str(study.get("StudyDate", "") or "")
    if not date:
        return None
    time = str(study.get("StudyTime", "") or "").split(".")[0].ljust(6, "0")
    moment = datetime.strptime(date + time, "%Y%m%d%H%M%S")
    offset = str(study.get("TimezoneOffsetFromUTC", "") or "")
    if offset:
        moment = moment.replace(tzinfo=datetime.strptime(offset, "%z").tzinfo)
    return moment.astimezone().isoformat()


def _patient(study: Dataset, identifier_system: str | None) -> tuple[dict[str, Any], str]:
    """Patient resource from the DICOM Patient module and its conditional-create query."""
    patient_id = str(study.PatientID)
    identifier = {"type": {"coding": [{"system": V2_0203, "code": "MR"}]}, "value": patient_id}
    if identifier_system:
        identifier["system"] = identifier_system
    resource: dict[str, Any] = {"resourceType": "Patient", "identifier": [identifier]}
    name = study.get("PatientName")
    if name:
        human_name: dict[str, Any] = {"text": str(name).replace("^", " ").strip()}
        if name.family_name:
            human_name["family"] = name.family_name
        if name.given_name:
            human_name["given"] = name.given_name.split()
        resource["name"] = [human_name]
    if study.get("PatientBirthDate"):
        birth = str(study.PatientBirthDate)
        resource["birthDate"] = f"{birth[:4]}-{birth[4:6]}-{birth[6:8]}"
    sex = str(study.get("PatientSex", "") or "")
    resource["gender"] = ADMINISTRATIVE_SEX.get(sex, "unknown")
    query = f"identifier={identifier_system}|{patient_id}" if identifier_system else f"identifier={patient_id}"
    return resource, query


def _accession_identifier(study: Dataset) -> dict[str, Any] | None:
    """The Accession Number as an ACSN identifier (the order's filler number in radiology)."""
    accession = str(study.get("AccessionNumber", "") or "")
    if not accession:
        return None
    return {"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "value": accession}


def _device_observer_uid(sr: Dataset) -> str | None:
    """Device Observer UID (DCM 121012) from the SR's observation context."""
    for item in sr.get("ContentSequence", []):
        concept = item.ConceptNameCodeSequence[0]
        if (concept.CodeValue, concept.CodingSchemeDesignator) == DEVICE_OBSERVER_UID:
            return str(item.UID)
    return None


def _body_site(structure: Structure, private_schemes: dict[str, str]) -> dict[str, Any]:
    """Observation.bodySite: the structure's property type, laterality in the text."""
    return {"coding": [_coding(structure.property_type, private_schemes)], "text": structure.label}


def _uncertainty_annotation(result: PipelineResult, structure_key: str, concept: str) -> dict[str, Any]:
    """Observation.interpretation (N, or H/L past the limit) and a note for an uncertainty score."""
    if (concept not in UNCERTAINTY_CONCEPTS or not isinstance(result, UncertainPipelineResult)
            or result.uncertainty is None):
        return {}
    report = result.uncertainty
    scores = report.scores_for(structure_key)
    exceeded = scores.exceeded(report.limits) if scores is not None else {}
    code, display = _PAST_LIMIT.get(concept, ("H", "High")) if concept in exceeded else ("N", "Normal")
    note = (f"Segmentation uncertainty from {report.n_samples} samples ({report.method}). "
            + (f"Past its limit, human review required: {exceeded[concept]}." if concept in exceeded
               else "Within its limit."))
    return {"interpretation": [{"coding": [{"system": V3_INTERPRETATION, "code": code, "display": display}]}],
            "note": [{"text": note}]}


def build_report_bundle(
    volume: Volume,
    result: PipelineResult,
    sr_dataset: Dataset,
    algorithm: AlgorithmInfo,
    *,
    conclusion: str | None = None,
    conclusion_codes: list[dict[str, str]] | None = None,
    presented_forms: list[tuple[str, bytes, str]] | None = None,
    patient_identifier_system: str | None = None,
) -> Bundle:
    """A transaction Bundle reporting the SR's measurements for the study of ``volume``.

    Patient, ImagingStudy and Device are created only if no resource with the same identifier exists
    (``ifNoneExist``); the DiagnosticReport and Observations are always new. ``patient_identifier_system``
    is the FHIR system of the site's Patient IDs; without it the Patient is matched on the value alone.
    A result with uncertainty gives its score Observations an interpretation and a note, and a flagged
    study a DiagnosticReport conclusion and conclusionCode saying it needs human review.
    """
    study = volume.study
    private_schemes = {str(i.CodingSchemeDesignator): str(i.CodingSchemeUID)
                       for i in sr_dataset.get("CodingSchemeIdentificationSequence", []) if "CodingSchemeUID" in i}
    structures = {s.structure.key: s.structure for s in result.segments}
    effective = _study_datetime(study)
    issued = datetime.now(timezone.utc).isoformat(timespec="seconds")
    accession = _accession_identifier(study)

    patient, patient_query = _patient(study, patient_identifier_system)
    patient_entry = _entry(patient, patient_query)
    subject = {"reference": patient_entry["fullUrl"]}

    study_uid = str(study.StudyInstanceUID)
    imaging_study: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "identifier": [_uid_identifier(study_uid)] + ([accession] if accession else []),
        "status": "available",
        "subject": subject,
        "modality": [{"system": CODE_SYSTEMS["DCM"], "code": volume.modality}],
        "series": [{
            "uid": str(study.SeriesInstanceUID),
            "modality": {"system": CODE_SYSTEMS["DCM"], "code": volume.modality},
            "numberOfInstances": len(volume.source),
            **({"number": int(study.SeriesNumber)} if study.get("SeriesNumber") is not None else {}),
            **({"description": str(study.SeriesDescription)} if study.get("SeriesDescription") else {}),
        }],
    }
    if effective:
        imaging_study["started"] = effective
    if study.get("StudyDescription"):
        imaging_study["description"] = str(study.StudyDescription)
    study_entry = _entry(imaging_study, f"identifier={DICOM_UID_SYSTEM}|urn:oid:{study_uid}")

    device: dict[str, Any] = {
        "resourceType": "Device",
        "manufacturer": algorithm.manufacturer,
        "deviceName": [{"name": algorithm.name, "type": "model-name"}],
        "version": [{"value": algorithm.version}],
        "serialNumber": algorithm.device_serial_number,
    }
    observer_uid = _device_observer_uid(sr_dataset)
    if observer_uid:
        device["identifier"] = [_uid_identifier(observer_uid)]
    device_entry = _entry(device, f"identifier={DICOM_UID_SYSTEM}|urn:oid:{observer_uid}" if observer_uid else None)

    observation_entries = []
    for row in read_measurements(sr_dataset):
        structure = structures[row["structure"]]
        method_text = f"{algorithm.name} {algorithm.version}"
        method: dict[str, Any] = {"text": method_text}
        if row["derivation"]:
            method = {"coding": [_coding(row["derivation"], private_schemes)],
                      "text": f"{row['derivation']['meaning']} ({method_text})"}
        observation = {
            "resourceType": "Observation",
            "status": "preliminary",
            "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]}],
            "code": {"coding": [_coding(row["concept"], private_schemes)],
                     "text": f"{structure.label} {row['concept']['meaning']}"},
            "subject": subject,
            "issued": issued,
            "bodySite": _body_site(structure, private_schemes),
            "valueQuantity": {"value": Decimal(repr(float(row["value"]))), "unit": row["unit"],
                              "system": CODE_SYSTEMS["UCUM"], "code": row["unit"]},
            "method": method,
            "device": {"reference": device_entry["fullUrl"]},
            "derivedFrom": [{"reference": study_entry["fullUrl"]}],
        }
        if effective:
            observation["effectiveDateTime"] = effective
        observation.update(_uncertainty_annotation(result, row["structure"], row["concept"]["value"]))
        observation_entries.append(_entry(observation))

    report_code = procedure_reported(volume.modality)
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [_uid_identifier(str(sr_dataset.SOPInstanceUID))] + ([accession] if accession else []),
        "status": "preliminary",
        "category": [{"coding": [{"system": V2_0074, "code": "RAD", "display": "Radiology"},
                                 {"system": CODE_SYSTEMS["LN"], "code": "LP29684-5", "display": "Radiology"}]}],
        "code": {"coding": [{"system": CODE_SYSTEMS["LN"], "code": report_code.value, "display": report_code.meaning}
                            if report_code.scheme_designator == "LN" else DIAGNOSTIC_IMAGING_STUDY]},
        "subject": subject,
        "issued": issued,
        "imagingStudy": [{"reference": study_entry["fullUrl"]}],
        "result": [{"reference": e["fullUrl"]} for e in observation_entries],
    }
    if accession:
        report["basedOn"] = [{"type": "ServiceRequest", "identifier": accession}]
    if effective:
        report["effectiveDateTime"] = effective
    if isinstance(result, UncertainPipelineResult) and result.uncertainty and result.uncertainty.needs_review:
        # Marked in the report itself so any FHIR consumer (worklist, EHR) sees it, not only the node.
        reasons = "; ".join(result.uncertainty.review_reasons)
        conclusion = f"{conclusion + ' ' if conclusion else ''}Flagged for human review: {reasons}."
        report["conclusionCode"] = [{"coding": [_coding(NEEDS_REVIEW, private_schemes)]}]
    if conclusion:
        report["conclusion"] = conclusion
    if conclusion_codes:
        report.setdefault("conclusionCode", []).extend({"coding": [_coding(code, private_schemes)]}
                                                       for code in conclusion_codes)
    if presented_forms:
        report["presentedForm"] = [{"contentType": content_type, "language": "en",
                                    "data": base64.b64encode(data).decode("ascii"), "title": title}
                                   for content_type, data, title in presented_forms]
    entries = [patient_entry, study_entry, device_entry, *observation_entries, _entry(report)]
    return Bundle.model_validate({"resourceType": "Bundle", "type": "transaction", "entry": entries})


def bundle_to_json(bundle: Bundle) -> str:
    """The Bundle as FHIR JSON (no empty elements), ready to POST to a FHIR server's base URL."""
    return bundle.model_dump_json(exclude_none=True, by_alias=True)
