"""The gateway's exception tree.

::

    GatewayError
    ├── ConfigError                 bad setting → one line naming the key, exit code 2
    └── StoreError                  an instance was not stored; carries its DIMSE status
        ├── InvalidInstance         0xC000 class: unparseable, truncated, missing/invalid UIDs
        │   └── StudyMismatch       0xC409: STOW-RS part whose Study UID differs from the URL
        ├── SOPClassMismatch        0xA900: data set SOP Class ≠ the negotiated/declared one
        ├── DuplicateInstance       0x0111: a different object with a stored SOP Instance UID
        ├── RejectedInstance        0x0124: an instance an IOCM rejection note removed, sent again
        └── OutOfResources          0xA700: disk full, unwritable storage, index unavailable
    └── RetrieveError               a stored instance could not be served as asked
        ├── InstanceMissing         indexed, but its blob is gone or unreadable (index and storage
        │                           disagree: ``reindex`` repairs); WADO-RS 500, C-MOVE failure
        └── TranscodeError          cannot be converted to the requested transfer syntax (no
                                    decoder/encoder, or the codec failed); WADO-RS 406

Each entry point maps these in one place: DIMSE returns ``status``; STOW-RS puts ``status`` in
Failure Reason (0008,1197) and derives the HTTP status; WADO maps RetrieveError to an HTTP
status (``gateway/wado.py``); the CLI prints ``str(error)``.
Messages never contain patient names or IDs (they end up in logs and on the wire).
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A configuration value is missing or invalid; the message names the key."""


class StoreError(GatewayError):
    """An instance could not be stored. ``status`` is the DIMSE C-STORE status (PS3.4 B.2.3)."""

    status: int = 0x0110  # Processing failure

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class InvalidInstance(StoreError):
    """The data set cannot be understood (PS3.4 B.2.3: Error, Cannot understand, 0xCxxx)."""

    status = 0xC000


class StudyMismatch(InvalidInstance):
    """STOW-RS to ``/studies/{uid}`` with an instance of another study (PS3.18 10.5.3.1)."""

    status = 0xC409


class SOPClassMismatch(StoreError):
    """Error: Data Set does not match SOP Class (PS3.4 B.2.3, 0xA900)."""

    status = 0xA900


class DuplicateInstance(StoreError):
    """A different object arrived with a SOP Instance UID already stored (PS3.7 C.4: 0x0111)."""

    status = 0x0111


class RejectedInstance(StoreError):
    """Refused: Not Authorized (PS3.7 C.4, 0x0124): the instance was rejected by an IOCM Key
    Object Selection (wrong patient, quality, retention…) and must not come back."""

    status = 0x0124


class OutOfResources(StoreError):
    """Refused: Out of Resources (0xA700): the sender should retry later."""

    status = 0xA700


class RetrieveError(GatewayError):
    """A located instance could not be served in the form asked for (``gateway.retrieve``)."""


class InstanceMissing(RetrieveError):
    """The index lists the instance but its blob is missing or unreadable."""


class TranscodeError(RetrieveError):
    """The instance cannot be converted to the requested transfer syntax."""
