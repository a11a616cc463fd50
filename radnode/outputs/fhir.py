"""The report as a FHIR R4 transaction Bundle an EHR can file: Patient, ImagingStudy, Devices, Observations,
DiagnosticReport and a Provenance, each written idempotently.

Numbers come from the TID 1500 SR (:func:`radnode.outputs.sr.read_measurements`), not from the pipeline
objects, so the FHIR values are exactly those of the DICOM report. The shape follows the HL7 "DICOM SR to
FHIR Resource Mapping" IG's imaging measurement profiles where R4 has the elements: one measurement-group
Observation per structure, identified by its Tracking UID, with one Observation per measurement as members,
identified by the measurement's Observation UID; ``partOf`` and ``derivedFrom`` the ImagingStudy and the
SR; ``bodySite`` with laterality coded; ``method``; ``device``. Measurements compared with a reference
range carry ``referenceRange`` and a v3 ``interpretation``; segmentation-uncertainty scores are quality
checks, coded as such, never "normal". Every AI-made resource has the HL7 security label AIAST, and a
Provenance names the algorithm and the node as devices.

Idempotent writes: every entry is conditional on a business identifier (conditional update ``PUT
Type?identifier=system|value``, conditional create for the Patient and the Devices), and the identifiers
are stable across runs of the same study (:func:`radnode.outputs.algorithm.stable_uid`), so a retried POST
or a re-issued report updates what is there and never duplicates it. A re-issue says so: status
``corrected``. Patient identity is only ever matched on system *and* value.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from pydicom import Dataset

import radnode
from radnode.config import FhirConfig
from radnode.imaging.identity import StudyIdentity
from radnode.imaging.volume import Volume
from radnode.outputs.algorithm import AlgorithmInfo, stable_uid
from radnode.outputs.sr import procedure_reported, read_measurements
from radnode.results import PipelineResult, Structure
from radnode.uncertainty import NEEDS_REVIEW, NO_REVIEW_NEEDED, UNCERTAINTY_CONCEPTS, UncertainPipelineResult

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
DICOM_IDENTIFIER_TYPE = "http://hl7.org/fhir/uv/dicom-sr/CodeSystem/dicom-identifier-type"
"""The DICOM SR to FHIR IG's identifier types (observation-uid, tracking-uid, sop-instance-uid, …)."""
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
V3_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
V3_OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
V3_DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
PROVENANCE_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DATA_ABSENT_REASON = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
URI_SYSTEM = "urn:ietf:rfc:3986"
AI_ASSERTED = {"system": V3_OBSERVATION_VALUE, "code": "AIAST", "display": "Artificial Intelligence asserted"}
"""HL7 security label for content an AI system asserted (AI Transparency on FHIR IG), in ``meta.security``."""
DIAGNOSTIC_IMAGING_STUDY = {"system": CODE_SYSTEMS["LN"], "code": "18748-4", "display": "Diagnostic imaging study"}
"""DiagnosticReport.code when the modality has no LOINC study code in :data:`radnode.outputs.sr.PROCEDURE_REPORTED`."""
MEASUREMENT_GROUP = {"system": CODE_SYSTEMS["DCM"], "code": "125007", "display": "Measurement Group"}
STUDY_INSTANCE_UID_TYPE = {"coding": [{"system": CODE_SYSTEMS["DCM"], "code": "110180",
                                       "display": "Study Instance UID"}]}
DEVICE_OBSERVER_UID = ("121012", "DCM")
LATERAL_BODY_SITES = {
    ("39607008", "7771000"): ("44029006", "Left lung structure"),
    ("39607008", "24028007"): ("3341006", "Right lung structure"),
    ("64033007", "7771000"): ("18639004", "Left kidney structure"),
    ("64033007", "24028007"): ("9846003", "Right kidney structure"),
}
"""(SNOMED CT structure, laterality) → the precoordinated SNOMED CT concept of that side, so left and right
carry different coded body sites (a laterality qualifier alone is lost by most EHR displays)."""
_INTERPRETATION = {"H": "High", "L": "Low", "N": "Normal"}


@dataclass
class ReportContent:
    """What the report stage adds to the measurements: text, coded findings and the forms of the report."""

    findings: Any = None
    """:class:`radnode.report.findings.StructuredFindings` the text was written from (reference ranges)."""
    conclusion: str | None = None
    conclusion_codes: list[dict[str, str]] = field(default_factory=list)
    presented_forms: list[tuple[str, bytes, str]] = field(default_factory=list)
    """(content type, bytes, title) of each form of the report (text, PDF)."""


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


def _uid_identifier(uid: str, identifier_type: str | None = None) -> dict[str, Any]:
    """A DICOM UID as a FHIR Identifier (system urn:dicom:uid, value urn:oid:…), typed as the IG types it."""
    identifier: dict[str, Any] = {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}
    if identifier_type:
        identifier["type"] = {"coding": [{"system": DICOM_IDENTIFIER_TYPE, "code": identifier_type}]}
    return identifier


def _query(identifier: dict[str, Any]) -> str:
    return f"identifier={identifier['system']}|{identifier['value']}"


def _entry(resource: dict[str, Any], *, update_on: dict[str, Any] | None = None,
           create_unless: dict[str, Any] | None = None, update_id: str | None = None) -> dict[str, Any]:
    """A transaction entry under a fresh urn:uuid: a conditional update on ``update_on``, a conditional create
    unless ``create_unless`` exists, or an update of the resource with id ``update_id``."""
    rtype = resource["resourceType"]
    if update_on is not None:
        request = {"method": "PUT", "url": f"{rtype}?{_query(update_on)}"}
    elif create_unless is not None:
        request = {"method": "POST", "url": rtype, "ifNoneExist": _query(create_unless)}
    elif update_id is not None:
        resource["id"] = update_id
        request = {"method": "PUT", "url": f"{rtype}/{update_id}"}
    else:
        raise ValueError(f"{rtype}: every entry is conditional (a retried POST must never duplicate)")
    return {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": resource, "request": request}


def _absent(reason: str = "unknown") -> dict[str, Any]:
    """An element carrying only the data-absent-reason extension (the value is missing or unusable)."""
    return {"extension": [{"url": DATA_ABSENT_REASON, "valueCode": reason}]}


def _study_datetime(identity: StudyIdentity, study: Dataset) -> str | None:
    """Study Date/Time as a FHIR dateTime; a time without DICOM offset is taken in the node's time zone."""
    if identity.study_date is None:
        return None
    time = "".join(ch for ch in identity.study_time.split(".")[0] if ch.isdigit()).ljust(6, "0")[:6]
    try:
        moment = datetime.strptime(identity.study_date.strftime("%Y%m%d") + time, "%Y%m%d%H%M%S")
    except ValueError:
        moment = datetime.strptime(identity.study_date.strftime("%Y%m%d"), "%Y%m%d")
    offset = str(study.get("TimezoneOffsetFromUTC", "") or "")
    if offset:
        try:
            moment = moment.replace(tzinfo=datetime.strptime(offset, "%z").tzinfo)
        except ValueError:
            pass
    return moment.astimezone().isoformat()


def _issuer_oid(study: Dataset, sequence: str) -> str | None:
    """The ISO Universal Entity ID of an issuer sequence (e.g. Issuer of Patient ID Qualifiers), if given."""
    for item in study.get(sequence, []) or []:
        if str(item.get("UniversalEntityIDType", "")) == "ISO" and item.get("UniversalEntityID"):
            return str(item.UniversalEntityID)
    return None


def identifier_systems(study: Dataset, config: FhirConfig, uid_root: str) -> tuple[str, str, list[str]]:
    """(patient ID system, accession system, warnings). The configured system first, then the issuer the
    DICOM names as an OID, else a system of this node's own (an OID under ``uid_root``, one per Issuer of
    Patient ID): never a bare value, so an EHR never merges two patients whose IDs happen to be equal."""
    warnings = []
    patient = config.patient_identifier_system
    if patient is None and (oid := _issuer_oid(study, "IssuerOfPatientIDQualifiersSequence")):
        patient = f"urn:oid:{oid}"
    if patient is None:
        issuer = str(study.get("IssuerOfPatientID", "") or "")
        patient = f"urn:oid:{stable_uid(uid_root, 'patient-id-system', issuer)}"
        warnings.append(f"fhir.patient_identifier_system is not set: Patient IDs are written in the node's own "
                        f"system {patient}, which the EHR cannot link to its patients")
    accession = config.accession_system
    if accession is None:
        for item in study.get("IssuerOfAccessionNumberSequence", []) or []:
            if str(item.get("UniversalEntityIDType", "")) == "ISO" and item.get("UniversalEntityID"):
                accession = f"urn:oid:{item.UniversalEntityID}"
    if accession is None:
        accession = f"urn:oid:{stable_uid(uid_root, 'accession-system')}"
        warnings.append(f"fhir.accession_system is not set: accession numbers are written in the node's own "
                        f"system {accession}")
    return patient, accession, warnings


def _patient(identity: StudyIdentity, study: Dataset, system: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Patient resource from the DICOM Patient module and the identifier it is matched on."""
    identifier = {"use": "usual", "type": {"coding": [{"system": V2_0203, "code": "MR"}]}, "system": system,
                  "value": identity.patient_id}
    resource: dict[str, Any] = {"resourceType": "Patient", "identifier": [identifier], "gender": identity.gender}
    if identity.patient_name:
        name = study.PatientName
        human_name: dict[str, Any] = {"text": identity.patient_name}
        if name.family_name:
            human_name["family"] = name.family_name
        if name.given_name:
            human_name["given"] = name.given_name.split()
        resource["name"] = [human_name]
    if identity.birth_date:
        resource["birthDate"] = identity.birth_date.isoformat()
    return resource, identifier


def _device_observer_uid(sr: Dataset) -> str | None:
    """Device Observer UID (DCM 121012) from the SR's observation context."""
    for item in sr.get("ContentSequence", []):
        concept = item.ConceptNameCodeSequence[0]
        if (concept.CodeValue, concept.CodingSchemeDesignator) == DEVICE_OBSERVER_UID:
            return str(item.UID)
    return None


def _body_site(structure: Structure, private_schemes: dict[str, str]) -> dict[str, Any]:
    """Observation.bodySite: the side's own SNOMED CT concept where one exists, else the structure's type."""
    site = structure.property_type
    laterality = structure.laterality
    lateral = LATERAL_BODY_SITES.get((str(site.value), str(laterality.value))) if laterality is not None else None
    if lateral is not None and site.scheme_designator == "SCT":
        return {"coding": [{"system": CODE_SYSTEMS["SCT"], "code": lateral[0], "display": lateral[1]}],
                "text": structure.label}
    return {"coding": [_coding(site, private_schemes)], "text": structure.label}


def _quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": Decimal(repr(float(value))), "unit": unit, "system": CODE_SYSTEMS["UCUM"], "code": unit}


def _reference_range(finding: Any) -> dict[str, Any]:
    """referenceRange of a measurement compared with a literature range: its limits, ages and source."""
    reference, limit = finding.reference, finding.limit
    out: dict[str, Any] = {}
    if limit.lower is not None:
        out["low"] = _quantity(limit.lower, reference.unit)
    if limit.upper is not None:
        out["high"] = _quantity(limit.upper, reference.unit)
    if limit.age_band is not None:
        out["age"] = {"low": {"value": limit.age_band.min_years, "unit": "a", "system": CODE_SYSTEMS["UCUM"],
                              "code": "a"},
                      "high": {"value": limit.age_band.max_years, "unit": "a", "system": CODE_SYSTEMS["UCUM"],
                               "code": "a"}}
    out["text"] = (f"{reference.limit_text(limit)}; beyond it: {reference.finding}. {reference.description}. "
                   f"Source: {reference.source}")
    return out


def _clinical_interpretation(finding: Any) -> list[dict[str, Any]]:
    """v3 ObservationInterpretation of a measured finding: H or L past the limit (the finding), else N."""
    limit = finding.limit
    code = "N"
    if finding.present:
        code = "L" if limit.lower is not None and finding.quantity.value < limit.lower else "H"
    return [{"coding": [{"system": V3_INTERPRETATION, "code": code, "display": _INTERPRETATION[code]}]}]


def _quality_annotation(result: PipelineResult, structure_key: str, concept: str, unit: str,
                        private_schemes: dict[str, str]) -> dict[str, Any]:
    """A segmentation-uncertainty score as a quality check: interpretation "human review required" or "within
    uncertainty limits" (the SR's own codes, never v3 "Normal"), the limit as a non-clinical range, a note."""
    if (concept not in UNCERTAINTY_CONCEPTS or not isinstance(result, UncertainPipelineResult)
            or result.uncertainty is None):
        return {}
    report = result.uncertainty
    scores = report.scores_for(structure_key)
    exceeded = scores.exceeded(report.limits) if scores is not None else {}
    limit_name = {"UNC-MEAN": "max_mean", "UNC-BOUNDARY": "max_boundary", "UNC-AGREEMENT": "min_agreement"}[concept]
    limit = float(getattr(report.limits, limit_name))
    verdict = NEEDS_REVIEW if concept in exceeded else NO_REVIEW_NEEDED
    note = (f"Quality check of the automatic segmentation, not a clinical finding: uncertainty from "
            f"{report.n_samples} samples ({report.method}). "
            + (f"Past its limit, human review required: {exceeded[concept]}." if concept in exceeded
               else "Within its limit."))
    bound = "low" if limit_name.startswith("min") else "high"
    return {"interpretation": [{"coding": [_coding(verdict, private_schemes)], "text": str(verdict.meaning)}],
            "referenceRange": [{bound: _quantity(limit, unit),
                                "text": f"uncertainty.{limit_name}: review limit of the node, not a clinical range"}],
            "note": [{"text": note}]}


def _result_series(volume: Volume, instances: list[Dataset]) -> list[dict[str, Any]]:
    """ImagingStudy.series: the analysed series, then every result series the run wrote (SEG, SR, maps, PDF)."""
    study = volume.study
    series = [{
        "uid": str(study.SeriesInstanceUID),
        "modality": {"system": CODE_SYSTEMS["DCM"], "code": volume.modality},
        "numberOfInstances": len(volume.source),
        **({"number": int(study.SeriesNumber)} if study.get("SeriesNumber") is not None else {}),
        **({"description": str(study.SeriesDescription)} if study.get("SeriesDescription") else {}),
    }]
    for ds in instances:
        series.append({
            "uid": str(ds.SeriesInstanceUID),
            "modality": {"system": CODE_SYSTEMS["DCM"], "code": str(ds.Modality)},
            "numberOfInstances": 1,
            **({"number": int(ds.SeriesNumber)} if ds.get("SeriesNumber") is not None else {}),
            **({"description": str(ds.SeriesDescription)} if ds.get("SeriesDescription") else {}),
            "instance": [{"uid": str(ds.SOPInstanceUID),
                          "sopClass": {"system": URI_SYSTEM, "code": f"urn:oid:{ds.SOPClassUID}"},
                          **({"number": int(ds.InstanceNumber)} if ds.get("InstanceNumber") is not None else {})}],
        })
    return series


def report_uid(uid_root: str, study_uid: str, algorithm: AlgorithmInfo) -> str:
    """The DiagnosticReport's identifier: one per study and algorithm, the same on every (re-)run."""
    return stable_uid(uid_root, "diagnostic-report", study_uid, algorithm.name)


def node_device(uid_root: str, host: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The node that ran the pipeline and sent the report, as a Device, and its identifier."""
    identifier = _uid_identifier(stable_uid(uid_root, "radnode-node", host))
    return ({"resourceType": "Device", "identifier": [identifier], "manufacturer": radnode.ALGORITHM_VENDOR,
             "deviceName": [{"name": f"radnode node {host}", "type": "user-friendly-name"}],
             "version": [{"value": radnode.__version__}], "serialNumber": host,
             "type": {"text": "Imaging AI routing node"}}, identifier)


def build_report_bundle(
    volume: Volume,
    result: PipelineResult,
    sr_dataset: Dataset,
    algorithm: AlgorithmInfo,
    *,
    uid_root: str,
    content: ReportContent | None = None,
    fhir: FhirConfig | None = None,
    result_instances: list[Dataset] | None = None,
    reissue: bool = False,
) -> Bundle:
    """A transaction Bundle reporting the SR's measurements for the study of ``volume``.

    ``content``: the report text, its coded findings (reference ranges) and forms; ``fhir``: the identifier
    systems; ``result_instances``: the DICOM objects the run wrote (SEG, SR, maps, PDF), listed as series of
    the ImagingStudy; ``reissue``: this report replaces one already sent for the study (status ``corrected``).
    Missing patient data degrades, never fails: without a Patient ID there is no Patient and ``subject``
    says why (data-absent-reason); an unusable study date leaves the dates out.
    """
    content = content or ReportContent()
    fhir = fhir or FhirConfig()
    study = volume.study
    identity = StudyIdentity.from_dataset(study)
    private_schemes = {str(i.CodingSchemeDesignator): str(i.CodingSchemeUID)
                       for i in sr_dataset.get("CodingSchemeIdentificationSequence", []) if "CodingSchemeUID" in i}
    structures = {s.structure.key: s.structure for s in result.segments}
    findings = {(f.quantity.structure_key, f.reference.measurement.concept): f
                for f in (content.findings.findings if content.findings is not None else [])}
    effective = _study_datetime(identity, study)
    issued = datetime.now(timezone.utc).isoformat(timespec="seconds")
    status = "corrected" if reissue else "preliminary"
    patient_system, accession_system, _ = identifier_systems(study, fhir, uid_root)
    accession = ({"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]},
                  "system": accession_system, "value": identity.accession} if identity.accession else None)
    ai = {"security": [AI_ASSERTED]}

    entries: list[dict[str, Any]] = []
    if identity.patient_id:
        patient, patient_identifier = _patient(identity, study, patient_system)
        patient_entry = _entry(patient, create_unless=patient_identifier)
        entries.append(patient_entry)
        subject: dict[str, Any] = {"reference": patient_entry["fullUrl"]}
    else:
        subject = _absent("unknown")  # no Patient ID: nothing to identify the patient by

    study_uid = str(study.StudyInstanceUID)
    study_identifier = _uid_identifier(study_uid)
    imaging_study: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "identifier": [study_identifier] + ([accession] if accession else []),
        "status": "available",
        "subject": subject,
        "modality": [{"system": CODE_SYSTEMS["DCM"], "code": volume.modality}],
        "series": _result_series(volume, list(result_instances or [])),
    }
    if effective:
        imaging_study["started"] = effective
    if identity.study_description:
        imaging_study["description"] = identity.study_description
    study_entry = _entry(imaging_study, update_on=study_identifier)
    study_reference = {"reference": study_entry["fullUrl"], "type": "ImagingStudy",
                       "identifier": {**study_identifier, "type": STUDY_INSTANCE_UID_TYPE}}
    sr_reference = {"type": "DocumentReference",
                    "identifier": _uid_identifier(str(sr_dataset.SOPInstanceUID), "sop-instance-uid"),
                    "display": f"DICOM SR {sr_dataset.get('SeriesDescription', 'measurement report')}"}

    observer_uid = _device_observer_uid(sr_dataset)
    device_identifier = _uid_identifier(observer_uid) if observer_uid else _uid_identifier(
        stable_uid(uid_root, "algorithm-device", algorithm.name, algorithm.version, algorithm.device_serial_number))
    device = {"resourceType": "Device", "identifier": [device_identifier], "manufacturer": algorithm.manufacturer,
              "deviceName": [{"name": algorithm.name, "type": "model-name"}], "version": [{"value": algorithm.version}],
              "serialNumber": algorithm.device_serial_number, "type": {"text": "Image analysis algorithm"}}
    device_entry = _entry(device, create_unless=device_identifier)
    node, node_identifier = node_device(uid_root, algorithm.device_serial_number)
    node_entry = _entry(node, create_unless=node_identifier)
    entries += [study_entry, device_entry, node_entry]

    common = {"status": status, "subject": subject, "issued": issued, "device": {"reference": device_entry["fullUrl"]},
              "partOf": [study_reference], "derivedFrom": [study_reference, sr_reference],
              **({"effectiveDateTime": effective} if effective else {}),
              **({"basedOn": [{"type": "ServiceRequest", "identifier": accession}]} if accession else {})}
    groups: dict[str, dict[str, Any]] = {}
    members: list[dict[str, Any]] = []
    for row in read_measurements(sr_dataset):
        structure = structures[row["structure"]]
        concept = row["concept"]
        if not row["observation_uid"] or not row["tracking_uid"]:
            raise ValueError(f"SR measurement {concept['meaning']} of {row['structure']} has no Observation UID "
                             "or Tracking UID: FHIR writes are conditional on them")
        quality = concept["value"] in UNCERTAINTY_CONCEPTS
        method_text = f"{algorithm.name} {algorithm.version}"
        method: dict[str, Any] = {"text": method_text}
        if row["derivation"]:
            method = {"coding": [_coding(row["derivation"], private_schemes)],
                      "text": f"{row['derivation']['meaning']} ({method_text})"}
        named = concept["meaning"] + (f" ({row['derivation']['meaning']})" if row["derivation"] else "")
        observation: dict[str, Any] = {
            "resourceType": "Observation", "meta": ai,
            "identifier": [_uid_identifier(row["observation_uid"], "observation-uid")],
            "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]}],
            "code": {"coding": [_coding(concept, private_schemes)], "text": f"{structure.label} {named}"},
            **common,
            "bodySite": _body_site(structure, private_schemes),
            "valueQuantity": _quantity(row["value"], row["unit"]),
            "method": method,
        }
        if quality:
            observation["category"].append({"text": "Quality assessment of automatic segmentation"})
            observation.update(_quality_annotation(result, row["structure"], concept["value"], row["unit"],
                                                   private_schemes))
        elif (finding := findings.get((row["structure"], concept["value"]))) is not None:
            observation["referenceRange"] = [_reference_range(finding)]
            observation["interpretation"] = _clinical_interpretation(finding)
        member = _entry(observation, update_on=observation["identifier"][0])
        members.append(member)
        group = groups.get(row["structure"])
        if group is None:
            group_identifier = _uid_identifier(row["tracking_uid"], "tracking-uid")
            group = _entry({
                "resourceType": "Observation", "meta": ai, "identifier": [group_identifier],
                "category": [{"coding": [MEASUREMENT_GROUP]}],
                "code": {"coding": [_coding(row["finding_type"], private_schemes)] if row["finding_type"] else [],
                         "text": f"{structure.label} measurements"},
                **common, "bodySite": _body_site(structure, private_schemes),
                "focus": [{"identifier": {**_uid_identifier(row["tracking_uid"], "tracking-uid")},
                           "display": f"{structure.label} (tracked finding {row['structure']})"}],
                "hasMember": [],
            }, update_on=group_identifier)
            groups[row["structure"]] = group
        group["resource"]["hasMember"].append({"reference": member["fullUrl"]})

    report_code = procedure_reported(volume.modality)
    report_identifier = _uid_identifier(report_uid(uid_root, study_uid, algorithm))
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport", "meta": ai,
        "identifier": [report_identifier, _uid_identifier(str(sr_dataset.SOPInstanceUID), "sop-instance-uid")]
                      + ([accession] if accession else []),
        "status": status,
        "category": [{"coding": [{"system": V2_0074, "code": "RAD", "display": "Radiology"},
                                 {"system": CODE_SYSTEMS["LN"], "code": "LP29684-5", "display": "Radiology"}]}],
        "code": {"coding": [{"system": CODE_SYSTEMS["LN"], "code": report_code.value, "display": report_code.meaning}
                            if report_code.scheme_designator == "LN" else DIAGNOSTIC_IMAGING_STUDY]},
        "subject": subject,
        "issued": issued,
        "imagingStudy": [{"reference": study_entry["fullUrl"]}],
        "result": [{"reference": e["fullUrl"]} for e in (*groups.values(), *members)],
        **({"basedOn": [{"type": "ServiceRequest", "identifier": accession}]} if accession else {}),
        **({"effectiveDateTime": effective} if effective else {}),
    }
    conclusion = content.conclusion
    conclusion_codes = [{"coding": [_coding(code, private_schemes)]} for code in content.conclusion_codes]
    if isinstance(result, UncertainPipelineResult) and result.uncertainty and result.uncertainty.needs_review:
        # Marked in the report itself so any FHIR consumer (worklist, EHR) sees it, not only the node.
        reasons = "; ".join(result.uncertainty.review_reasons)
        conclusion = f"{conclusion + ' ' if conclusion else ''}Flagged for human review: {reasons}."
        conclusion_codes.insert(0, {"coding": [_coding(NEEDS_REVIEW, private_schemes)]})
    if conclusion:
        report["conclusion"] = conclusion
    if conclusion_codes:
        report["conclusionCode"] = conclusion_codes
    if content.presented_forms:
        report["presentedForm"] = [{"contentType": content_type, "language": "en",
                                    "data": base64.b64encode(data).decode("ascii"), "title": title}
                                   for content_type, data, title in content.presented_forms]
    report_entry = _entry(report, update_on=report_identifier)

    targets = [report_entry, *groups.values(), *members]
    provenance = {
        "resourceType": "Provenance",
        "target": [{"reference": e["fullUrl"]} for e in targets],
        "recorded": issued,
        "activity": {"coding": [{"system": V3_DATA_OPERATION, "code": "UPDATE" if reissue else "CREATE"}]},
        "reason": [{"coding": [AI_ASSERTED]}],
        "agent": [
            {"type": {"coding": [{"system": PROVENANCE_PARTICIPANT, "code": "author", "display": "Author"}]},
             "who": {"reference": device_entry["fullUrl"], "display": f"{algorithm.name} {algorithm.version}"}},
            {"type": {"coding": [{"system": PROVENANCE_PARTICIPANT, "code": "assembler", "display": "Assembler"}]},
             "who": {"reference": node_entry["fullUrl"], "display": node["deviceName"][0]["name"]}},
        ],
        "entity": [{"role": "source", "what": study_reference}],
    }
    # Provenance has no business identifier in R4: an update of a resource id derived from the report's identifier.
    provenance_id = "radnode-" + hashlib.sha256(report_identifier["value"].encode()).hexdigest()[:40]
    entries += [*groups.values(), *members, report_entry, _entry(provenance, update_id=provenance_id)]
    return Bundle.model_validate({"resourceType": "Bundle", "type": "transaction", "entry": entries})


def bundle_to_json(bundle: Bundle) -> str:
    """The Bundle as FHIR JSON (no empty elements), ready to POST to a FHIR server's base URL."""
    return bundle.model_dump_json(exclude_none=True, by_alias=True)
