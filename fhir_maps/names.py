"""DICOM Person Name (PN) → FHIR HumanName.

A PN value (PS3.5 6.2.1.1) has up to three component groups separated by ``=``: alphabetic,
ideographic and phonetic. Each group has up to five components separated by ``^``: family
name, given name, middle name, prefix, suffix. For example
``Yamada^Tarou=山田^太郎=やまだ^たろう``.

Mapping (FHIR R4 datatypes.html#HumanName):

* family → ``family``; given and middle → ``given`` (FHIR given "includes middle names");
  prefix → ``prefix``; suffix → ``suffix``; a display form → ``text``.
* One HumanName per non-empty group. When more than one group is present, each carries the
  core extension ``iso21090-EN-representation`` (``ABC`` alphabetic, ``IDE`` ideographic,
  ``SYL`` phonetic/syllabic) so a receiver can tell them apart.
* Components are kept whole (``Mary Ann`` stays one given name): DICOM does not say where a
  component's words split. Extra components beyond five and groups beyond three are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fhir_maps.dicom_values import clean_text

#: http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation (R4 and R5 core
#: extension on HumanName; value set name-v3-representation: ABC | IDE | SYL).
REPRESENTATION_EXTENSION = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"
_REPRESENTATIONS = ("ABC", "IDE", "SYL")


@dataclass(frozen=True)
class NameParts:
    """The five components of one PN component group (absent → None)."""

    family: str | None = None
    given: str | None = None
    middle: str | None = None
    prefix: str | None = None
    suffix: str | None = None

    def is_empty(self) -> bool:
        return not any((self.family, self.given, self.middle, self.prefix, self.suffix))


def split_person_name(value: str | None) -> tuple[NameParts, NameParts, NameParts]:
    """The alphabetic, ideographic and phonetic groups of a PN value.

    Parameters
    ----------
    value
        PN text as decoded from the data set, e.g. ``Doe^John^^Dr`` or
        ``Yamada^Tarou=山田^太郎=やまだ^たろう``.

    Returns
    -------
    tuple of NameParts
        Always three groups; missing ones are empty.
    """
    groups = (value or "").split("=")[:3]
    groups += [""] * (3 - len(groups))
    parts: list[NameParts] = []
    for group in groups:
        components = [clean_text(c) for c in group.split("^")[:5]]
        components += [None] * (5 - len(components))
        parts.append(NameParts(*components))
    return parts[0], parts[1], parts[2]


def _text(parts: NameParts, *, alphabetic: bool) -> str | None:
    if alphabetic:  # western order: prefix given middle family suffix
        words = (parts.prefix, parts.given, parts.middle, parts.family, parts.suffix)
    else:  # ideographic and phonetic names are written family first
        words = (parts.prefix, parts.family, parts.given, parts.middle, parts.suffix)
    return " ".join(w for w in words if w) or None


def display_name(value: str | None) -> str | None:
    """A one-line display form of a PN (e.g. for ``Reference.display``).

    The alphabetic group in western order (``Dr John Doe``), else the ideographic group,
    else the phonetic group, family name first.
    """
    for index, parts in enumerate(split_person_name(value)):
        if not parts.is_empty():
            return _text(parts, alphabetic=index == 0)
    return None


def human_names(value: str | None) -> list[dict[str, Any]]:
    """FHIR HumanName list for a PN value (empty when the name is empty).

    Parameters
    ----------
    value
        PN text (see :func:`split_person_name`).

    Returns
    -------
    list of dict
        One HumanName per non-empty component group, alphabetic first. A non-empty family
        name component is always kept as ``family``.
    """
    groups = split_person_name(value)
    present = [(i, g) for i, g in enumerate(groups) if not g.is_empty()]
    names: list[dict[str, Any]] = []
    for index, parts in present:
        name: dict[str, Any] = {}
        if len(present) > 1:
            name["extension"] = [{"url": REPRESENTATION_EXTENSION,
                                  "valueCode": _REPRESENTATIONS[index]}]
        text = _text(parts, alphabetic=index == 0)
        if text:
            name["text"] = text
        if parts.family:
            name["family"] = parts.family
        given = [g for g in (parts.given, parts.middle) if g]
        if given:
            name["given"] = given
        if parts.prefix:
            name["prefix"] = [parts.prefix]
        if parts.suffix:
            name["suffix"] = [parts.suffix]
        names.append(name)
    return names
