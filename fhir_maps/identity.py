"""The patient identity function: DICOM (Patient ID, Issuer) ⇄ FHIR ``Identifier``.

One rule, used in both directions, so that the publisher (which finds or creates the Patient
an ImagingStudy points to) and the cohort queries (which turn FHIR patients back into DICOM
keys for the index) can never disagree.

DICOM identifies a patient by Patient ID (0010,0020) *within* the namespace named by Issuer
of Patient ID (0010,0021) (PS3.3 C.7.1.1; the index keys patients the same way, an absent
issuer being ``""``). FHIR identifies it by ``Identifier.system`` + ``Identifier.value``
(R4 datatypes.html#Identifier) and is searched with the token ``system|value`` (R4
search.html#token; standards digest §8: ``Patient.identifier`` with ``system`` = the
issuer's URI).

Forward (:func:`patient_identity`): ``value`` = Patient ID; ``system`` =

1. the system configured for the issuer, when the issuer is present and configured;
2. the default system, when the issuer is absent (``""``) and a default is configured;
3. otherwise nothing: :class:`~fhir_maps.errors.UnmappedPatientIdentity` is raised.

There is deliberately no fallback from an *unconfigured* issuer to the default system, and
never an identifier without a system. Either would put two sites' "12345" into one FHIR
identity: a search ``identifier=12345`` or ``identifier=|12345`` matches every patient with
that number (or with that number and no system). This is the failure seen with Microsoft's
DICOMcast, which created Patients whose identifier had an empty system and then matched or
duplicated patients across issuers. An unmapped key is an operator's decision (configure
the issuer), not the mapper's.

Reverse (:func:`patient_keys`): an identifier ``(system, value)`` matches the keys
``(value, issuer)`` for every issuer configured to that system, plus ``(value, "")`` when
``system`` is the default. Identifiers with no system, no value, or a system nobody is
configured for match nothing. The two directions are inverse: every key returned maps
forward to the identifier it came from, and every mapped key is found again from its
identifier.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from fhir_maps.errors import UnmappedPatientIdentity
from fhir_maps.facts import IdentifierSystems

_SEARCH_ESCAPES = str.maketrans({"\\": "\\\\", "|": "\\|", ",": "\\,", "$": "\\$"})


class PatientKey(NamedTuple):
    """A DICOM patient key as the index stores it: Patient ID and issuer (``""`` if none)."""

    patient_id: str
    issuer: str


def search_token(system: str, value: str) -> str:
    """The FHIR token search value ``system|value`` (R4 search.html#token).

    ``\\``, ``|``, ``,`` and ``$`` inside the parts are escaped with a backslash (R4
    search.html#escaping). URL-encode the result when putting it in a query string.
    """
    return f"{system.translate(_SEARCH_ESCAPES)}|{value.translate(_SEARCH_ESCAPES)}"


@dataclass(frozen=True)
class PatientIdentity:
    """The FHIR identity of one DICOM patient key.

    Attributes
    ----------
    key
        The DICOM key it was made from.
    system, value
        ``Patient.identifier.system`` and ``.value``.
    """

    key: PatientKey
    system: str
    value: str

    @property
    def token(self) -> str:
        """``system|value`` for ``Patient?identifier=`` (escaped, not URL-encoded)."""
        return search_token(self.system, self.value)

    def identifier(self) -> dict[str, Any]:
        """The FHIR ``Identifier`` JSON: ``{"system": …, "value": …}``."""
        return {"system": self.system, "value": self.value}


def _normalise(value: str | None) -> str:
    return (value or "").strip()


def issuer_system(issuer: str | None, systems: IdentifierSystems) -> str | None:
    """The identifier system for values from ``issuer`` (rules 1–3 of the module doc).

    Parameters
    ----------
    issuer
        The DICOM issuer (Issuer of Patient ID, or of Accession Number); None or ``""`` when
        the value carries none.
    systems
        The configured issuer → system mapping and default.

    Returns
    -------
    str or None
        The configured system, or None when the issuer (or its absence) is not configured.
    """
    issuer = _normalise(issuer)
    if issuer:
        return systems.by_issuer.get(issuer)
    return systems.default


def patient_identity(patient_id: str | None, issuer: str | None,
                     systems: IdentifierSystems) -> PatientIdentity:
    """The FHIR identifier and search token for a DICOM (Patient ID, Issuer) key.

    Parameters
    ----------
    patient_id
        Patient ID (0010,0020).
    issuer
        Issuer of Patient ID (0010,0021); None or ``""`` when absent.
    systems
        Configured issuer → system mapping (``MappingOptions.patient_systems``).

    Returns
    -------
    PatientIdentity
        ``identifier()`` for ``Patient.identifier``, ``token`` for ``Patient?identifier=``.

    Raises
    ------
    UnmappedPatientIdentity
        Patient ID is empty; or the issuer is present but not configured; or the issuer is
        absent and no default system is configured. Never guessed: see the module doc.
    """
    value, key_issuer = _normalise(patient_id), _normalise(issuer)
    if not value:
        raise UnmappedPatientIdentity("the study has no Patient ID", value, key_issuer)
    system = issuer_system(key_issuer, systems)
    if system is None:
        if key_issuer:
            message = (f"no identifier system is configured for Issuer of Patient ID "
                       f"{key_issuer!r}")
        else:
            message = "the Patient ID has no issuer and no default identifier system is set"
        raise UnmappedPatientIdentity(message, value, key_issuer)
    return PatientIdentity(key=PatientKey(value, key_issuer), system=system, value=value)


def patient_keys(identifiers: Iterable[Mapping[str, Any]],
                 systems: IdentifierSystems) -> frozenset[PatientKey]:
    """The DICOM patient keys a list of FHIR identifiers matches (the reverse mapping).

    Parameters
    ----------
    identifiers
        FHIR ``Identifier`` objects, e.g. ``Patient.identifier`` of a cohort member.
    systems
        The same configuration the publisher uses.

    Returns
    -------
    frozenset of PatientKey
        Every ``(value, issuer)`` with ``issuer`` configured to the identifier's system, and
        ``(value, "")`` when the system is the default. Empty when nothing matches.
    """
    keys: set[PatientKey] = set()
    for identifier in identifiers:
        system, value = identifier.get("system"), identifier.get("value")
        if not isinstance(system, str) or not isinstance(value, str):
            continue
        value = value.strip()
        if not value or not system:
            continue
        keys.update(PatientKey(value, issuer) for issuer, configured
                    in systems.by_issuer.items() if configured == system)
        if systems.default == system:
            keys.add(PatientKey(value, ""))
    return frozenset(keys)
