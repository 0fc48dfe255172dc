"""DICOM JSON (PS3.18 Annex F) to the Native DICOM Model XML (PS3.19 A.1), for DICOMweb
clients that ask for ``application/dicom+xml``.

The two models carry the same information; this module converts one JSON object (one data
set) into one ``<NativeDicomModel>`` document:

* ``<DicomAttribute tag="GGGGEEEE" vr="VR" keyword="Keyword">`` per attribute (keyword left
  out for private tags), in the JSON's (ascending tag) order;
* values as ``<Value number="n">``; person names as ``<PersonName number="n">`` with
  ``<Alphabetic>``/``<Ideographic>``/``<Phonetic>`` groups split into ``<FamilyName>``,
  ``<GivenName>``, ``<MiddleName>``, ``<NamePrefix>``, ``<NameSuffix>``;
* sequence items as ``<Item number="n">`` holding attributes;
* ``BulkDataURI`` as ``<BulkData uri="…"/>``, ``InlineBinary`` as ``<InlineBinary>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from xml.etree import ElementTree

from pydicom.datadict import keyword_for_tag

NAMESPACE = "http://dicom.nema.org/PS3.19/models/NativeDICOM"
_NAME_PARTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")


def _attributes(parent: ElementTree.Element, dataset: Mapping[str, Any]) -> None:
    for tag, element in dataset.items():
        attrs = {"tag": tag.upper(), "vr": str(element.get("vr", "UN"))}
        keyword = keyword_for_tag(int(tag, 16))
        if keyword:
            attrs["keyword"] = keyword
        node = ElementTree.SubElement(parent, "DicomAttribute", attrs)
        if "BulkDataURI" in element:
            ElementTree.SubElement(node, "BulkData", {"uri": str(element["BulkDataURI"])})
            continue
        if "InlineBinary" in element:
            ElementTree.SubElement(node, "InlineBinary").text = str(element["InlineBinary"])
            continue
        for number, value in enumerate(element.get("Value") or [], start=1):
            if attrs["vr"] == "SQ":
                item = ElementTree.SubElement(node, "Item", {"number": str(number)})
                _attributes(item, value or {})
            elif attrs["vr"] == "PN":
                _person_name(node, number, value or {})
            else:
                ElementTree.SubElement(node, "Value", {"number": str(number)}).text = \
                    "" if value is None else str(value)


def _person_name(node: ElementTree.Element, number: int, groups: Mapping[str, str]) -> None:
    name = ElementTree.SubElement(node, "PersonName", {"number": str(number)})
    for group in ("Alphabetic", "Ideographic", "Phonetic"):
        text = groups.get(group)
        if not text:
            continue
        group_node = ElementTree.SubElement(name, group)
        for part, value in zip(_NAME_PARTS, text.split("^"), strict=False):
            if value:
                ElementTree.SubElement(group_node, part).text = value


def to_xml(dataset: Mapping[str, Any]) -> bytes:
    """One DICOM JSON object as a PS3.19 Native DICOM Model document (UTF-8)."""
    root = ElementTree.Element("NativeDicomModel", {"xmlns": NAMESPACE})
    _attributes(root, dataset)
    return bytes(ElementTree.tostring(root, encoding="utf-8", xml_declaration=True))
