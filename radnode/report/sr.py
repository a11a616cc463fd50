"""The report text as a Comprehensive SR of its own (Basic Diagnostic Imaging Report, TID 2000 layout).

Findings and Impression are TEXT items in their section containers, the limitations and the AI disclaimer
are Comments; the observer is the algorithm as a device. Evidence is the source series and the TID 1500
measurement report, whose numbers the text states.
"""

from __future__ import annotations

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.sr.codedict import codes

from radnode.imaging.volume import Volume
from radnode.outputs.algorithm import AlgorithmInfo, device_uid, new_uid
from radnode.outputs.layout import RunOutput
from radnode.report.generate import Report

DIAGNOSTIC_IMAGING_REPORT = Code("18748-4", "LN", "Diagnostic imaging report")
FINDINGS_SECTION = Code("121070", "DCM", "Findings")
FINDING = Code("121071", "DCM", "Finding")
IMPRESSIONS_SECTION = Code("121072", "DCM", "Impressions")
IMPRESSION = Code("121073", "DCM", "Impression")
COMMENT = Code("121106", "DCM", "Comment")
ENGLISH = Code("en-US", "RFC5646", "English (United States)")


def _text_items(concept: Code, lines: list[str]) -> list[hd.sr.TextContentItem]:
    return [hd.sr.TextContentItem(name=concept, value=line, relationship_type="CONTAINS") for line in lines]


def _section(concept: Code, item_concept: Code, lines: list[str]) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(name=concept, relationship_type="CONTAINS")
    container.ContentSequence = _text_items(item_concept, lines)
    return container


def build_text_report(volume: Volume, measurement_report: Dataset, report: Report, algorithm: AlgorithmInfo, *,
                      uid_root: str, series_number: int = RunOutput.REPORT_SR.series_number) -> hd.sr.ComprehensiveSR:
    """A Comprehensive SR holding the report text, preliminary (Completion Flag PARTIAL, unverified)."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(algorithm, uid_root), name=algorithm.name, manufacturer_name=algorithm.manufacturer,
            model_name=algorithm.name, serial_number=algorithm.device_serial_number),
    )
    context = hd.sr.ObservationContext(observer_device_context=observer)
    root = hd.sr.ContainerContentItem(name=DIAGNOSTIC_IMAGING_REPORT, template_id="2000")
    root.ContentSequence = [
        *hd.sr.LanguageOfContentItemAndDescendants(language=ENGLISH),
        *context,
        _section(FINDINGS_SECTION, FINDING, report.findings),
        _section(IMPRESSIONS_SECTION, IMPRESSION, report.impression),
        *_text_items(COMMENT, [*report.limitations, report.disclaimer]),
    ]
    return hd.sr.ComprehensiveSR(
        evidence=[*volume.source, measurement_report],
        content=root,
        series_instance_uid=new_uid(uid_root),
        series_number=series_number,
        sop_instance_uid=new_uid(uid_root),
        instance_number=1,
        manufacturer=algorithm.manufacturer,
        series_description=f"{algorithm.name} report (AI, preliminary)",
        is_complete=False,
        is_verified=False,
        contributing_equipment=[algorithm.contributing_equipment()],
    )
