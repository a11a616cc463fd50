"""What a hospital's security review asks of the node: DICOM TLS, who may send, the IHE ATNA audit trail,
patient identifiers kept out of logs and files, de-identification for forwards, secrets, model sandboxing."""
