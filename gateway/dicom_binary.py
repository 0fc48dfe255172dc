"""DICOM JSON (PS3.18 Annex F) → a data set in Little Endian (PS3.5 §7), for C-FIND answers.

A C-FIND answer is a handful of short text values the query engine already has as DICOM
JSON (the same object QIDO-RS sends). Building a pydicom ``Dataset`` from it and encoding that
costs more than the query itself, so the lean Upper Layer encodes the JSON directly:

* values of the text VRs are joined with ``\\``, a Person Name's groups with ``=``, and padded
  to an even length (UI with NUL, the others with a space, PS3.5 §6.2);
* US/SS/UL/SL/FL/FD binary, SQ items with explicit lengths, explicit or implicit VR;
* text is UTF-8, and an answer with any non-ASCII text says so with Specific Character Set
  ``ISO_IR 192`` (0008,0005), as the pydicom path did.

Anything else (bulk data, a VR not listed here) returns None: the caller falls back to
pydicom. ``tests/test_dicom_binary.py`` checks the bytes against pydicom's for generated
answers.
"""

from __future__ import annotations

import struct
from typing import Any

from pydicom.valuerep import format_number_as_ds

_TEXT = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR",
                   "UT", "PN", "IS", "DS"})
_BINARY = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d"}
#: VRs with a 4-byte length (and 2 reserved bytes) in explicit VR (PS3.5 Table 7.1-1)
_LONG = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"})
_CHARSET = 0x00080005


class _Unsupported(Exception):
    pass


def encode_json(data: dict[str, Any], *, implicit: bool) -> bytes | None:
    """``data`` (DICOM JSON, keys are 8-hex-digit tags) as a Little Endian data set; None when
    it holds something this encoder leaves to pydicom."""
    try:
        utf8 = _has_non_ascii(data)
        elements = {int(tag, 16): value for tag, value in data.items()}
        if utf8:
            elements[_CHARSET] = {"vr": "CS", "Value": ["ISO_IR 192"]}
        return _dataset(elements, implicit)
    except (_Unsupported, ValueError, TypeError, struct.error):
        return None


def _dataset(elements: dict[int, dict[str, Any]], implicit: bool) -> bytes:
    out = bytearray()
    for tag in sorted(elements):
        element = elements[tag]
        vr = element.get("vr", "")
        out += _element(tag, vr, _value(vr, element, implicit), implicit)
    return bytes(out)


def _value(vr: str, element: dict[str, Any], implicit: bool) -> bytes:
    if "BulkDataURI" in element or "InlineBinary" in element:
        raise _Unsupported(vr)
    values = element.get("Value") or []
    if vr == "SQ":
        return b"".join(_item(_dataset({int(t, 16): v for t, v in item.items()}, implicit))
                        for item in values)
    if vr in _BINARY:
        return struct.pack(f"<{len(values)}{_BINARY[vr]}", *values)
    if vr not in _TEXT:
        raise _Unsupported(vr)
    text = "\\".join(_text(vr, v) for v in values)
    raw = text.encode("utf-8")
    if len(raw) % 2:
        raw += b"\x00" if vr == "UI" else b" "
    return raw


def _text(vr: str, value: Any) -> str:
    if value is None:
        return ""
    if vr == "PN":
        if not isinstance(value, dict):
            raise _Unsupported("PN")
        groups = [value.get(g, "") or "" for g in ("Alphabetic", "Ideographic", "Phonetic")]
        while groups and not groups[-1]:
            groups.pop()
        return "=".join(groups)
    if vr == "DS" and not isinstance(value, str):
        return str(format_number_as_ds(float(value)) if isinstance(value, float) else value)
    if vr == "IS" and not isinstance(value, str):
        return str(int(value))
    if not isinstance(value, str):
        raise _Unsupported(vr)
    return value


def _item(content: bytes) -> bytes:
    return struct.pack("<HHL", 0xFFFE, 0xE000, len(content)) + content


def _element(tag: int, vr: str, value: bytes, implicit: bool) -> bytes:
    group, elem = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack("<HHL", group, elem, len(value)) + value
    if vr in _LONG:
        return struct.pack("<HH2sHL", group, elem, vr.encode(), 0, len(value)) + value
    if len(value) > 0xFFFF:
        raise _Unsupported(vr)
    return struct.pack("<HH2sH", group, elem, vr.encode(), len(value)) + value


def _has_non_ascii(data: Any) -> bool:
    if isinstance(data, str):
        return not data.isascii()
    if isinstance(data, dict):
        return any(_has_non_ascii(v) for k, v in data.items() if k != "vr")
    if isinstance(data, list):
        return any(_has_non_ascii(v) for v in data)
    return False
