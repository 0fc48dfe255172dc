"""The exceptions ``fhir_maps`` raises.

::

    ValueError
     └── MappingError                  the facts cannot be mapped (e.g. no DICOMweb base URL)
          └── UnmappedPatientIdentity  no FHIR identifier can be given for (PatientID, Issuer)

Both derive from :class:`ValueError` so a caller that treats bad input as permanent (the
publisher's dead-letter state) can catch one class.
"""

from __future__ import annotations


class MappingError(ValueError):
    """The given facts or options cannot be turned into a valid FHIR resource."""


class UnmappedPatientIdentity(MappingError):
    """No FHIR ``Identifier`` can be given for a DICOM patient key.

    Raised when Patient ID (0010,0020) is empty, or when Issuer of Patient ID (0010,0021)
    names an issuer that has no configured identifier system (or is empty and no default
    system is configured). Guessing a system here would link the images to another site's
    patient with the same number (standards digest §8), so the caller must decide
    (configure the issuer, or hold the study for an operator).

    Attributes
    ----------
    patient_id, issuer
        The DICOM key that could not be mapped (issuer ``""`` when absent).
    """

    def __init__(self, message: str, patient_id: str, issuer: str) -> None:
        super().__init__(message)
        self.patient_id = patient_id
        self.issuer = issuer
