"""gateway.dicom_binary: C-FIND answers encoded straight from DICOM JSON are, byte for byte,
what pydicom writes for the same data set (PS3.5 §7.1 element encoding, §6.2 padding and
value multiplicity, §7.5 sequences), in explicit and implicit VR Little Endian."""

from __future__ import annotations

from datetime import date
from io import BytesIO
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from gateway.dicom_binary import encode_json
from gateway.qr import answer_dataset

_TEXT_ALPHABET = st.characters(codec="utf-8", exclude_characters="\\=^\x00",
                               exclude_categories=("Cc", "Cs", "Zl", "Zp"))
_ASCII = st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\\=^")


def _words(alphabet: Any, size: int) -> Any:
    return st.text(alphabet, min_size=1, max_size=size).map(str.strip).filter(bool)


_uid = st.lists(st.integers(0, 99999), min_size=2, max_size=8).map(
    lambda parts: ".".join(str(p) for p in parts))
_date = st.dates(min_value=date(1900, 1, 1)).map(lambda d: d.strftime("%Y%m%d"))
_name = st.builds(lambda f, g: f"{f}^{g}", _words(_TEXT_ALPHABET, 10), _words(_TEXT_ALPHABET, 10))

#: keyword tag, VR, strategy for one value
FIELDS = {
    "00080020": ("DA", _date),
    "00080050": ("SH", _words(_ASCII, 16)),
    "00080061": ("CS", st.sampled_from(["CT", "MR", "SR", "PR"])),
    "00081030": ("LO", _words(_TEXT_ALPHABET, 20)),
    "00100010": ("PN", _name),
    "00100020": ("LO", _words(_ASCII, 20)),
    "0020000D": ("UI", _uid),
    "00201208": ("IS", st.integers(0, 99999)),
    "00280010": ("US", st.integers(0, 65535)),
}


@st.composite
def answers(draw: Any) -> dict[str, Any]:
    chosen = draw(st.lists(st.sampled_from(sorted(FIELDS)), unique=True, min_size=1))
    answer: dict[str, Any] = {}
    for tag in sorted(chosen):
        vr, values = FIELDS[tag]
        picked = draw(st.lists(values, min_size=0, max_size=3 if vr in ("CS", "UI") else 1))
        element: dict[str, Any] = {"vr": vr}
        if picked:
            element["Value"] = [{"Alphabetic": v} for v in picked] if vr == "PN" else picked
        answer[tag] = element
    if draw(st.booleans()):
        item = {"00081150": {"vr": "UI", "Value": [draw(_uid)]},
                "00081155": {"vr": "UI", "Value": [draw(_uid)]}}
        answer["00081110"] = {"vr": "SQ", "Value": [item]}
    return answer


def _pydicom_bytes(answer: dict[str, Any], implicit: bool) -> bytes:
    ds: Dataset = answer_dataset(answer)
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


@settings(max_examples=300, deadline=None)
@given(answer=answers(), implicit=st.booleans())
def test_encoded_like_pydicom(answer: dict[str, Any], implicit: bool) -> None:
    assert encode_json(answer, implicit=implicit) == _pydicom_bytes(answer, implicit)


def test_non_ascii_answers_declare_utf8() -> None:
    """PS3.5 §6.1.2.5.3: ISO_IR 192 when any text is outside the default repertoire."""
    answer = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Müller^Jörg"}]}}
    data = encode_json(answer, implicit=False)
    assert data is not None
    assert data.startswith(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 192")
    assert "Müller".encode() in data


@pytest.mark.parametrize("element", [
    {"vr": "OB", "InlineBinary": "AAAA"},
    {"vr": "OW", "BulkDataURI": "http://x/bulk"},
    {"vr": "AT", "Value": ["00100010"]},
])
def test_what_it_does_not_encode_is_left_to_pydicom(element: dict[str, Any]) -> None:
    assert encode_json({"7FE00010": element}, implicit=False) is None


def test_the_bytes_read_back() -> None:
    from pydicom.filereader import read_dataset

    answer = {"00080052": {"vr": "CS", "Value": ["STUDY"]},
              "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
              "00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^JOHN"}]}}
    data = encode_json(answer, implicit=True)
    assert data is not None
    ds = read_dataset(BytesIO(data), is_implicit_VR=True, is_little_endian=True)
    assert (ds.QueryRetrieveLevel, ds.StudyInstanceUID, str(ds.PatientName)) == \
        ("STUDY", "1.2.3", "DOE^JOHN")
