"""HTTP exchanges with a FHIR server or its token endpoint, and what their failures mean.

Every request goes through :func:`send`, which always passes a timeout and the TLS
verification setting (a CA bundle path or ``True``) per request: ``requests`` lets the
``REQUESTS_CA_BUNDLE`` variable replace a Session's own ``verify``, never a per-request one.
Failures become the :class:`~gateway.errors.FhirError` tree (FHIR R4 http.html §3.1.0.4;
RFC 9110 for ``Retry-After``):

- no connection, timeout, TLS handshake trouble, 408, 429, 5xx → :class:`FhirTransientError`
  (with ``retry_after``);
- a certificate that is not trusted, 401 → :class:`FhirAuthError`;
- any other 4xx → :class:`FhirPermanentError` with ``status`` and the OperationOutcome.

Messages name the method and the URL without its query string, which may carry patient
identifiers, and never a credential.
"""

from __future__ import annotations

import email.utils
import ssl
import time
from typing import Any, Final
from urllib.parse import urlsplit

import requests

from gateway.errors import FhirAuthError, FhirError, FhirPermanentError, FhirTransientError

FHIR_JSON: Final = "application/fhir+json"


def where(url: str) -> str:
    """The URL without its query: what messages may show."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL, for "same server" checks."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def _certificate_problem(exc: BaseException) -> bool:
    """Whether a TLS failure is the certificate itself (untrusted, expired, wrong host)."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ssl.SSLCertVerificationError):
            return True
        if isinstance(item, BaseException):
            todo.extend([item.__cause__, item.__context__, getattr(item, "reason", None),
                         *item.args])
    return "CERTIFICATE_VERIFY_FAILED" in str(exc)


def transport_error(method: str, url: str, exc: requests.RequestException,
                    timeout: float) -> FhirError:
    """The :class:`FhirError` for a request that got no answer."""
    what = f"{method} {where(url)}"
    if isinstance(exc, requests.exceptions.SSLError) and _certificate_problem(exc):
        return FhirAuthError(f"{what}: the server's TLS certificate is not trusted (set "
                             "fhir.ca_bundle to the CA that issued it)")
    if isinstance(exc, requests.Timeout):
        return FhirTransientError(f"{what}: no answer within {timeout:g} s")
    if isinstance(exc, requests.ConnectionError):
        return FhirTransientError(f"{what}: cannot connect")
    return FhirTransientError(f"{what}: {type(exc).__name__}")


def send(session: requests.Session, method: str, url: str, *, timeout: float,
         verify: bool | str, **kwargs: Any) -> requests.Response:
    """One HTTP exchange; transport failures become :class:`FhirError`."""
    try:
        return session.request(method, url, timeout=timeout, verify=verify,
                               allow_redirects=method == "GET", **kwargs)
    except requests.RequestException as exc:
        raise transport_error(method, url, exc, timeout) from exc


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 §10.2.3): delay-seconds or an
    HTTP-date; ``None`` when absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:  # RFC 9110 dates are always GMT
        return None
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


def _outcome(response: requests.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        return body
    return None


def _outcome_summary(outcome: dict[str, Any] | None) -> str:
    if not outcome:
        return ""
    parts = []
    for issue in outcome.get("issue", [])[:3]:
        if not isinstance(issue, dict):
            continue
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or ""
        parts.append(f"{issue.get('code', '?')}: {str(text)[:200]}" if text
                     else str(issue.get("code", "?")))
    return "; ".join(parts)


def http_error(method: str, url: str, response: requests.Response) -> FhirError:
    """The :class:`FhirError` for a non-success answer (FHIR R4 http.html §3.1.0.4)."""
    status = response.status_code
    outcome = _outcome(response)
    summary = _outcome_summary(outcome)
    message = f"{method} {where(url)}: HTTP {status}" + (f" ({summary})" if summary else "")
    if status in (408, 429) or status >= 500:
        return FhirTransientError(message, status=status, outcome=outcome,
                                  retry_after=parse_retry_after(response.headers.get("Retry-After")))
    if status == 401:
        return FhirAuthError(message, status=status, outcome=outcome)
    return FhirPermanentError(message, status=status, outcome=outcome)


def json_object(method: str, url: str, response: requests.Response) -> dict[str, Any]:
    """The JSON object of a success answer; anything else is a permanent error."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise FhirPermanentError(f"{method} {where(url)}: HTTP {response.status_code} answer is "
                                 "not a JSON object", status=response.status_code)
    return body
