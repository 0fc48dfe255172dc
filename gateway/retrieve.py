"""Retrieve: find stored instances, read them, and hand them out in the form asked for.

Protocol-neutral (no HTTP, no DIMSE): WADO-RS and WADO-URI (``gateway/wado.py``) use it today,
C-MOVE and C-GET will use the same calls. The steps every retrieval takes:

1. :func:`locate` the instances of a study, series or instance in the index, ordered by Series
   Number, Instance Number, then UID (an optional extra SQL condition scopes it, e.g. to a
   cohort);
2. per instance, :func:`select_transfer_syntax` picks the syntax to send from the ones the peer
   accepts, preferring the stored one (then the stored bytes go out unchanged, byte for byte);
3. :func:`prepare` gives a :class:`Part10` that streams either the stored file as it is or the
   transcoded file (decompressed to a native syntax with the pydicom pixel plugins, optionally
   re-compressed losslessly); :func:`load_dataset` gives the transcoded data set in memory for
   ``pynetdicom``.

Pixel data access for WADO-RS frames and bulk data (PS3.18 §10.4.1.1.2 and §8.7.3.3) is here
too: :func:`native_frames` (uncompressed, little endian), :func:`compressed_frames` (the stored
code stream of each frame, as is), :func:`element_value` (one bulk data element), and
:func:`metadata` (the PS3.18 Annex F DICOM JSON of an instance, large values replaced by
BulkDataURIs).

Errors: :class:`~gateway.errors.InstanceMissing` when the index lists a blob the storage does
not have, :class:`~gateway.errors.TranscodeError` when the requested syntax cannot be produced;
``ValueError`` for an invalid UID or tag path (callers validate their input before calling).
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.encoders.base import get_encoder
from pydicom.pixels.utils import pixel_array
from pydicom.tag import BaseTag, Tag
from sqlalchemy import ColumnElement, select

from gateway.errors import InstanceMissing, TranscodeError
from gateway.index import Index, instance, patient, series, study
from gateway.storage import FileStorage, is_valid_uid

log = logging.getLogger("gateway.retrieve")

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"

#: Transfer syntaxes whose pixel data is not encapsulated (PS3.5 §A.1–A.5).
NATIVE_SYNTAXES = frozenset({IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN,
                             DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN})
#: Native syntaxes this module writes (Big Endian is retired, PS3.5 §A.3: read, never written).
NATIVE_TARGETS = frozenset({IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN,
                            DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN})
#: Syntaxes whose pixel data may have been compressed with loss (PS3.5 §8.2, §10): JPEG
#: baseline/extended, JPEG-LS near-lossless, JPEG 2000 (Part 1 and 2), HTJ2K, MPEG/HEVC video,
#: JPEG XL. Such data is only available lossy, whatever it is transcoded to.
LOSSY_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.203",
    *(f"1.2.840.10008.1.2.4.{n}" for n in range(100, 109)), "1.2.840.10008.1.2.4.112",
})
#: Lossless compressions this module can produce (encoder plugin installed): re-compressing
#: keeps the SOP Instance UID (PS3.5 §8.2: only lossy compression changes the object).
_ENCODABLE = tuple(uid for uid in (RLE_LOSSLESS, JPEG2000_LOSSLESS)
                   if get_encoder(uid).is_available)
ENCODABLE_SYNTAXES = frozenset(_ENCODABLE)

_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
#: Value representations whose values are bytes (PS3.5 Table 6.2-1) and may be bulk data.
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
#: Binary values longer than this many bytes are sent as BulkDataURI rather than inline.
BULK_THRESHOLD = 1024
_TAG_PATH_RE = re.compile(r"^[0-9A-F]{8}(/(0|[1-9][0-9]{0,8})/[0-9A-F]{8})*$")
_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


# -- locate ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Located:
    """One stored instance as the index knows it: enough to send it or to refuse it."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    blob_key: str
    blob_size: int
    rows: int | None
    number_of_frames: int | None

    @property
    def is_image(self) -> bool:
        """True when the instance has pixel data (the index holds its Rows)."""
        return self.rows is not None


def _uid_list(name: str, value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    for uid in values:
        if not is_valid_uid(uid):
            raise ValueError(f"{name} is not a valid UID: {str(uid)[:80]!r}")
    return values


def locate(index: Index, study_uid: str | Sequence[str] | None = None,
           series_uid: str | Sequence[str] | None = None,
           sop_uid: str | Sequence[str] | None = None, *,
           where: ColumnElement[bool] | None = None) -> list[Located]:
    """The stored instances matching the given UIDs, in retrieval order.

    Parameters
    ----------
    index
        The index to read.
    study_uid, series_uid, sop_uid
        Study, Series and SOP Instance UIDs: one UID or a list of them (a C-MOVE identifier
        may carry UID lists, PS3.4 C.4.2.2.1); ``None`` does not constrain that level.
    where
        An extra SQLAlchemy condition over the ``patient``, ``study``, ``series`` and
        ``instance`` tables (e.g. a cohort scope); all four are joined.

    Returns
    -------
    list of Located
        Ordered by Study Instance UID, Series Number, Series Instance UID, Instance Number,
        then SOP Instance UID (numbers that are absent sort last). Empty when nothing matches.

    Raises
    ------
    ValueError
        A UID is not valid (PS3.5 §9.1), or nothing at all constrains the selection.
    """
    studies = _uid_list("Study Instance UID", study_uid)
    serieses = _uid_list("Series Instance UID", series_uid)
    sops = _uid_list("SOP Instance UID", sop_uid)
    if studies is None and serieses is None and sops is None and where is None:
        raise ValueError("locate() needs a UID or a condition")
    stmt = (
        select(study.c.StudyInstanceUID, series.c.SeriesInstanceUID,
               instance.c.SOPInstanceUID, instance.c.SOPClassUID,
               instance.c.TransferSyntaxUID, instance.c.blob_key, instance.c.blob_size,
               instance.c.Rows, instance.c.NumberOfFrames)
        .select_from(instance.join(series, instance.c.series_id == series.c.id)
                     .join(study, series.c.study_id == study.c.id)
                     .join(patient, study.c.patient_id == patient.c.id))
        .order_by(study.c.StudyInstanceUID, series.c.SeriesNumber.asc().nulls_last(),
                  series.c.SeriesInstanceUID, instance.c.InstanceNumber.asc().nulls_last(),
                  instance.c.SOPInstanceUID))
    for column, values in ((study.c.StudyInstanceUID, studies),
                           (series.c.SeriesInstanceUID, serieses),
                           (instance.c.SOPInstanceUID, sops)):
        if values is not None:
            stmt = stmt.where(column == values[0] if len(values) == 1 else column.in_(values))
    if where is not None:
        stmt = stmt.where(where)
    with index.engine.connect() as conn:
        return [Located(*row) for row in conn.execute(stmt)]


# -- choosing a transfer syntax -------------------------------------------------------------------
def can_decode(transfer_syntax: str) -> bool:
    """True when pixel data in ``transfer_syntax`` can be decoded here (native, or a decoder
    plugin for it is installed)."""
    if transfer_syntax in NATIVE_SYNTAXES:
        return True
    try:
        return bool(get_decoder(transfer_syntax).is_available)
    except (NotImplementedError, ValueError):
        return False


def can_transcode(source: str, target: str, *, has_pixels: bool = True) -> bool:
    """True when an instance stored in ``source`` can be sent in ``target``.

    Any source this module can decode can be written in a native syntax (Explicit/Implicit VR
    Little Endian, Deflated) or losslessly re-compressed with an installed encoder (RLE, JPEG
    2000 lossless). Lossy targets are never produced: that would make a new object (PS3.5
    §8.2). Without pixel data only the native syntaxes apply.
    """
    if source == target:
        return True
    if target in NATIVE_TARGETS:
        return not has_pixels or can_decode(source)
    if target in ENCODABLE_SYNTAXES:
        return has_pixels and can_decode(source)
    return False


def select_transfer_syntax(stored: str, acceptable: Sequence[str], *, has_pixels: bool = True,
                           excluded: frozenset[str] = frozenset()) -> str | None:
    """The transfer syntax to send an instance stored in ``stored`` in.

    Parameters
    ----------
    stored
        The instance's stored transfer syntax.
    acceptable
        The syntaxes the peer accepts, most preferred first; ``"*"`` stands for "any" (the
        stored one, or Explicit VR Little Endian when the stored one is excluded).
    has_pixels
        Whether the instance has pixel data (otherwise no codec is needed to convert it).
    excluded
        Syntaxes never to send (PS3.18 §8.7.3: Implicit VR Little Endian and Explicit VR Big
        Endian are not used on the web).

    Returns
    -------
    str or None
        The stored syntax whenever it is acceptable (the stored bytes go out unchanged),
        otherwise the first acceptable syntax it can be transcoded to; ``None`` if none.
    """
    candidates: list[str] = []
    for uid in acceptable:
        if uid == "*":
            uid = stored if stored not in excluded else EXPLICIT_VR_LITTLE_ENDIAN
        if uid not in excluded and uid not in candidates:
            candidates.append(uid)
    if stored in candidates:
        return stored
    for uid in candidates:
        if can_transcode(stored, uid, has_pixels=has_pixels):
            return uid
    return None


def offered_syntaxes(stored: str, *, has_pixels: bool = True,
                     excluded: frozenset[str] = frozenset()) -> list[str]:
    """Every transfer syntax an instance stored in ``stored`` can be sent in (for messages
    telling a client what it could ask for instead)."""
    offered = [stored] + [uid for uid in (EXPLICIT_VR_LITTLE_ENDIAN,
                                          DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
                                          IMPLICIT_VR_LITTLE_ENDIAN, *_ENCODABLE)
                          if uid != stored and can_transcode(stored, uid, has_pixels=has_pixels)]
    return [uid for uid in offered if uid not in excluded]


# -- reading and transcoding ----------------------------------------------------------------------
def blob_path(storage: FileStorage, item: Located) -> Path:
    """The stored file of ``item``; raises :class:`InstanceMissing` when it is not there."""
    try:
        path = storage.path_for(item.blob_key)
    except ValueError as exc:
        raise InstanceMissing(f"SOP Instance {item.sop_uid}: the index holds a malformed "
                              "storage key") from exc
    except OSError as exc:  # an object store that cannot be read now
        raise InstanceMissing(f"SOP Instance {item.sop_uid}: {exc}") from exc
    if not path.is_file():
        raise InstanceMissing(f"SOP Instance {item.sop_uid} is indexed but its stored file is "
                              "missing (index and storage disagree; `imaging-gateway reindex` "
                              "rebuilds the index from storage)")
    return path


def read_dataset(storage: FileStorage, item: Located, *, defer: bool = False,
                 stop_before_pixels: bool = False) -> Dataset:
    """Parse the stored file. ``defer`` leaves values over :data:`BULK_THRESHOLD` bytes on
    disk until used (not for Deflated files, whose offsets refer to the inflated stream)."""
    path = blob_path(storage, item)
    defer_size = BULK_THRESHOLD if defer and not _is_deflated(item) else None
    try:
        return pydicom.dcmread(path, defer_size=defer_size,
                               stop_before_pixels=stop_before_pixels)
    except FileNotFoundError as exc:
        raise InstanceMissing(f"SOP Instance {item.sop_uid}: stored file vanished") from exc
    except Exception as exc:
        raise InstanceMissing(f"SOP Instance {item.sop_uid}: stored file unreadable: "
                              f"{exc}") from exc


def _is_deflated(item: Located) -> bool:
    return item.transfer_syntax_uid == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN


def transcode(ds: Dataset, target: str) -> None:
    """Convert ``ds`` (as read from a Part 10 file) to ``target`` in place.

    Encapsulated pixel data is decoded (YBR colour converted to RGB, as pydicom does,
    Photometric Interpretation updated), then written natively or re-compressed losslessly.
    The SOP Instance UID is kept: nothing here loses information that was not already lost.

    Raises
    ------
    TranscodeError
        No codec for this conversion, or the codec failed on this data.
    """
    source = str(ds.file_meta.TransferSyntaxUID)
    if source == target:
        return
    has_pixels = any(tag in ds for tag in _PIXEL_TAGS)
    if not can_transcode(source, target, has_pixels=has_pixels):
        raise TranscodeError(f"cannot convert SOP Instance {ds.get('SOPInstanceUID')} from "
                             f"{_name(source)} to {_name(target)}")
    with _codec(f"converting SOP Instance {ds.get('SOPInstanceUID')} from {_name(source)} "
                f"to {_name(target)}"):
        if source == EXPLICIT_VR_BIG_ENDIAN:
            _swap_to_little_endian(ds)
        if "PixelData" in ds and source not in NATIVE_SYNTAXES:
            ds.decompress(generate_instance_uid=False)
        if target in ENCODABLE_SYNTAXES:
            ds.compress(target, generate_instance_uid=False)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(target)


@contextmanager
def _codec(what: str) -> Iterator[None]:
    """Work of the pixel codecs: any failure inside is a :class:`TranscodeError` saying
    ``what`` failed. That includes a codec written in Rust panicking on corrupt data
    (pylibjpeg-rle, through pyo3): its PanicException is a BaseException, which an ``except
    Exception`` lets through, up to the request's thread."""
    try:
        yield
    except Exception as exc:
        raise TranscodeError(f"{what} failed: {exc}") from exc
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        raise TranscodeError(f"{what} failed: the decoder crashed ({exc})") from exc


def _name(uid: str) -> str:
    return f"{pydicom.uid.UID(uid).name} ({uid})"


def _swap_to_little_endian(ds: Dataset) -> None:
    """Byte-swap the binary values of a data set read as Explicit VR Big Endian (PS3.5 §7.3:
    OW/OF/OL/OD/OV values are byte-ordered like numbers; OB and UN are not)."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _swap_to_little_endian(item)
        elif elem.VR in _SWAP_WIDTH and elem.value:
            width = _SWAP_WIDTH[elem.VR]
            elem.value = np.frombuffer(elem.value, dtype=f">u{width}").astype(
                f"<u{width}").tobytes()


def write_part10(ds: Dataset, out: IO[bytes]) -> None:
    """Write ``ds`` as a Part 10 file in the transfer syntax its file meta names."""
    target = str(ds.file_meta.TransferSyntaxUID)
    # force_encoding: a data set read as Big Endian is written Little Endian (values swapped
    # by transcode()); pydicom refuses that conversion otherwise.
    pydicom.dcmwrite(out, ds, implicit_vr=target == IMPLICIT_VR_LITTLE_ENDIAN,
                     little_endian=True, force_encoding=True)


def load_dataset(storage: FileStorage, item: Located, transfer_syntax: str) -> Dataset:
    """The instance as a data set in ``transfer_syntax`` (for a DIMSE C-STORE sub-operation).

    When ``transfer_syntax`` is the stored one, sending :func:`blob_path` itself keeps the
    bytes exact and costs no decoding; this is for the other cases.
    """
    ds = read_dataset(storage, item)
    transcode(ds, transfer_syntax)
    return ds


class Part10:
    """One instance ready to stream as a Part 10 file in :attr:`transfer_syntax`.

    :attr:`transcoded` is False when the stored bytes go out unchanged. Created by
    :func:`prepare`, which does any transcoding up front so that failures surface there,
    before a response has started.
    """

    def __init__(self, item: Located, transfer_syntax: str, source: Path | IO[bytes]) -> None:
        self.item = item
        self.transfer_syntax = transfer_syntax
        self._source = source

    @property
    def transcoded(self) -> bool:
        return not isinstance(self._source, Path)

    def chunks(self, size: int = 1 << 20) -> Iterator[bytes]:
        """The file's bytes in chunks of at most ``size`` bytes; closes the source after."""
        handle: IO[bytes]
        if isinstance(self._source, Path):
            try:
                handle = open(self._source, "rb")  # noqa: SIM115 (closed below)
            except FileNotFoundError as exc:
                raise InstanceMissing(f"SOP Instance {self.item.sop_uid}: stored file "
                                      "vanished") from exc
        else:
            handle = self._source
            handle.seek(0)
        with handle:
            while chunk := handle.read(size):
                yield chunk

    def close(self) -> None:
        """Release a transcoded copy that was never streamed."""
        if not isinstance(self._source, Path):
            self._source.close()


def prepare(storage: FileStorage, item: Located, transfer_syntax: str) -> Part10:
    """Ready ``item`` for sending in ``transfer_syntax``.

    The stored file itself when the syntax is the stored one (byte-exact); otherwise the
    instance is transcoded now into a spooled temporary file (memory up to 32 MiB, then disk).

    Raises
    ------
    InstanceMissing
        The stored file is missing or unreadable.
    TranscodeError
        The instance cannot be converted to ``transfer_syntax``.
    """
    if transfer_syntax == item.transfer_syntax_uid:
        return Part10(item, transfer_syntax, blob_path(storage, item))
    ds = load_dataset(storage, item, transfer_syntax)
    spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=32 << 20)  # noqa: SIM115
    try:
        write_part10(ds, spool)
    except Exception as exc:
        spool.close()
        raise TranscodeError(f"writing SOP Instance {item.sop_uid} as "
                             f"{_name(transfer_syntax)} failed: {exc}") from exc
    return Part10(item, transfer_syntax, spool)


# -- pixel data ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PixelInfo:
    """What a frame request needs to know about an instance's pixel data."""

    transfer_syntax: str
    frames: int
    rows: int
    columns: int
    samples: int
    bits_allocated: int
    #: byte offset of the Pixel Data value in the stored file (None: not seekable, e.g. Deflated)
    value_offset: int | None
    encapsulated: bool
    #: Extended Offset Table (7FE0,0001)/(7FE0,0002) values, when present
    extended_offsets: tuple[bytes, bytes] | None

    @property
    def frame_bits(self) -> int:
        return self.rows * self.columns * self.samples * self.bits_allocated


def pixel_info(storage: FileStorage, item: Located) -> PixelInfo | None:
    """The pixel data layout of ``item``, or ``None`` if it has no Pixel Data (7FE0,0010)."""
    ds = read_dataset(storage, item, defer=True)
    if 0x7FE00010 not in ds:
        return None
    raw = ds.get_item(0x7FE00010, keep_deferred=True)
    encapsulated = item.transfer_syntax_uid not in NATIVE_SYNTAXES
    offset = None
    if isinstance(raw, RawDataElement) and raw.value is None and not _is_deflated(item):
        offset = raw.value_tell
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (bytes(ds.ExtendedOffsetTable), bytes(ds.ExtendedOffsetTableLengths))
    return PixelInfo(
        transfer_syntax=item.transfer_syntax_uid,
        frames=_layout(ds, "NumberOfFrames", 1), rows=_layout(ds, "Rows"),
        columns=_layout(ds, "Columns"), samples=_layout(ds, "SamplesPerPixel", 1),
        bits_allocated=_layout(ds, "BitsAllocated"), value_offset=offset,
        encapsulated=encapsulated, extended_offsets=extended)


class MalformedPixelData(ValueError):
    """A stored instance whose pixel data cannot be served as frames: an attribute that gives
    its layout (Rows, Number of Frames…) is missing or not a positive integer, or its
    encapsulation cannot be split (a fragment length past its end). The store path keeps
    objects byte for byte and does not check them; retrieving their frames must refuse."""


def _layout(ds: Dataset, keyword: str, default: int | None = None) -> int:
    """A pixel layout attribute as a positive integer, or :class:`MalformedPixelData`."""
    try:
        value = ds.get(keyword)
    except Exception as exc:  # pydicom raises a wide range on a garbled element
        raise MalformedPixelData(
            f"the stored instance's {keyword} cannot be read ({exc}): its pixel data cannot "
            "be split into frames") from exc
    try:
        number = default if value in (None, "") else int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < 1:
        raise MalformedPixelData(
            f"the stored instance's {keyword} ({value!r}) is not a positive integer: its "
            "pixel data cannot be split into frames")
    return number


def _check_frames(info: PixelInfo, numbers: Sequence[int]) -> None:
    for number in numbers:
        if not 1 <= number <= info.frames:
            raise ValueError(f"frame {number} does not exist (the instance has "
                             f"{info.frames} frame{'s' if info.frames != 1 else ''})")


def compressed_frames(storage: FileStorage, item: Located, info: PixelInfo,
                      numbers: Sequence[int]) -> Iterator[bytes]:
    """The stored code stream of each frame (numbered from 1), as is: for ``image/jpeg``,
    ``image/jls``, ``image/jp2`` … responses (PS3.18 §8.7.3.3.2: fragment delimiters removed).

    Raises ``ValueError`` for a frame number out of range (checked before anything is read).
    """
    _check_frames(info, numbers)
    if not info.encapsulated:
        raise ValueError("the pixel data is not stored compressed")
    path = blob_path(storage, item)
    if info.value_offset is None:  # not seekable: parse the value (always in memory)
        data = read_dataset(storage, item).PixelData
        for number in numbers:
            yield _stored_frame(data, number, info)
        return
    with open(path, "rb") as handle:
        for number in numbers:
            handle.seek(info.value_offset)
            yield _stored_frame(handle, number, info)


def _stored_frame(source: bytes | IO[bytes], number: int, info: PixelInfo) -> bytes:
    """Frame ``number`` of encapsulated pixel data, or :class:`MalformedPixelData`."""
    try:
        return get_frame(source, number - 1, number_of_frames=info.frames,
                         extended_offsets=info.extended_offsets)
    except Exception as exc:  # pydicom raises a wide range on a malformed encapsulation
        raise MalformedPixelData(f"frame {number} cannot be split from the stored pixel data: "
                                 f"{exc}") from exc


def native_frames(storage: FileStorage, item: Located, info: PixelInfo,
                  numbers: Sequence[int]) -> Iterator[bytes]:
    """Each frame (numbered from 1) as uncompressed little-endian pixels
    (``application/octet-stream``, PS3.18 §8.7.3.3.1).

    Stored Explicit/Implicit VR Little Endian frames are read straight from the file (byte
    exact, one frame in memory at a time); other syntaxes are decoded frame by frame.

    Raises
    ------
    ValueError
        A frame number is out of range (checked before anything is read).
    TranscodeError
        Compressed frames that cannot be decoded here.
    """
    _check_frames(info, numbers)
    if info.encapsulated and not can_decode(info.transfer_syntax):
        raise TranscodeError(f"no decoder for {_name(info.transfer_syntax)} is installed")
    path = blob_path(storage, item)
    if not info.encapsulated and info.value_offset is not None \
            and info.transfer_syntax != EXPLICIT_VR_BIG_ENDIAN:
        yield from _read_native_frames(path, info, numbers)
        return
    source = _pixel_source(storage, item)
    for number in numbers:
        with _codec(f"decoding frame {number} of SOP Instance {item.sop_uid}"):
            arr = pixel_array(source, index=number - 1)
        yield _little_endian_bytes(arr, info.bits_allocated)


def _pixel_source(storage: FileStorage, item: Located) -> Path | Dataset:
    """What to give pydicom's ``pixel_array``: the file (it then reads only the frame asked
    for), or for a Deflated file, which it cannot read piecewise, the parsed data set."""
    if _is_deflated(item):
        return read_dataset(storage, item)
    return blob_path(storage, item)


def _read_native_frames(path: Path, info: PixelInfo, numbers: Sequence[int]) -> Iterator[bytes]:
    offset = info.value_offset
    if offset is None:  # callers only come here with an offset
        raise ValueError("pixel data offset unknown")
    bits = info.frame_bits
    with open(path, "rb") as handle:
        for number in numbers:
            start_bit = (number - 1) * bits
            if bits % 8 == 0:
                handle.seek(offset + start_bit // 8)
                yield handle.read(bits // 8)
                continue
            # Bits Allocated 1 with frames not on byte boundaries (PS3.5 §8.1.1): re-pack.
            first, last = start_bit // 8, (start_bit + bits + 7) // 8
            handle.seek(offset + first)
            packed = np.frombuffer(handle.read(last - first), dtype=np.uint8)
            unpacked = np.unpackbits(packed, bitorder="little")
            begin = start_bit - first * 8
            yield np.packbits(unpacked[begin:begin + bits], bitorder="little").tobytes()


def _little_endian_bytes(arr: np.ndarray[Any, Any], bits_allocated: int) -> bytes:
    if bits_allocated == 1:
        return bytes(np.packbits(arr.astype(np.uint8).ravel(), bitorder="little").tobytes())
    return bytes(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())


def frame_array(storage: FileStorage, item: Located, number: int) -> np.ndarray[Any, Any]:
    """Frame ``number`` (from 1) decoded to an array (colour as RGB), for rendering."""
    source = _pixel_source(storage, item)
    with _codec(f"decoding frame {number} of SOP Instance {item.sop_uid}"):
        return pixel_array(source, index=number - 1)


# -- bulk data and metadata -----------------------------------------------------------------------
def parse_tag_path(text: str) -> tuple[BaseTag | int, ...]:
    """``"00409096/0/00409212"`` → (tag, item index, tag); raises ``ValueError`` otherwise.

    The form of this gateway's BulkDataURIs: top-level tag, then for each nested level the
    item index (from 0) and the tag inside the item, all separated by ``/``.
    """
    if not _TAG_PATH_RE.match(text):
        raise ValueError(f"not a bulk data path: {text[:100]!r}")
    parts = text.split("/")
    return tuple(Tag(int(p, 16)) if i % 2 == 0 else int(p) for i, p in enumerate(parts))


def element_value(storage: FileStorage, item: Located,
                  path: Sequence[BaseTag | int]) -> tuple[str, bytes] | None:
    """The (VR, little-endian bytes) of the binary element at ``path`` (from
    :func:`parse_tag_path`), or ``None`` when there is no such non-empty binary element.
    Pixel Data is not served here: see :func:`native_frames` and :func:`compressed_frames`."""
    ds = read_dataset(storage, item, defer=True)
    target: Dataset = ds
    for depth in range(0, len(path) - 1, 2):
        tag, index = path[depth], int(path[depth + 1])
        if tag not in target:
            return None
        elem = target[tag]
        if elem.VR != "SQ" or index >= len(elem.value):
            return None
        target = elem.value[index]
    tag = path[-1]
    if tag not in target:
        return None
    elem = target[tag]
    if elem.VR not in BULK_VRS or not elem.value:
        return None
    value = bytes(elem.value)
    if item.transfer_syntax_uid == EXPLICIT_VR_BIG_ENDIAN and elem.VR in _SWAP_WIDTH:
        width = _SWAP_WIDTH[elem.VR]
        value = np.frombuffer(value, dtype=f">u{width}").astype(f"<u{width}").tobytes()
    return str(elem.VR), value


def metadata(storage: FileStorage, item: Located,
             bulk_uri: Callable[[str], str]) -> dict[str, Any]:
    """The DICOM JSON object of one instance (PS3.18 Annex F.2).

    Keys are tags in ascending order; group length elements are left out. Pixel data
    ((7FE0,0008/0009/0010)) and binary values (OB, OD, OF, OL, OV, OW, UN) longer than
    :data:`BULK_THRESHOLD` bytes are given as ``BulkDataURI`` = ``bulk_uri(tag path)`` (see
    :func:`parse_tag_path`); pixel data is never read for this.
    """
    ds = read_dataset(storage, item, defer=True)
    return _json_dataset(ds, "", bulk_uri)


def _json_dataset(ds: Dataset, prefix: str, bulk_uri: Callable[[str], str]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for tag in sorted(ds.keys()):
        if tag.element == 0:  # group length (PS3.18 F.2.1.1)
            continue
        key = f"{int(tag):08X}"
        path = prefix + key
        if tag in _PIXEL_TAGS:
            raw = ds.get_item(tag, keep_deferred=True)
            vr = _pixel_vr(ds, tag, raw)
            empty = (raw.length == 0 if isinstance(raw, RawDataElement)
                     else raw is None or not raw.value)
            result[key] = {"vr": vr} if empty else {"vr": vr, "BulkDataURI": bulk_uri(path)}
            continue
        try:
            result[key] = _json_element(ds[tag], path, bulk_uri)
        except Exception as exc:  # a value pydicom cannot parse or put in JSON (a DS that is
            # no number, say): leave it out, say so; the rest of the answer is whole
            log.warning("metadata: element %s left out: %s", key, exc)
    return result


def _json_element(elem: DataElement, path: str, bulk_uri: Callable[[str], str]) -> Any:
    if elem.VR == "SQ":
        items = [_json_dataset(item, f"{path}/{number}/", bulk_uri)
                 for number, item in enumerate(elem.value)]
        return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
    if elem.VR in BULK_VRS and elem.value is not None and len(elem.value) > BULK_THRESHOLD:
        return {"vr": str(elem.VR), "BulkDataURI": bulk_uri(path)}
    return elem.to_json_dict(None, BULK_THRESHOLD)


def _pixel_vr(ds: Dataset, tag: BaseTag, raw: Any) -> str:
    vr = getattr(raw, "VR", None)
    if vr and " or " not in str(vr):
        return str(vr)
    if tag != 0x7FE00010:
        return str(dictionary_VR(tag))
    return "OW"  # Implicit VR: PS3.5 §A.1 (c): Pixel Data is OW

