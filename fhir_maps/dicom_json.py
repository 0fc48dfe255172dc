"""Reading the DICOM JSON the index stores (PS3.18 Annex F) into facts.

The index keeps code sequences and multi-valued person names as the DICOM JSON of the
element, e.g. ``{"vr": "SQ", "Value": [{"00080100": {"vr": "SH", "Value": ["CTABD"]}, …}]}``.
These helpers accept that element object, or just its ``Value`` list, and never raise on
malformed input: an item that does not describe a code is skipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fhir_maps.dicom_values import clean_text
from fhir_maps.facts import CodedConcept

# Code Sequence Macro attributes (PS3.3 Table 8.8-1a) by tag, as DICOM JSON keys.
CODE_VALUE = "00080100"
CODING_SCHEME_DESIGNATOR = "00080102"
CODING_SCHEME_VERSION = "00080103"
CODE_MEANING = "00080104"
LONG_CODE_VALUE = "00080119"
URN_CODE_VALUE = "00080120"


def _values(element: object) -> Sequence[Any]:
    """The ``Value`` list of a DICOM JSON element, or the list itself."""
    if isinstance(element, Mapping):
        value = element.get("Value")
        return value if isinstance(value, list) else []
    if isinstance(element, list | tuple):
        return element
    return []


def _first_text(item: Mapping[str, Any], tag: str) -> str | None:
    values = _values(item.get(tag))
    return clean_text(values[0]) if values and isinstance(values[0], str | int) else None


def coded_concepts(element: object) -> tuple[CodedConcept, ...]:
    """CodedConcepts from a DICOM JSON code sequence (PS3.18 F.2.5 sequences).

    Parameters
    ----------
    element
        The stored element (``{"vr": "SQ", "Value": [item, …]}``), its ``Value`` list, or
        None.

    Returns
    -------
    tuple of CodedConcept
        One per item that has a code value (Code Value, Long Code Value or URN Code Value);
        items without one are skipped. The scheme is ``""`` when the item has none.
    """
    concepts: list[CodedConcept] = []
    for item in _values(element):
        if not isinstance(item, Mapping):
            continue
        code = (_first_text(item, CODE_VALUE) or _first_text(item, LONG_CODE_VALUE)
                or _first_text(item, URN_CODE_VALUE))
        if code is None:
            continue
        concepts.append(CodedConcept(
            code_value=code,
            coding_scheme=_first_text(item, CODING_SCHEME_DESIGNATOR) or "",
            code_meaning=_first_text(item, CODE_MEANING),
            scheme_version=_first_text(item, CODING_SCHEME_VERSION),
        ))
    return tuple(concepts)


def person_names(element: object) -> tuple[str, ...]:
    """PN text values (``alphabetic=ideographic=phonetic``) from a DICOM JSON PN element.

    PS3.18 F.2.2 encodes each PN value as an object with ``Alphabetic``, ``Ideographic`` and
    ``Phonetic`` members; this joins them back into the PS3.5 form the rest of the mapping
    reads (trailing empty groups dropped). Plain strings are taken as they are.
    """
    names: list[str] = []
    for value in _values(element):
        if isinstance(value, str):
            text = value.strip()
        elif isinstance(value, Mapping):
            groups = [value.get(key) for key in ("Alphabetic", "Ideographic", "Phonetic")]
            text = "=".join(g if isinstance(g, str) else "" for g in groups).rstrip("=")
        else:
            continue
        if text.strip("=^ "):
            names.append(text)
    return tuple(names)
