"""The report PDF as a DICOM Encapsulated PDF instance, for PACS and viewers that do not render SR.

The same pages as ``report.pdf`` inside the study: patient, study and equipment copied from the analysed
series, the report SR as its source instance, Burned In Annotation YES (the pages name the patient).
Built with pydicom's Dataset API (highdicom has no Encapsulated Document class); dciodvfy checks it.
"""

from __future__ import annotations

from datetime import datetime

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, EncapsulatedPDFStorage, ExplicitVRLittleEndian

from radnode.imaging.volume import Volume
from radnode.outputs.algorithm import AlgorithmInfo, new_uid
from radnode.outputs.layout import RunOutput

PATIENT_AND_STUDY = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                     "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                     "AccessionNumber", "StudyDescription")


def build_encapsulated_pdf(volume: Volume, pdf: bytes, title: str, source_report: Dataset, algorithm: AlgorithmInfo,
                           *, uid_root: str,
                           series_number: int = RunOutput.REPORT_PDF_DICOM.series_number) -> Dataset:
    """An Encapsulated PDF Storage instance of ``pdf`` in the study of ``volume``, derived from ``source_report``."""
    study = volume.study
    now = datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = new_uid(uid_root)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for keyword in PATIENT_AND_STUDY:
        setattr(ds, keyword, study.get(keyword, "") or "")
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = new_uid(uid_root)
    ds.SeriesNumber = series_number
    ds.SeriesDescription = f"{algorithm.name} report (PDF, AI, preliminary)"[:64]
    ds.Manufacturer = algorithm.manufacturer
    ds.ManufacturerModelName = algorithm.name[:64]
    ds.SoftwareVersions = algorithm.version
    ds.ConversionType = "SYN"  # SC Equipment: synthetic document, made by software
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = title[:64]
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator = "18748-4", "LN"
    concept.CodeMeaning = "Diagnostic imaging report"
    ds.ConceptNameCodeSequence = [concept]
    source = Dataset()
    source.ReferencedSOPClassUID = source_report.SOPClassUID
    source.ReferencedSOPInstanceUID = source_report.SOPInstanceUID
    ds.SourceInstanceSequence = [source]
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    return ds

