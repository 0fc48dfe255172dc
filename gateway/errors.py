"""The gateway's exception tree.

::

    GatewayError
    ├── ConfigError                 bad setting → one line naming the key, exit code 2
    ├── StoreError                  an instance was not stored; carries its DIMSE status
    │   ├── InvalidInstance         0xC000 class: unparseable, truncated, missing/invalid UIDs
    │   │   └── StudyMismatch       0xC409: STOW-RS part whose Study UID differs from the URL
    │   ├── SOPClassMismatch        0xA900: data set SOP Class ≠ the negotiated/declared one
    │   ├── DuplicateInstance       0x0111: a different object with a stored SOP Instance UID
    │   ├── RejectedInstance        0x0124: an instance an IOCM rejection note removed, sent
    │   │                           again
    │   └── OutOfResources          0xA700: disk full, unwritable storage, index unavailable
    ├── NotFound                    what an API request names is not there: a study the gateway
    │                               does not hold, a Patient the FHIR server does not know; 404
    ├── FhirNotConfigured           an API that reads the FHIR server, with ``fhir.base_url``
    │                               unset; 503
    ├── RetrieveError               a stored instance could not be served as asked
    │   ├── InstanceMissing         indexed, but its blob is gone or unreadable (index and
    │   │                           storage disagree: ``reindex`` repairs); WADO-RS 500,
    │   │                           C-MOVE failure
    │   └── TranscodeError          cannot be converted to the requested transfer syntax (no
    │                               decoder/encoder, or the codec failed); WADO-RS 406
    └── FhirError                   a request to the FHIR server (or its token endpoint) failed
        ├── FhirTransientError      try again later: no connection, timeout, 408, 429, 5xx,
        │                           token endpoint unreachable; ``retry_after`` from the server
        └── FhirPermanentError      the same request will fail again: 4xx, with the server's
            │                       ``status`` and ``outcome`` (OperationOutcome JSON)
            └── FhirAuthError       the server and the gateway could not authenticate each
                                    other: token refused (``oauth_error``: invalid_client,
                                    invalid_scope…), 401 even with a fresh token, TLS
                                    certificate not trusted

Each entry point maps these in one place: DIMSE returns ``status``; STOW-RS puts ``status`` in
Failure Reason (0008,1197) and derives the HTTP status; WADO maps RetrieveError to an HTTP
status (``gateway/wado.py``); the CLI prints ``str(error)``; the publisher backs off on
``FhirTransientError`` and dead-letters on ``FhirPermanentError``; the reader's API
(``gateway/api.py``) answers NotFound 404, FhirNotConfigured 503 and FhirError 502/503 with the
server's OperationOutcome.
Messages never contain patient names or IDs (they end up in logs and on the wire), nor secrets:
FHIR errors name the method and the path without its query string.
"""

from __future__ import annotations

from typing import Any


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


class NotFound(GatewayError):
    """The study, patient… an API request names does not exist (HTTP 404). The message says what
    is missing, without patient identifiers."""


class FhirNotConfigured(GatewayError):
    """An API that reads the FHIR server was called while ``fhir.base_url`` is unset (HTTP
    503): the gateway has no FHIR server to ask."""


class RetrieveError(GatewayError):
    """A located instance could not be served in the form asked for (``gateway.retrieve``)."""


class InstanceMissing(RetrieveError):
    """The index lists the instance but its blob is missing or unreadable."""


class TranscodeError(RetrieveError):
    """The instance cannot be converted to the requested transfer syntax."""


class FhirError(GatewayError):
    """A FHIR interaction failed (FHIR R4 http.html); see the subclasses for what to do next.

    Attributes
    ----------
    status
        The HTTP status of the answer, or ``None`` when there was none (no connection, timeout).
    outcome
        The OperationOutcome the server sent with the error, as JSON, if any.
    """

    def __init__(self, message: str, *, status: int | None = None,
                 outcome: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.outcome = outcome


class FhirTransientError(FhirError):
    """Worth retrying later: the server was unreachable, slow, overloaded or failing (5xx, 408,
    429). ``retry_after`` is the server's ``Retry-After`` in seconds (RFC 9110 §10.2.3), if it
    sent one."""

    def __init__(self, message: str, *, status: int | None = None,
                 outcome: dict[str, Any] | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, status=status, outcome=outcome)
        self.retry_after = retry_after


class FhirPermanentError(FhirError):
    """The server refused the request itself (4xx): sending it again unchanged will fail again.
    ``status`` and ``outcome`` say why (e.g. 400 invalid resource, 404, 409, 412 version
    conflict, 422)."""


class FhirAuthError(FhirPermanentError):
    """Authentication failed: the token endpoint refused the client (``oauth_error`` is the
    RFC 6749 §5.2 error code, e.g. ``invalid_client``, ``invalid_scope``), the FHIR server
    answered 401 to a freshly fetched token, or the server's TLS certificate is not trusted.
    Unlike other permanent errors this concerns every request, not one resource."""

    def __init__(self, message: str, *, status: int | None = None,
                 outcome: dict[str, Any] | None = None,
                 oauth_error: str | None = None) -> None:
        super().__init__(message, status=status, outcome=outcome)
        self.oauth_error = oauth_error
