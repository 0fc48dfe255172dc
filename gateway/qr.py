"""Query/Retrieve SCP (PS3.4 Annex C) on pynetdicom: C-FIND, translation only.

A C-FIND identifier becomes a :class:`gateway.query.Query` (the engine QIDO-RS uses); each match
comes back as an identifier holding exactly the requested keys (C.4.1.1.3.2), plus Query/Retrieve
Level and Retrieve AE Title, with status FF00 (or FF01 when the index does not keep one of the
requested optional keys: it is returned empty).

Information models: Patient Root (PATIENT, STUDY, SERIES, IMAGE) and Study Root (STUDY,
SERIES, IMAGE). Keys of the query level and of the levels above it may carry matching values
(for higher levels this is more than hierarchical search requires, C.4.1.3.1); keys of lower
levels are refused.

Statuses (C.4.1.1.4): FF00/FF01 pending, 0000 done, FE00 cancelled (C-CANCEL is checked before
every response), A900 a key the gateway cannot match or that does not belong to the model,
C000 a malformed identifier (bad level, malformed value), A700 the index is unavailable. Each
failure carries an Error Comment (0000,0902) saying why.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import evt
from sqlalchemy.exc import SQLAlchemyError

from gateway.index import Index
from gateway.query import Condition, Query, QueryError, run, to_dicom_json

log = logging.getLogger("gateway.qr")

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
#: The levels each information model allows (PS3.4 C.6.1, C.6.2).
MODEL_LEVELS = {
    PATIENT_ROOT_FIND: ("PATIENT", "STUDY", "SERIES", "IMAGE"),
    STUDY_ROOT_FIND: ("STUDY", "SERIES", "IMAGE"),
}
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


class FindSCP:
    """Answers C-FIND requests from the index."""

    def __init__(self, index: Index, ae_title: str) -> None:
        self.index = index
        self.ae_title = ae_title

    def handle(self, event: evt.Event) -> Iterator[tuple[Any, Dataset | None]]:
        """pynetdicom ``EVT_C_FIND`` handler: yields (status, identifier) pairs."""
        model = str(event.request.AffectedSOPClassUID)
        identifier: Dataset = event.identifier
        level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
        calling = event.assoc.requestor.ae_title
        if level not in MODEL_LEVELS.get(model, ()):
            shown = level or "missing"
            yield _status(0xC000, f"Query/Retrieve Level {shown} not in this model"), None
            return
        try:
            conditions = conditions_from_identifier(identifier)
            result = run(self.index, Query(level, conditions))
        except QueryError as exc:
            log.info("C-FIND from %s refused: %s", calling, exc)
            yield _status(0xA900 if exc.unsupported else 0xC000, str(exc)), None
            return
        except SQLAlchemyError:
            log.exception("C-FIND from %s: index unavailable", calling)
            yield _status(0xA700, "index unavailable; retry later"), None
            return
        keywords = [c.keyword for c in conditions]
        pending = 0xFF01 if result.unsupported else 0xFF00
        log.info("C-FIND from %s level %s: %d matches", calling, level, len(result.matches))
        for match in result.matches:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            answer = Dataset.from_json(to_dicom_json(match, keywords))
            answer.QueryRetrieveLevel = level
            answer.RetrieveAETitle = self.ae_title
            if _needs_utf8(answer):
                answer.SpecificCharacterSet = "ISO_IR 192"
            yield pending, answer
        yield 0x0000, None


def _needs_utf8(ds: Dataset) -> bool:
    return any(element.VR in {"PN", "LO", "SH", "ST", "LT", "UT", "UC"} and element.value
               and not str(element.value).isascii() for element in ds.iterall())
