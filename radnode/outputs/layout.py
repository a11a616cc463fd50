"""Every output a run can write, in one table: file name, format, SOP class, series number, which apps write it.

The writers (``operators/``) take their file names and series numbers from here, the run's manifest
(:mod:`radnode.execution`) checks what an app wrote against it, the MAP manifests (``app.json``'s
``output.format.files``, :mod:`radnode.map`) list it, and egress (:mod:`radnode.node.egress`) finds the FHIR
Bundle and the DICOM objects by it. A new output kind is one member of :class:`RunOutput` (its builder lives
in a file of its own beside the others); the table refuses two kinds that share a file name or a series
number, so viewers never sort two result series into one.

Series numbers are high (901…) so result series sort after the acquired ones in a viewer's study browser.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EncapsulatedPDFStorage,
    KeyObjectSelectionDocumentStorage,
    ParametricMapStorage,
    SegmentationStorage,
)

CT_TISSUE, MRI_BRAIN, MODEL_SEG = "ct_tissue", "mri_brain", "model_seg"
"""The built-in apps (``apps/<name>``), as :mod:`radnode.pipelines.registry` names them."""
EVERY_APP = frozenset({CT_TISSUE, MRI_BRAIN, MODEL_SEG})


class OutputFormat(str, Enum):
    """What kind of file an output is: how egress delivers it and how the manifest lists it."""

    DICOM = "dicom"
    """A DICOM object: C-STOREd (or STOW-RSed) to the DICOM destinations."""
    FHIR = "fhir"
    """A FHIR transaction Bundle: POSTed to the FHIR server."""
    DOCUMENT = "document"
    """A human-readable document (report text, PDF): kept in the outbox, carried inside the FHIR Bundle."""
    MANIFEST = "manifest"
    """The run's own record (``manifest.json``): what was written, measurements, time per phase."""


@dataclass(frozen=True)
class OutputSpec:
    """One output kind: where it lands in the output folder and what it is."""

    file: str
    """File name in the run's output folder (and the MAP's ``HOLOSCAN_OUTPUT_PATH``)."""
    format: OutputFormat
    media_type: str
    """IANA media type, as FHIR ``presentedForm`` and DICOMweb name it."""
    description: str
    apps: frozenset[str]
    """The built-in apps that write it on every successful run."""
    sop_class_uid: str | None = None
    """DICOM outputs: the SOP Class of the object."""
    series_number: int | None = None
    """DICOM outputs: the Series Number the object carries (unique per kind)."""
    modality: str | None = None
    """DICOM outputs: the Modality attribute of the object."""


class RunOutput(Enum):
    """The outputs of a run; ``RunOutput.SEG.file`` is ``seg.dcm``. One member per kind."""

    SEG = OutputSpec(
        file="seg.dcm", format=OutputFormat.DICOM, media_type="application/dicom",
        description="DICOM Segmentation (binary) of the structures found", apps=EVERY_APP,
        sop_class_uid=SegmentationStorage, series_number=901, modality="SEG")
    MEASUREMENT_SR = OutputSpec(
        file="sr.dcm", format=OutputFormat.DICOM, media_type="application/dicom",
        description="TID 1500 measurement report (Comprehensive 3D SR) referencing the SEG", apps=EVERY_APP,
        sop_class_uid=Comprehensive3DSRStorage, series_number=902, modality="SR")
    REPORT_SR = OutputSpec(
        file="report-sr.dcm", format=OutputFormat.DICOM, media_type="application/dicom",
        description="The verified report text in the TID 2000 layout (Comprehensive SR)", apps=EVERY_APP,
        sop_class_uid=ComprehensiveSRStorage, series_number=903, modality="SR")
    UNCERTAINTY_MAP = OutputSpec(
        file="uncertainty-map.dcm", format=OutputFormat.DICOM, media_type="application/dicom",
        description="Voxel-wise segmentation uncertainty (Parametric Map)", apps=frozenset({MRI_BRAIN, MODEL_SEG}),
        sop_class_uid=ParametricMapStorage, series_number=904, modality="OT")
    REPORT_PDF_DICOM = OutputSpec(
        file="report-pdf.dcm", format=OutputFormat.DICOM, media_type="application/dicom",
        description="The verified report's PDF as an Encapsulated PDF instance, for PACS that do not render SR",
        apps=EVERY_APP, sop_class_uid=EncapsulatedPDFStorage, series_number=905, modality="DOC")
    REJECTION_NOTE = OutputSpec(
        file="rejection-note.dcm", format=OutputFormat.DICOM, media_type="application/dicom",
        description="IHE IOCM rejection note (Key Object Selection, Rejected for Quality Reasons) withdrawing the "
                    "results a re-run superseded; written by the node's egress, not by an app", apps=frozenset(),
        sop_class_uid=KeyObjectSelectionDocumentStorage, series_number=906, modality="KO")
    REPORT_TEXT = OutputSpec(
        file="report.txt", format=OutputFormat.DOCUMENT, media_type="text/plain",
        description="The verified report as plain text", apps=EVERY_APP)
    REPORT_PDF = OutputSpec(
        file="report.pdf", format=OutputFormat.DOCUMENT, media_type="application/pdf",
        description="The verified report as PDF", apps=EVERY_APP)
    FHIR_BUNDLE = OutputSpec(
        file="fhir-bundle.json", format=OutputFormat.FHIR, media_type="application/fhir+json",
        description="FHIR R4 transaction Bundle: Patient, ImagingStudy, DiagnosticReport, Observations, Provenance",
        apps=EVERY_APP)
    REPORT_REISSUE = OutputSpec(
        file="fhir-reissue.json", format=OutputFormat.FHIR, media_type="application/json",
        description="A review decision's new status and reviewer for the FHIR report already sent (applied in "
                    "place by a FHIR destination); written by the node in review-<id>/, not by an app",
        apps=frozenset())
    MANIFEST = OutputSpec(
        file="manifest.json", format=OutputFormat.MANIFEST, media_type="application/json",
        description="The run's manifest: outputs, measurements, time per phase, review decision", apps=EVERY_APP)

    @property
    def file(self) -> str:
        return self.value.file

    @property
    def format(self) -> OutputFormat:
        return self.value.format

    @property
    def series_number(self) -> int:
        """The Series Number of a DICOM output (ValueError for one that is not DICOM)."""
        if self.value.series_number is None:
            raise ValueError(f"{self.name} ({self.file}) is not a DICOM output and has no series number")
        return self.value.series_number

    @property
    def sop_class_uid(self) -> str | None:
        return self.value.sop_class_uid


def _check_table() -> None:
    """Refuse, at import, two output kinds with one file name or one series number."""
    for attribute in ("file", "series_number"):
        seen: dict[object, str] = {}
        for output in RunOutput:
            value = getattr(output.value, attribute)
            if value is None:
                continue
            if value in seen:
                raise ValueError(f"output layout: {output.name} and {seen[value]} share {attribute} {value!r}")
            seen[value] = output.name


_check_table()

BY_FILE: dict[str, RunOutput] = {output.file: output for output in RunOutput}


def output_named(file: str) -> RunOutput | None:
    """The output kind of a file in a run's output folder; None for a file the table does not know."""
    return BY_FILE.get(file)


def outputs_of(app: str) -> list[RunOutput]:
    """What a built-in app writes on every successful run, in table order; [] for an app the table does not know
    (a site's own application)."""
    return [output for output in RunOutput if app in output.value.apps]


def is_dicom(file: str) -> bool:
    """Whether egress delivers ``file`` as a DICOM object: a DICOM output of the table, or a ``.dcm`` file the
    table does not know (a site application's result, a forward-only job's own instances)."""
    output = output_named(file)
    return output.format is OutputFormat.DICOM if output is not None else file.lower().endswith(".dcm")


REVIEW_FOLDER = "review-"
"""Prefix of the outbox folder a review decision's re-issued objects are written to (``review-<review id>/``,
:mod:`radnode.feedback.reissue`)."""


def review_folder(review_id: int) -> str:
    """The outbox folder of one review decision's re-issued objects."""
    return f"{REVIEW_FOLDER}{review_id}"


def review_of(delivery_object: str) -> int | None:
    """The review id of a delivery object in a decision's folder (``review-7/report-sr.dcm`` → 7); None else."""
    folder, _, rest = delivery_object.partition("/")
    number = folder[len(REVIEW_FOLDER):]
    return int(number) if rest and folder.startswith(REVIEW_FOLDER) and number.isdigit() else None


def dicom_files(files: Iterable[str]) -> list[str]:
    """The names among ``files`` that are DICOM objects (see :func:`is_dicom`), in the given order."""
    return [name for name in files if is_dicom(name)]


class OutputLayoutError(RuntimeError):
    """A run's output folder that does not match the layout: a missing output, another app's, a wrong SOP class."""


def layout_problems(app: str | None, files: Iterable[str]) -> list[str]:
    """What is wrong with the files a built-in app left in its output folder: an output it always writes that is
    missing, or an output of the table it never writes (e.g. left there by another pipeline's run). [] when all
    is as the table says, and for an app the table does not know (``None``: a site's own application)."""
    if app is None or not outputs_of(app):
        return []
    present = set(files) - {RunOutput.MANIFEST.file}
    expected = {output.file for output in outputs_of(app)} - {RunOutput.MANIFEST.file}
    problems = [f"{name} missing ({app} always writes it)" for name in sorted(expected - present)]
    for name in sorted(present - expected):
        output = output_named(name)
        if output is not None:
            problems.append(f"{name} is not an output of {app} (the layout's {output.name} is written by "
                            f"{', '.join(sorted(output.value.apps))})")
    return problems
