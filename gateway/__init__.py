"""imaging-gateway: a FHIR-integrated DICOM gateway."""
