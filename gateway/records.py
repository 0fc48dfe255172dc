"""From a received Part 10 file to the record the index keeps.

:func:`read_instance` parses a file's header without loading large values (pixel data is
skipped over, never decoded), checks that the file is complete, and extracts an
:class:`InstanceRecord`: the patient, study, series and instance attributes that C-FIND,
QIDO-RS and the FHIR mapping need (PS3.4 C.6.1/C.6.2 required and common optional keys;
PS3.18 Tables 10.6.3-3..5).
"""

from __future__ import annotations

import os
import struct
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag
from pydicom.uid import AllTransferSyntaxes

from gateway.errors import InvalidInstance, OutOfResources
from gateway.storage import is_valid_uid

#: Deflated Explicit VR Little Endian: offsets in the parsed data refer to the inflated stream.
_DEFLATED = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"}
_KNOWN_SYNTAXES = frozenset(str(uid) for uid in AllTransferSyntaxes)

PATIENT_KEYWORDS = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate",
                    "PatientSex")
STUDY_KEYWORDS = ("StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
                  "ReferringPhysicianName", "TimezoneOffsetFromUTC", "PatientAge", "PatientSize",
                  "PatientWeight")
#: Study-level attributes kept as DICOM JSON (sequences the FHIR mapping and QIDO return).
STUDY_JSON_KEYWORDS = ("IssuerOfAccessionNumberSequence", "IssuerOfPatientIDQualifiersSequence",
                       "ProcedureCodeSequence", "ReasonForPerformedProcedureCodeSequence",
                       "NameOfPhysiciansReadingStudy", "OtherPatientIDsSequence",
                       "ReferringPhysicianIdentificationSequence")
SERIES_KEYWORDS = ("Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined",
                   "Laterality", "SeriesDate", "SeriesTime", "PerformedProcedureStepStartDate",
                   "PerformedProcedureStepStartTime", "InstitutionName", "StationName",
                   "PerformingPhysicianName", "OperatorsName", "Manufacturer", "ProtocolName")
SERIES_JSON_KEYWORDS = ("RequestAttributesSequence", "PerformingPhysicianIdentificationSequence",
                        "OperatorIdentificationSequence", "AnatomicRegionSequence")
INSTANCE_KEYWORDS = ("SOPClassUID", "InstanceNumber", "Rows", "Columns", "BitsAllocated",
                     "NumberOfFrames", "ContentDate", "ContentTime", "ContentLabel",
                     "AcquisitionDateTime")
#: Only these top-level elements are decoded; the others are skipped over (PS3.5 §7.1).
_WANTED_KEYWORDS = ("SpecificCharacterSet", "StudyInstanceUID", "SeriesInstanceUID",
                    "SOPInstanceUID", "SOPClassUID", "ConceptNameCodeSequence",
                    "DocumentTitle", *PATIENT_KEYWORDS, *STUDY_KEYWORDS, *STUDY_JSON_KEYWORDS,
                    *SERIES_KEYWORDS, *SERIES_JSON_KEYWORDS, *INSTANCE_KEYWORDS)
INTEGER_KEYWORDS = {"SeriesNumber", "InstanceNumber", "Rows", "Columns", "BitsAllocated",
                    "NumberOfFrames"}
PN_KEYWORDS = {"PatientName", "ReferringPhysicianName", "PerformingPhysicianName",
               "OperatorsName"}
_NOT_PLAIN_TEXT = INTEGER_KEYWORDS | PN_KEYWORDS


def normalize_pn(value: str) -> str:
    """A Person Name without its insignificant trailing separators (PS3.5 §6.2.1.1: trailing
    empty components and groups may be omitted), so ``DOE^JOHN^^^`` and ``DOE^JOHN`` are the
    same name to the matcher. Multiple values stay separated by ``\\``."""
    names = []
    for name in value.split("\\"):
        groups = [group.rstrip("^ ") for group in name.split("=")]
        names.append("=".join(groups).rstrip("="))
    return "\\".join(names)


@dataclass(frozen=True)
class InstanceRecord:
    """What the index keeps about one instance, grouped by query level.

    String values are as decoded by pydicom (Specific Character Set applied); multi-valued
    attributes are joined with ``\\`` as on the wire; absent or empty attributes are ``None``.
    """

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    patient: dict[str, Any] = field(default_factory=dict)
    study: dict[str, Any] = field(default_factory=dict)
    study_json: dict[str, Any] = field(default_factory=dict)
    series: dict[str, Any] = field(default_factory=dict)
    series_json: dict[str, Any] = field(default_factory=dict)
    instance: dict[str, Any] = field(default_factory=dict)


#: Tag of each keyword looked up (every indexed keyword from the start).
_TAGS: dict[str, int] = {}
_WANTED_TAGS = [int(t) for t in (tag_for_keyword(k) for k in _WANTED_KEYWORDS) if t is not None]


def _tag(keyword: str) -> int:
    tag = _TAGS.get(keyword)
    if tag is None:
        found = tag_for_keyword(keyword)
        if found is None:
            raise KeyError(keyword)
        tag = _TAGS[keyword] = int(found)
    return tag


for _keyword in _WANTED_KEYWORDS:
    _tag(_keyword)

Elements = dict[int, Any]  # DataElement or _Value
#: The simple reader's raw elements, by integer tag (BaseTag keys compare in Python: slow).
RawElements = dict[int, RawDataElement]


#: Character sets whose text decodes with one Python codec (no ISO 2022 code extensions).
_FAST_CODECS = {"": "latin_1", "ISO_IR 6": "latin_1", "ISO_IR 100": "latin_1",
                "ISO_IR 192": "utf_8"}
_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
             "UI", "UR", "UT"}
_VRS: dict[int, str] = {}
_JSON_TAGS = {int(t) for t in (tag_for_keyword(k) for k in
                               (*STUDY_JSON_KEYWORDS, *SERIES_JSON_KEYWORDS)) if t is not None}


class _Value:
    """A value decoded here rather than by pydicom (same ``.value`` interface; a plain slotted
    class because a frozen dataclass's ``__init__`` alone costs a microsecond)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _fast_value(raw: RawDataElement, codec: str | None) -> _Value | None:
    """Decode a text or US value directly, or None to let pydicom do it (sequences, other
    character sets, deferred values). Multiple values stay joined by '\\' as on the wire."""
    if raw.value is None:
        return None
    tag = int(raw.tag)
    vr = raw.VR or _VRS.get(tag)
    if vr is None:
        try:
            vr = _VRS[tag] = str(dictionary_VR(tag))
        except KeyError:
            return None
    if vr in _TEXT_VRS:
        if codec is None:
            return None
        return _Value(raw.value.decode(codec, "replace").strip(" \x00"))
    if vr == "US" and len(raw.value) >= 2:
        return _Value(int.from_bytes(raw.value[:2], "little" if raw.is_little_endian else "big"))
    return None


def _charset(value: Any) -> tuple[Any, str | None]:
    """pydicom's encodings for a Specific Character Set value, and the one Python codec that
    decodes its text when there is one (else None: pydicom must decode it)."""
    encoding = convert_encodings(value) if value else None
    codec = _FAST_CODECS.get(value.strip()) if isinstance(value, str) else None
    return encoding, codec


def _elements(ds: Dataset) -> Elements:
    """The (few, thanks to ``specific_tags``) top-level elements by integer tag, decoded once.

    Text and US values in the common character sets are decoded here: pydicom's conversion
    (with its hooks) costs ~40 µs per element, more than parsing the whole header."""
    charset = ds.get_item(0x00080005)
    encoding: Any = None
    codec: str | None = "latin_1"
    if charset is not None:
        value = convert_raw_data_element(charset).value if isinstance(charset, RawDataElement) \
            else charset.value
        encoding, codec = _charset(value)
    found: Elements = {}
    for element in ds.elements():
        if isinstance(element, RawDataElement):
            # Attributes kept as DICOM JSON need pydicom's DataElement (to_json_dict).
            fast = None if int(element.tag) in _JSON_TAGS else _fast_value(element, codec)
            if fast is not None:
                found[int(element.tag)] = fast
                continue
            element = convert_raw_data_element(element, encoding=encoding, ds=ds)
        found[int(element.tag)] = element
    return found


def _raw_elements(raw: RawElements) -> Elements:
    """:func:`_elements` for the simple reader's raw elements: the same values, but a pydicom
    Dataset is only built when an element needs pydicom (a sequence, another character set),
    which CT and MR headers rarely do (building one costs more than reading the header)."""
    charset = raw.get(_SPECIFIC_CHARACTER_SET)
    encoding: Any = None
    codec: str | None = "latin_1"
    if charset is not None:
        text = charset.value.decode("ascii", "replace").strip(" \x00") if charset.value \
            else ""
        # One value (the usual case) is the text itself; several go through pydicom.
        value = text if "\\" not in text else convert_raw_data_element(charset).value
        encoding, codec = _charset(value)
    found: Elements = {}
    ds: Dataset | None = None
    for tag, element in raw.items():
        fast = None if tag in _JSON_TAGS else _fast_value(element, codec)
        if fast is not None:
            found[tag] = fast
            continue
        if ds is None:
            ds = Dataset({BaseTag(number): value for number, value in raw.items()})
        found[tag] = convert_raw_data_element(element, encoding=encoding, ds=ds)
    return found


def _text(elements: Elements, keyword: str) -> Any:
    element = elements.get(_TAGS[keyword])
    if element is None:
        return None
    value = element.value
    if type(value) is str and keyword not in _NOT_PLAIN_TEXT:  # the common case, quickly
        return value.strip() or None
    if value is None or value == "":
        return None
    if keyword in INTEGER_KEYWORDS:
        try:
            return int(value)
        except (TypeError, ValueError):
            return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value).strip()
    if keyword in PN_KEYWORDS:
        text = normalize_pn(text)
    return text or None


def _json(elements: Elements, keywords: tuple[str, ...]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for keyword in keywords:
        element = elements.get(_tag(keyword))
        if element is not None and element.value not in (None, "", []):
            found[keyword] = element.to_json_dict(bulk_data_element_handler=None,
                                                  bulk_data_threshold=65536)
    return found


def _document_title(elements: Elements) -> str | None:
    """Instance title (FHIR instance.title): Content Label, else SR/KOS Concept Name meaning."""
    label = _text(elements, "ContentLabel")
    if label:
        return str(label)
    names = elements.get(_tag("ConceptNameCodeSequence"))
    if names is not None and names.value:
        meaning = names.value[0].get("CodeMeaning")
        return str(meaning) if meaning else None
    title = _text(elements, "DocumentTitle")
    return str(title) if title else None


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}


def _skip_fragments(handle: BinaryIO, position: int, size: int, order: str) -> int:
    """Walk encapsulated Pixel Data items (PS3.5 A.4) up to and past the Sequence Delimiter."""
    while position + 8 <= size:
        handle.seek(position)
        group, element, length = struct.unpack(order + "HHL", handle.read(8))
        position += 8
        if (group, element) == (0xFFFE, 0xE0DD):
            return position
        if (group, element) != (0xFFFE, 0xE000):
            raise InvalidInstance(f"malformed encapsulated pixel data at byte {position - 8}")
        position += length
    return size + 8  # ran out of data before the delimiter: truncated


def _check_complete(ds: Dataset, handle: BinaryIO, size: int) -> None:
    """Reject a file that ends inside an element or has garbage after its last one.

    Unneeded and large values are skipped with a seek, so a short file parses without error.
    From the end of the last element the parser kept, walk the remaining element headers
    (a few: pixel data, padding) and require that they end exactly at the end of the file.
    """
    position = handle.tell()
    tags = list(ds.keys())  # in file order
    if tags:
        last = ds.get_item(tags[-1], keep_deferred=True)
        if not isinstance(last, RawDataElement) or last.length == 0xFFFFFFFF:
            return  # an undefined length item: its delimiters were checked while parsing
        position = last.value_tell + last.length
    little = ds.is_little_endian if ds.is_little_endian is not None else True
    implicit = bool(ds.is_implicit_VR)
    order = "<" if little else ">"
    while position + 8 <= size:
        handle.seek(position)
        head = handle.read(12)
        vr = head[4:6]
        if implicit or not (b"AA" <= vr <= b"ZZ"):  # some writers switch to implicit VR
            length, header = struct.unpack(order + "L", head[4:8])[0], 8
        elif vr in _LONG_VRS:
            length, header = struct.unpack(order + "L", head[8:12])[0], 12
        else:
            length, header = struct.unpack(order + "H", head[6:8])[0], 8
        position += header
        if length != 0xFFFFFFFF:
            position += length
        elif head[:4] == (b"\xe0\x7f\x10\x00" if little else b"\x7f\xe0\x00\x10"):
            position = _skip_fragments(handle, position, size, order)  # encapsulated pixels
        else:
            return  # an undefined-length sequence: the parser found its delimiter
    if position > size:
        raise InvalidInstance(f"data set is truncated: {position - size} bytes missing")
    if position < size:
        handle.seek(position)
        if handle.read(size - position).strip(b"\x00"):
            raise InvalidInstance(
                f"data set is truncated or has {size - position} bytes of trailing garbage")


#: Every VR of PS3.5 Table 6.2-1, as it appears in an explicit VR element header.
_VRS_ON_WIRE = {vr.encode() for vr in (
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF",
    "OL", "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN",
    "UR", "US", "UT", "UV")}
_WANTED_SET = frozenset(_WANTED_TAGS)
_IMPLICIT_LE, _BIG_ENDIAN = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"
_PIXEL_DATA = 0x7FE00010
_SPECIFIC_CHARACTER_SET = 0x00080005
_ITEM_TAGS = {0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD}
_UNDEFINED = 0xFFFFFFFF
#: How much of a file the simple reader reads at once: the header of almost every object.
_HEAD_BYTES = 64 * 1024


class _File:
    """Bytes of an open file by position: from the first read when there, else ``pread``."""

    def __init__(self, handle: BinaryIO) -> None:
        self.fd = handle.fileno()
        self.size = os.fstat(self.fd).st_size
        self.head = handle.read(_HEAD_BYTES)

    def bytes(self, position: int, length: int) -> bytes:
        end = position + length
        if end <= len(self.head):
            return self.head[position:end]
        return os.pread(self.fd, length, position)


#: Header length (8 or 12 bytes) of an explicit VR element, by the VR as on the wire.
_HEADER_OF_VR = {vr: 12 if vr in _LONG_VRS else 8 for vr in _VRS_ON_WIRE}
_SHORT_HEADER = struct.Struct("<HH2sH")  # explicit VR: group, element, VR, 16-bit length
_IMPLICIT_HEADER = struct.Struct("<HHL")  # implicit VR: group, element, 32-bit length
_LONG_LENGTH = struct.Struct("<L")


def _read_simple(handle: BinaryIO) -> tuple[RawElements, str] | None:
    """The wanted top-level elements of an uncomplicated Part 10 file, read without pydicom's
    parser (which walks every element in Python objects: ~40 % of a C-STORE's CPU), or None
    to let pydicom read it.

    Uncomplicated: a file meta group in explicit VR little endian; a data set in implicit or
    explicit VR little endian (every compressed syntax is the latter) with known VRs; defined
    lengths everywhere except encapsulated Pixel Data. Everything else (big endian, deflate,
    undefined-length sequences, odd headers) goes to pydicom. Walks every element header to
    the end of the file, so a truncated file or trailing garbage is refused exactly as
    :func:`_check_complete` refuses them.
    """
    data = _File(handle)
    head, size = data.head, data.size
    if len(head) < 144 or head[128:132] != b"DICM":
        return None
    position, transfer_syntax = 132, None
    while position + 8 <= len(head) and head[position:position + 2] == b"\x02\x00":
        element, meta_vr = struct.unpack_from("<H2s", head, position + 2)
        if meta_vr in _LONG_VRS:
            length, header = struct.unpack_from("<L", head, position + 8)[0], 12
        elif meta_vr in _VRS_ON_WIRE:
            length, header = struct.unpack_from("<H", head, position + 6)[0], 8
        else:
            return None
        if length == _UNDEFINED or position + header + length > len(head):
            return None
        if element == 0x0010:
            value = head[position + header:position + header + length]
            transfer_syntax = value.decode("ascii", "replace").strip(" \x00")
        position += header + length
    if transfer_syntax is None or transfer_syntax in _DEFLATED or \
            transfer_syntax == _BIG_ENDIAN or transfer_syntax not in _KNOWN_SYNTAXES:
        return None
    implicit = transfer_syntax == _IMPLICIT_LE
    elements: RawElements = {}
    in_head = len(head) - 12  # element headers starting up to here lie wholly in ``head``
    # One pass over the element headers. This loop runs for every element of every stored
    # instance, so it works on ``head`` directly where it can and unpacks each header once.
    while position + 8 <= size:
        if position <= in_head:
            buffer, at = head, position
        else:
            buffer, at = data.bytes(position, 12), 0
        if implicit:
            group, element, length = _IMPLICIT_HEADER.unpack_from(buffer, at)
            header, vr_bytes = 8, None
        else:
            group, element, vr_bytes, length = _SHORT_HEADER.unpack_from(buffer, at)
            header = _HEADER_OF_VR.get(vr_bytes, 0)
            if header == 12:
                if len(buffer) - at < 12:
                    raise InvalidInstance("data set is truncated inside an element header")
                length = _LONG_LENGTH.unpack_from(buffer, at + 8)[0]
            elif not header:
                return None
        tag = group << 16 | element
        if tag in _ITEM_TAGS:
            return None
        value_position = position + header
        if length == _UNDEFINED:
            if tag != _PIXEL_DATA or implicit:
                return None  # an undefined-length sequence: pydicom finds its delimiter
            position = _skip_fragments(handle, value_position, size, "<")
            continue
        end = value_position + length
        if end > size:
            raise InvalidInstance(f"data set is truncated: {end - size} bytes missing")
        if tag in _WANTED_SET:
            elements[tag] = RawDataElement(
                BaseTag(tag), vr_bytes.decode() if vr_bytes else None, length,
                data.bytes(value_position, length), value_position, implicit, True)
        position = end
    if position > size:
        raise InvalidInstance(f"data set is truncated: {position - size} bytes missing")
    if position < size and data.bytes(position, size - position).strip(b"\x00"):
        raise InvalidInstance(
            f"data set is truncated or has {size - position} bytes of trailing garbage")
    return elements, transfer_syntax


_WARNINGS_LOCK = threading.Lock()


def read_instance(path: Path) -> InstanceRecord:
    """Parse the Part 10 file at ``path`` without loading pixel data and build its record.

    Raises
    ------
    InvalidInstance
        The file is not DICOM, is truncated, lacks a file meta Transfer Syntax, or a required
        UID (Study, Series, SOP Instance, SOP Class) is missing or invalid.
    """
    # catch_warnings swaps the process's global filter list: two threads in it at once would
    # leave one's "always" filter installed for good (and could each miss their warnings).
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with open(path, "rb") as handle:
                simple = _read_simple(handle)
                parsed: RawElements | Dataset
                if simple is None:
                    parsed, transfer_syntax = _read_with_pydicom(handle)
                else:
                    parsed, transfer_syntax = simple
        except OSError as exc:
            if exc.errno is None:  # pydicom reports some malformed data as OSError
                raise InvalidInstance(f"cannot parse data set: {exc}") from exc
            raise OutOfResources(f"cannot read received data: {exc.strerror or exc}") from exc
        except InvalidInstance:
            raise
        except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError,
                NotImplementedError, AttributeError, struct.error) as exc:
            raise InvalidInstance(f"cannot parse data set: {exc}") from exc
        except Exception as exc:  # pydicom raises a wide range on garbage; all mean the same
            raise InvalidInstance(f"cannot parse data set: {type(exc).__name__}: {exc}") from exc
        for warning in caught:
            text = str(warning.message)
            if "EOF" in text or "end of file" in text.lower() or "truncat" in text.lower():
                raise InvalidInstance(f"data set is truncated: {text}")
        if not is_valid_uid(transfer_syntax):
            raise InvalidInstance("file meta information has no valid Transfer Syntax UID")
        try:
            elements = _elements(parsed) if isinstance(parsed, Dataset) \
                else _raw_elements(parsed)
            record = _record(elements, transfer_syntax)
        except InvalidInstance:
            raise
        except Exception as exc:
            raise InvalidInstance(f"cannot parse data set: {type(exc).__name__}: {exc}") from exc
    return record


def _read_with_pydicom(handle: BinaryIO) -> tuple[Dataset, str]:
    handle.seek(0)
    ds = pydicom.dcmread(handle, defer_size=4096, force=False, specific_tags=_WANTED_TAGS)
    transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
    if transfer_syntax not in _DEFLATED:  # offsets there are in the inflated data
        _check_complete(ds, handle, os.fstat(handle.fileno()).st_size)
    return ds, transfer_syntax


def _record(elements: Elements, transfer_syntax: str) -> InstanceRecord:
    uids = {}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        element = elements.get(_tag(keyword))
        value = str(element.value).strip() if element is not None and element.value else ""
        if not is_valid_uid(value):
            shown = value[:80] if value else "missing"
            raise InvalidInstance(f"{keyword} is missing or not a valid UID ({shown!r})")
        uids[keyword] = value
    patient = {k: _text(elements, k) for k in PATIENT_KEYWORDS}
    patient["PatientID"] = patient["PatientID"] or ""
    patient["IssuerOfPatientID"] = patient["IssuerOfPatientID"] or ""
    study = {k: _text(elements, k) for k in STUDY_KEYWORDS}
    issuer_seq = elements.get(_tag("IssuerOfAccessionNumberSequence"))
    issuer = None
    if issuer_seq is not None and issuer_seq.value:
        item = issuer_seq.value[0]
        issuer = item.get("UniversalEntityID") or item.get("LocalNamespaceEntityID") or None
    study["IssuerOfAccessionNumber"] = str(issuer) if issuer else None
    series = {k: _text(elements, k) for k in SERIES_KEYWORDS}
    instance = {k: _text(elements, k) for k in INSTANCE_KEYWORDS}
    instance["DocumentTitle"] = _document_title(elements)
    instance.pop("SOPClassUID")
    return InstanceRecord(
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        sop_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        transfer_syntax_uid=transfer_syntax,
        patient=patient,
        study=study,
        study_json=_json(elements, STUDY_JSON_KEYWORDS),
        series=series,
        series_json=_json(elements, SERIES_JSON_KEYWORDS),
        instance=instance,
    )
