"""CT body-composition and lung application: model-free tissue segmentation, SEG + SR + FHIR out."""
