"""Query/Retrieve SCP (PS3.4 Annex C) on pynetdicom: C-FIND, C-MOVE and C-GET, translation only.

A C-FIND identifier becomes a :class:`gateway.query.Query` (the engine QIDO-RS uses); each match
comes back as an identifier holding exactly the requested keys (C.4.1.1.3.2), plus Query/Retrieve
Level and Retrieve AE Title, with status FF00 (or FF01 when the index does not keep one of the
requested optional keys: it is returned empty).

Information models: Patient Root (PATIENT, STUDY, SERIES, IMAGE) and Study Root (STUDY,
SERIES, IMAGE). Keys of the query level and of the levels above it may carry matching values
(for higher levels this is more than hierarchical search requires, C.4.1.3.1); keys of lower
levels are refused.

C-MOVE and C-GET (C.4.2, C.4.3) find the instances with the same engine (any level, any
key the engine matches), then hand each one to pynetdicom's C-STORE sub-operation: on a new
association to the Move Destination (looked up in ``[dimse.peers]``; unknown → A801) or on the
requester's own association (C-GET, SCP/SCU role selection). Each instance goes in its stored
transfer syntax when the receiver accepted that syntax for its SOP class (the stored bytes,
unchanged), otherwise transcoded to a syntax it did accept (decompressed, at least). Pending
responses carry the sub-operation counts; an instance that cannot be sent is a failed
sub-operation, listed in Failed SOP Instance UID List (0008,0058) with the final B000;
C-CANCEL ends the retrieve with FE00 and the counts so far.

C-FIND statuses (C.4.1.1.4): FF00/FF01 pending, 0000 done, FE00 cancelled (C-CANCEL is checked
before every response), A900 a key the gateway cannot match or that does not belong to the model,
C000 a malformed identifier (bad level, malformed value), A700 the index is unavailable. Each
failure carries an Error Comment (0000,0902) saying why.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import build_context, evt
from pynetdicom.presentation import PresentationContext
from sqlalchemy.exc import SQLAlchemyError

from gateway import retrieve
from gateway.cohort import CohortError
from gateway.config import Peer
from gateway.errors import RetrieveError
from gateway.index import Index
from gateway.query import UNIQUE_KEYS, Condition, Query, QueryError, run, to_dicom_json
from gateway.storage import FileStorage

log = logging.getLogger("gateway.qr")

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
_PATIENT_LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_STUDY_LEVELS = ("STUDY", "SERIES", "IMAGE")
#: The levels each information model allows (PS3.4 C.6.1, C.6.2).
MODEL_LEVELS = {
    PATIENT_ROOT_FIND: _PATIENT_LEVELS, STUDY_ROOT_FIND: _STUDY_LEVELS,
    PATIENT_ROOT_MOVE: _PATIENT_LEVELS, STUDY_ROOT_MOVE: _STUDY_LEVELS,
    PATIENT_ROOT_GET: _PATIENT_LEVELS, STUDY_ROOT_GET: _STUDY_LEVELS,
}
FIND_MODELS = (PATIENT_ROOT_FIND, STUDY_ROOT_FIND)
MOVE_MODELS = (PATIENT_ROOT_MOVE, STUDY_ROOT_MOVE)
GET_MODELS = (PATIENT_ROOT_GET, STUDY_ROOT_GET)
_NATIVE = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]  # Explicit, Implicit VR Little Endian
#: Elements of the identifier that are about the query, not keys.
_NOT_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle",
             "QueryRetrieveView"}


def _status(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]  # LO: at most 64 characters
    return status


def _values(element: Any) -> tuple[str, ...]:
    value = element.value
    if value is None or value == "" or value == b"":
        return ()
    if isinstance(value, MultiValue | list | tuple):
        return tuple(str(v) for v in value if str(v) != "")
    return (str(value),)


def conditions_from_identifier(identifier: Dataset) -> tuple[Condition, ...]:
    """The keys of a C-FIND/C-MOVE/C-GET identifier as engine conditions."""
    conditions = []
    for element in identifier:
        keyword = element.keyword
        if not keyword:
            if element.value not in (None, "", b"", []):
                raise QueryError(f"cannot match on the unknown or private element {element.tag}",
                                 unsupported=True)
            continue
        if keyword in _NOT_KEYS:
            continue
        if element.VR == "SQ":
            items = element.value or []
            sub: tuple[Condition, ...] = ()
            if items and len(items[0]):
                sub = tuple(Condition(e.keyword, _values(e)) for e in items[0]
                            if e.keyword and e.VR != "SQ")
            conditions.append(Condition(keyword, (), sub if any(c.values for c in sub) else ()))
        else:
            conditions.append(Condition(keyword, _values(element)))
    return tuple(conditions)


class Refused(Exception):
    """A request answered with a failure ``status`` and ``comment`` (its Error Comment)."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status


#: The SQL scope of requests addressed to a called AE title (a cohort's), or None.
ScopeOf = Callable[[str], Any]


@dataclass(frozen=True)
class Outgoing:
    """How one instance goes out in a C-STORE sub-operation: in ``transfer_syntax``, as the
    stored file (``path``) or as a transcoded copy (``part10``, a whole Part 10 file); or not
    at all (``reason``: a failed sub-operation)."""

    item: retrieve.Located
    transfer_syntax: str = ""
    path: Path | None = None
    part10: bytes | None = None
    reason: str = ""


class QueryRetrieve:
    """The Query/Retrieve service itself, whatever carries it (pynetdicom or the lean Upper
    Layer): identifiers in, matches and instances to send out."""

    def __init__(self, index: Index, storage: FileStorage, peers: Mapping[str, Peer],
                 ae_title: str, *, scope: ScopeOf | None = None) -> None:
        self.index = index
        self.storage = storage
        self.peers = peers
        self.ae_title = ae_title
        self.scope_of = scope

    def _scope(self, called: str) -> Any:
        """The request's scope: None for the gateway's AE title, a cohort's members for its."""
        if self.scope_of is None:
            return None
        try:
            return self.scope_of(called)
        except CohortError as exc:
            raise Refused(0xA700 if exc.status >= 500 else 0xC000,
                          f"cohort not evaluated: {exc}") from exc

    def find(self, model: str, identifier: Dataset, *, called: str, calling: str,
             is_cancelled: Callable[[], bool]) -> Iterator[tuple[Any, Dataset | None]]:
        """C-FIND (C.4.1): (status, identifier) pairs, pending ones first, in pynetdicom's
        handler convention (a status Dataset carries an Error Comment)."""
        for status, answer in self.find_json(model, identifier, called=called, calling=calling,
                                             is_cancelled=is_cancelled):
            yield status, (answer_dataset(answer) if answer is not None else None)

    def find_json(self, model: str, identifier: Dataset, *, called: str, calling: str,
                  is_cancelled: Callable[[], bool]
                  ) -> Iterator[tuple[Any, dict[str, Any] | None]]:
        """:meth:`find` with each answer as DICOM JSON (PS3.18 Annex F): exactly the
        requested keys (C.4.1.1.3.2) plus Query/Retrieve Level and Retrieve AE Title."""
        level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
        if level not in MODEL_LEVELS.get(model, ()):
            shown = level or "missing"
            yield _status(0xC000, f"Query/Retrieve Level {shown} not in this model"), None
            return
        try:
            conditions = conditions_from_identifier(identifier)
            scope = self._scope(called)
            result = run(self.index, Query(level, conditions, scope=scope))
        except QueryError as exc:
            log.info("C-FIND from %s refused: %s", calling, exc)
            yield _status(0xA900 if exc.unsupported else 0xC000, str(exc)), None
            return
        except Refused as exc:
            yield _status(exc.status, str(exc)), None
            return
        except SQLAlchemyError:
            log.exception("C-FIND from %s: index unavailable", calling)
            yield _status(0xA700, "index unavailable; retry later"), None
            return
        keywords = [c.keyword for c in conditions]
        pending = 0xFF01 if result.unsupported else 0xFF00
        log.info("C-FIND from %s level %s: %d matches", calling, level, len(result.matches))
        for match in result.matches:
            if is_cancelled():
                yield 0xFE00, None
                return
            answer = to_dicom_json(match, keywords)
            answer[_LEVEL_TAG] = {"vr": "CS", "Value": [level]}
            answer[_RETRIEVE_AE_TAG] = {"vr": "AE", "Value": [self.ae_title]}
            yield pending, answer
        yield 0x0000, None

    def locate(self, model: str, identifier: Dataset, *, called: str) -> list[retrieve.Located]:
        """The instances a C-MOVE/C-GET identifier selects (C.4.2.2.1, C.4.3.2.1).

        Raises
        ------
        Refused
            A900/C000 for identifiers the engine cannot match, A701 when the index is
            unavailable, A700/C000 when a cohort cannot be evaluated.
        """
        level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
        if level not in MODEL_LEVELS.get(model, ()):
            raise Refused(0xC000, f"Query/Retrieve Level {level or 'missing'} not in this model")
        try:
            conditions = conditions_from_identifier(identifier)
            # A patient is retrieved as its studies; the patient keys match at study level.
            found_level = "STUDY" if level == "PATIENT" else level
            result = run(self.index, Query(found_level, conditions, scope=self._scope(called)))
        except QueryError as exc:
            raise Refused(0xA900 if exc.unsupported else 0xC000, str(exc)) from exc
        except SQLAlchemyError as exc:
            raise Refused(0xA701, "index unavailable; cannot count matches") from exc
        key = UNIQUE_KEYS[found_level]
        uids = [m[key] for m in result.matches]
        if not uids:
            return []
        if found_level == "STUDY":
            return retrieve.locate(self.index, study_uid=uids)
        if found_level == "SERIES":
            return retrieve.locate(self.index, series_uid=uids)
        return retrieve.locate(self.index, sop_uid=uids)

    def outgoing(self, item: retrieve.Located, accepted: Mapping[str, list[str]]) -> Outgoing:
        """How ``item`` goes to a receiver that accepted ``accepted`` (SOP class → transfer
        syntaxes): the stored bytes when their syntax was accepted, else transcoded to one
        that was, else a reason it cannot go."""
        syntax = retrieve.select_transfer_syntax(item.transfer_syntax_uid,
                                                 accepted.get(item.sop_class_uid, []),
                                                 has_pixels=item.is_image)
        try:
            if syntax is None:
                raise RetrieveError(f"the receiver accepted no transfer syntax "
                                    f"{item.transfer_syntax_uid} can be sent in for SOP class "
                                    f"{item.sop_class_uid}")
            if syntax == item.transfer_syntax_uid:
                return Outgoing(item, syntax, path=retrieve.blob_path(self.storage, item))
            # Transcoded as for WADO-RS: a Part 10 file written by pydicom in the new syntax.
            part = retrieve.prepare(self.storage, item, syntax)
            return Outgoing(item, syntax, part10=b"".join(part.chunks()))
        except RetrieveError as exc:
            log.warning("sub-operation for SOP Instance %s fails: %s", item.sop_uid, exc)
            return Outgoing(item, reason=str(exc))


def _called(event: evt.Event) -> str:
    """The AE title the requester called (pynetdicom's acceptor title is always ours)."""
    request = event.assoc.requestor.primitive
    return str(request.called_ae_title).strip() if request is not None else ""


class FindSCP:
    """Answers C-FIND requests on pynetdicom associations."""

    def __init__(self, service: QueryRetrieve) -> None:
        self.service = service

    def handle(self, event: evt.Event) -> Iterator[tuple[Any, Dataset | None]]:
        """pynetdicom ``EVT_C_FIND`` handler: yields (status, identifier) pairs."""
        return self.service.find(str(event.request.AffectedSOPClassUID), event.identifier,
                                 called=_called(event), calling=event.assoc.requestor.ae_title,
                                 is_cancelled=lambda: bool(event.is_cancelled))


class RetrieveSCP:
    """Answers C-MOVE and C-GET on pynetdicom associations: find the instances, then feed
    pynetdicom's C-STORE sub-operations one data set at a time, each in a transfer syntax the
    receiver accepted."""

    def __init__(self, service: QueryRetrieve) -> None:
        self.service = service
        self.peers = service.peers

    def _locate(self, event: evt.Event) -> list[retrieve.Located]:
        return self.service.locate(str(event.request.AffectedSOPClassUID), event.identifier,
                                   called=_called(event))

    def _dataset(self, item: retrieve.Located, accepted: dict[str, list[str]]) -> Dataset:
        """The data set to send ``item`` as: stored syntax if accepted, else transcoded. A
        data set without file meta (pynetdicom then counts a failed sub-operation and lists
        its SOP Instance UID) when it cannot be sent at all."""
        out = self.service.outgoing(item, accepted)
        if out.path is not None:
            return _StoredFile(item, out.path)
        if out.part10 is not None:
            # pynetdicom encodes a data set in the encoding it was read with, so it must be
            # read in the target one.
            return pydicom.dcmread(io.BytesIO(out.part10))
        unsendable = Dataset()
        unsendable.SOPClassUID = item.sop_class_uid
        unsendable.SOPInstanceUID = item.sop_uid
        return unsendable

    def _sub_operations(self, event: evt.Event, items: list[retrieve.Located],
                        accepted: Any) -> Iterator[tuple[int, Dataset | None]]:
        for item in items:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, self._dataset(item, accepted())
        # no final yield: pynetdicom sends 0000 (or B000 listing failures) after the last one

    def handle_move(self, event: evt.Event) -> Iterator[Any]:
        """pynetdicom ``EVT_C_MOVE`` handler (PS3.4 C.4.2)."""
        destination = str(event.move_destination).strip()
        calling = event.assoc.requestor.ae_title
        peer = self.peers.get(destination)
        if peer is None:
            log.warning("C-MOVE from %s to unknown destination %s", calling, destination)
            yield None, None  # pynetdicom answers A801: Move Destination unknown
            return
        try:
            items = self._locate(event)
        except Refused as exc:
            # pynetdicom wants a destination and at least one sub-operation before it sends a
            # failure status: associate for Verification only, and report why nothing is sent.
            yield peer.host, peer.port, {"contexts": contexts_for([])}
            yield 1
            yield _status(exc.status, str(exc)), None
            return
        store_assoc: list[Any] = []

        def accepted_by_destination(captured: evt.Event) -> None:
            _send_stored_files(captured.assoc)
            store_assoc.append(captured.assoc)

        log.info("C-MOVE from %s: %d instances to %s", calling, len(items), destination)
        yield peer.host, peer.port, {
            "contexts": contexts_for(items),
            "evt_handlers": [(evt.EVT_ACCEPTED, accepted_by_destination)],
        }
        yield len(items)
        yield from self._sub_operations(
            event, items, lambda: _accepted(store_assoc[0].accepted_contexts if store_assoc
                                            else [], role="scu"))

    def handle_get(self, event: evt.Event) -> Iterator[Any]:
        """pynetdicom ``EVT_C_GET`` handler (PS3.4 C.4.3): sub-operations on the same
        association, for the SOP classes the requester accepted the SCP role for."""
        try:
            items = self._locate(event)
        except Refused as exc:
            yield 1  # pynetdicom sends a failure only after a non-zero count
            yield _status(exc.status, str(exc)), None
            return
        log.info("C-GET from %s: %d instances", event.assoc.requestor.ae_title, len(items))
        _send_stored_files(event.assoc)
        yield len(items)
        contexts = _accepted(event.assoc.accepted_contexts, role="get")
        yield from self._sub_operations(event, items, lambda: contexts)


class _StoredFile(Dataset):
    """Stands in for an instance going out exactly as stored: pynetdicom's handlers take only
    data sets, so this one carries the file's path, and the association's ``send_c_store`` (see
    :func:`_send_stored_files`) sends that file, whose data set bytes it streams unchanged."""

    def __init__(self, item: retrieve.Located, path: Path) -> None:
        super().__init__()
        self.SOPClassUID = item.sop_class_uid
        self.SOPInstanceUID = item.sop_uid
        self.stored_path = path


def _send_stored_files(assoc: Any) -> None:
    """Make ``assoc.send_c_store`` send a :class:`_StoredFile` from its path (pynetdicom reads
    the file meta and streams the data set from disk: ``STORE_SEND_CHUNKED_DATASET``)."""
    original = assoc.send_c_store
    if getattr(original, "sends_stored_files", False):
        return

    def send_c_store(dataset: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(dataset, _StoredFile):
            dataset = dataset.stored_path
        return original(dataset, *args, **kwargs)

    send_c_store.sends_stored_files = True  # type: ignore[attr-defined]
    assoc.send_c_store = send_c_store


def contexts_for(items: list[retrieve.Located]) -> list[PresentationContext]:
    """Contexts to propose to a Move Destination: per SOP class, one for each stored syntax
    alone (so those instances can go unchanged: an acceptor picks one syntax per context) and
    one for the native syntaxes as the fallback. At most 128 (PS3.8 9.3.2.2): past that,
    only the fallbacks."""
    syntaxes: dict[str, set[str]] = {}
    for item in items:
        syntaxes.setdefault(item.sop_class_uid, set()).add(item.transfer_syntax_uid)
    contexts = [build_context("1.2.840.10008.1.1")]  # Verification: never an empty proposal
    for sop_class, stored in sorted(syntaxes.items()):
        contexts.append(build_context(sop_class, _NATIVE))
        contexts.extend(build_context(sop_class, [ts]) for ts in sorted(stored))
    if len(contexts) > 128:
        contexts = [build_context(c, _NATIVE) for c in sorted(syntaxes)][:128]
    return contexts


def _accepted(contexts: list[PresentationContext], *, role: str) -> dict[str, list[str]]:
    """SOP class → transfer syntaxes the receiver accepted (for C-GET: only where the
    requester took the SCP role, PS3.7 D.3.3.4)."""
    found: dict[str, list[str]] = {}
    for context in contexts:
        if role == "get" and not context.as_scu:
            continue
        found.setdefault(str(context.abstract_syntax), []).extend(
            str(ts) for ts in context.transfer_syntax)
    return found


_LEVEL_TAG, _RETRIEVE_AE_TAG = "00080052", "00080054"


def answer_dataset(answer: dict[str, Any]) -> Dataset:
    """A C-FIND answer (DICOM JSON) as a pydicom data set, declaring UTF-8 where needed."""
    ds = Dataset.from_json(answer)
    if _needs_utf8(ds):
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def _needs_utf8(ds: Dataset) -> bool:
    return any(element.VR in {"PN", "LO", "SH", "ST", "LT", "UT", "UC"} and element.value
               and not str(element.value).isascii() for element in ds.iterall())
