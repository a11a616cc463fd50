"""radnode: an imaging-AI routing node (DICOM in, MONAI Deploy pipelines, SEG/SR/FHIR out)."""

__version__ = "0.1.0"
ALGORITHM_VENDOR = "radnode"
