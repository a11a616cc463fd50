"""The report text as a Comprehensive SR of its own (Basic Diagnostic Imaging Report, TID 2000).

Every content item sits in a section container (CID 7001 headings, TID 2002 report narrative with CID 7002
elements): "Current Procedure Descriptions" holds the report's opening (patient, study, series analysed,
algorithms) and the AI disclaimer as Procedure Descriptions; Findings holds the findings, then what was not
assessed and the cautions, as Findings; Impressions the Impression. The observer is the algorithm as a
device. Evidence is the source series and the TID 1500 measurement report, whose numbers the text states.
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

DIAGNOSTIC_IMAGING_REPORT = Code("18748-4", "LN", "Diagnostic Imaging Report")
ENGLISH = Code("en-US", "RFC5646", "English (United States)")
SECTIONS = (
    (codes.cid7001.CurrentProcedureDescriptions, codes.cid7002.ProcedureDescription),
    (codes.cid7001.Findings, codes.cid7002.Finding),
    (codes.cid7001.Impressions, codes.cid7002.Impression),
)
"""(CID 7001 heading, CID 7002 element of its TEXT items), in report order."""


def _section(heading: Code, element: Code, lines: list[str]) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(name=heading, relationship_type="CONTAINS")
    container.ContentSequence = [hd.sr.TextContentItem(name=element, value=line, relationship_type="CONTAINS")
                                 for line in lines]
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
    texts = ([*report.opening, report.disclaimer], [*report.findings, *report.limitations], report.impression)
    root = hd.sr.ContainerContentItem(name=DIAGNOSTIC_IMAGING_REPORT, template_id="2000")
    root.ContentSequence = [
        *hd.sr.LanguageOfContentItemAndDescendants(language=ENGLISH),
        *context,
        *(_section(heading, element, lines) for (heading, element), lines in zip(SECTIONS, texts) if lines),
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
