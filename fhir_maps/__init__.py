"""Pure DICOM → FHIR mappings (no network, disk or database; never imports gateway)."""
