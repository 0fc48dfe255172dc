"""A small FHIR REST client with OAuth2 client credentials (SMART Backend Services).

Two classes:

:class:`ClientCredentials`
    Gets access tokens from an OAuth2 token endpoint with the client credentials grant
    (RFC 6749 §4.4) through authlib, authenticating the client with ``client_secret_basic``,
    ``client_secret_post`` (RFC 6749 §2.3.1) or ``private_key_jwt`` (RFC 7523 §2.2, as SMART
    Backend Services profiles it). The token endpoint is configured or discovered from
    ``{fhir}/.well-known/smart-configuration``. Tokens are cached and renewed before they
    expire; one lock makes the cache safe for several publisher threads, and only one of them
    fetches at a time.

:class:`FhirClient`
    The FHIR RESTful API (FHIR R4 http.html) over a :class:`requests.Session`: ``read``,
    ``search`` (+ ``search_all`` over ``next`` links), ``create`` (``If-None-Exist``),
    ``update`` (by id or conditional, ``If-Match``), ``delete``, ``transaction`` and
    ``capabilities``. A 401 renews the token once and repeats the request once.

Failures raise the :class:`~gateway.errors.FhirError` tree: :class:`FhirTransientError`
(no connection, timeout, 408, 429, 5xx, token endpoint unreachable; ``retry_after`` parsed) or
:class:`FhirPermanentError` (other 4xx, with ``status`` and the server's OperationOutcome),
whose subclass :class:`FhirAuthError` means the token endpoint refused the client (``oauth_error``
= ``invalid_client``, ``invalid_scope``…), a fresh token still got 401, or the TLS certificate is
not trusted.

Secrets (client secret, private key, access tokens, assertions) never appear in a repr, a log
line or an exception message; messages name the method and the URL path, never its query (which
may carry patient identifiers). TLS is always verified, against ``ca_bundle`` when given (passed
on every request, so ``REQUESTS_CA_BUNDLE`` cannot override it). Every request has a timeout.
"""

from __future__ import annotations

import email.utils
import json
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, cast
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import requests
from authlib.common.errors import AuthlibBaseError
from authlib.integrations.requests_client import OAuth2Session
from joserfc import jwt

from gateway.credentials import Secret, load_signing_key
from gateway.errors import FhirAuthError, FhirError, FhirPermanentError, FhirTransientError

log = logging.getLogger(__name__)

FHIR_JSON: Final = "application/fhir+json"
#: RFC 7523 §2.2: ``client_assertion_type`` of a JWT client assertion.
ASSERTION_TYPE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: Seconds a client assertion is valid. SMART: ``exp`` "no more than five minutes in the
#: future"; a minute less leaves room for clocks that differ a little.
ASSERTION_LIFETIME: Final = 240
#: Assumed lifetime when a token response has no ``expires_in`` (SMART recommends ≤ 300 s).
DEFAULT_TOKEN_LIFETIME: Final = 300.0
#: A token is renewed this long before it expires, or after 4/5 of a shorter lifetime.
RENEW_MARGIN: Final = 60.0

AuthMethod = Literal["client_secret_basic", "client_secret_post", "private_key_jwt"]
#: Search parameters: a mapping (a list value repeats the parameter) or ``(name, value)`` pairs;
#: where ``str`` is also accepted, a query string (``identifier=urn:dicom:uid|urn:oid:1.2``).
Params = Mapping[str, str | Sequence[str]] | Sequence[tuple[str, str]]


# -- transport ------------------------------------------------------------------------------------
def _where(url: str) -> str:
    """The URL without its query: what messages may show."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _origin(url: str) -> tuple[str, str, int]:
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


def _transport_error(method: str, url: str, exc: requests.RequestException,
                     timeout: float) -> FhirError:
    what = f"{method} {_where(url)}"
    if isinstance(exc, requests.exceptions.SSLError) and _certificate_problem(exc):
        return FhirAuthError(f"{what}: the server's TLS certificate is not trusted (set "
                             "fhir.ca_bundle to the CA that issued it)")
    if isinstance(exc, requests.Timeout):
        return FhirTransientError(f"{what}: no answer within {timeout:g} s")
    if isinstance(exc, requests.ConnectionError):
        return FhirTransientError(f"{what}: cannot connect")
    return FhirTransientError(f"{what}: {type(exc).__name__}")


def _send(session: requests.Session, method: str, url: str, *, timeout: float,
          verify: bool | str, **kwargs: Any) -> requests.Response:
    """One HTTP exchange; transport failures become :class:`FhirError`."""
    try:
        return session.request(method, url, timeout=timeout, verify=verify,
                               allow_redirects=method == "GET", **kwargs)
    except requests.RequestException as exc:
        raise _transport_error(method, url, exc, timeout) from exc


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


def _http_error(method: str, url: str, response: requests.Response) -> FhirError:
    """The :class:`FhirError` for a non-success answer (FHIR R4 http.html §3.1.0.4)."""
    status = response.status_code
    outcome = _outcome(response)
    summary = _outcome_summary(outcome)
    message = f"{method} {_where(url)}: HTTP {status}" + (f" ({summary})" if summary else "")
    if status in (408, 429) or status >= 500:
        return FhirTransientError(message, status=status, outcome=outcome,
                                  retry_after=parse_retry_after(response.headers.get("Retry-After")))
    if status == 401:
        return FhirAuthError(message, status=status, outcome=outcome)
    return FhirPermanentError(message, status=status, outcome=outcome)


def _json_object(method: str, url: str, response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise FhirPermanentError(f"{method} {_where(url)}: HTTP {response.status_code} answer is "
                                 "not a JSON object", status=response.status_code)
    return body


# -- tokens ---------------------------------------------------------------------------------------
@dataclass
class _Token:
    value: str
    expires_at: float  # on the client's monotonic clock
    renew_at: float
    scope: str | None


class ClientCredentials:
    """Access tokens from an OAuth2 token endpoint (client credentials grant, RFC 6749 §4.4).

    Parameters
    ----------
    client_id
        The client id registered at the authorization server.
    method
        Client authentication at the token endpoint: ``client_secret_basic`` or
        ``client_secret_post`` (RFC 6749 §2.3.1, with ``client_secret``), or ``private_key_jwt``
        (RFC 7523 §2.2 with ``private_key`` and ``key_id``, per SMART App Launch 2.x
        "Client Authentication: Asymmetric": header ``alg`` RS384/ES384, ``kid``, ``typ`` JWT;
        claims ``iss`` = ``sub`` = client id, ``aud`` = token endpoint URL, ``exp`` at most
        five minutes ahead, a fresh ``jti`` each time).
    client_secret, private_key
        The credential for ``method``; kept in :class:`~gateway.credentials.Secret`.
    key_id, algorithm
        ``kid`` of the registered public key; ``RS384``/``ES384`` (``None``: fits the key).
    scope
        Space-separated scopes requested with every token (SMART scopes, e.g.
        ``system/ImagingStudy.crus``).
    token_url
        The token endpoint; ``None`` discovers it from ``fhir_base_url``.
    fhir_base_url
        The FHIR server whose ``.well-known/smart-configuration`` names the token endpoint.
    verify
        ``True`` (system CAs) or the path of a CA bundle (PEM).
    timeout
        Seconds for every discovery and token request.
    clock
        Monotonic seconds; tests replace it to let a cached token expire.
    """

    def __init__(self, client_id: str, *, method: AuthMethod = "private_key_jwt",
                 client_secret: Secret | None = None, private_key: Secret | None = None,
                 key_id: str | None = None, algorithm: str | None = None, scope: str = "",
                 token_url: str | None = None, fhir_base_url: str | None = None,
                 verify: bool | str = True, timeout: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not client_id:
            raise ValueError("client_id is required")
        if token_url is None and fhir_base_url is None:
            raise ValueError("either token_url or fhir_base_url (for discovery) is required")
        self.client_id = client_id
        self.method: AuthMethod = method
        self.scope = scope
        self._token_url = token_url
        self._fhir_base_url = fhir_base_url.rstrip("/") if fhir_base_url else None
        self._verify = verify
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._token: _Token | None = None
        #: How many tokens were fetched: for metrics (and tests).
        self.fetches = 0
        auth_method: Any
        if method == "private_key_jwt":
            if private_key is None or not key_id:
                raise ValueError("private_key_jwt needs private_key and key_id")
            self._key, self.algorithm = load_signing_key(private_key, algorithm)
            self.key_id: str | None = key_id
            secret = None
            auth_method = self._authenticate_with_assertion
        elif method in ("client_secret_basic", "client_secret_post"):
            if client_secret is None:
                raise ValueError(f"{method} needs client_secret")
            self.key_id = None
            secret = client_secret.reveal()
            auth_method = method
        else:
            raise ValueError(f"unknown client authentication method {method!r}")
        self._oauth = OAuth2Session(client_id, secret, token_endpoint_auth_method=auth_method,
                                    scope=scope or None)
        self._oauth.register_compliance_hook("access_token_response", self._check_response)

    def __repr__(self) -> str:
        return (f"ClientCredentials(client_id={self.client_id!r}, method={self.method!r}, "
                f"token_url={self._token_url!r}, scope={self.scope!r})")

    def close(self) -> None:
        self._oauth.close()

    # -- the token ---------------------------------------------------------------------------
    def token(self) -> str:
        """A valid access token: the cached one, or a new one fetched under the lock.

        Raises
        ------
        FhirAuthError
            The token endpoint refused the client (RFC 6749 §5.2 ``invalid_client``,
            ``invalid_scope``…), or none of the requested scopes was granted.
        FhirTransientError
            The token endpoint (or discovery) is unreachable, slow or failing. A token that is
            due for renewal but not yet expired is still returned then.
        """
        with self._lock:
            now = self._clock()
            current = self._token
            if current is not None and now < current.renew_at:
                return current.value
            try:
                self._token = self._fetch()
            except FhirTransientError:
                if current is None or now >= current.expires_at:
                    raise
                # Still valid: keep using it and try again a little later.
                current.renew_at = now + min(10.0, (current.expires_at - now) / 2)
                log.warning("token endpoint unavailable; using the current token for up to "
                            "%.0f s more", current.expires_at - now)
                return current.value
            return self._token.value

    def invalidate(self, token: str) -> None:
        """Forget ``token`` (the FHIR server refused it), unless another thread already
        replaced it."""
        with self._lock:
            if self._token is not None and self._token.value == token:
                self._token = None

    @property
    def granted_scope(self) -> str | None:
        """The scopes of the current token as the server reported them (``None``: not said,
        which RFC 6749 §5.1 means "as requested")."""
        return self._token.scope if self._token else None

    @property
    def token_url(self) -> str:
        """The token endpoint, discovered on first use when not configured.

        Raises
        ------
        FhirAuthError
            The FHIR server advertises no token endpoint.
        FhirTransientError
            Discovery failed for now.
        """
        if self._token_url is None:
            self._token_url = self._discover()
        return self._token_url

    def _fetch(self) -> _Token:
        url = self.token_url
        started = self._clock()
        try:
            raw = self._oauth.fetch_token(url, grant_type="client_credentials",
                                          timeout=self._timeout, verify=self._verify)
        except FhirError:
            raise
        except AuthlibBaseError as exc:  # an "error" member in a 2xx answer
            raise FhirAuthError(f"token endpoint {_where(url)} refused client "
                                f"{self.client_id!r}: {exc.error}: {exc.description}",
                                oauth_error=str(exc.error)) from None
        except requests.RequestException as exc:
            raise _transport_error("POST", url, exc, self._timeout) from exc
        token = cast(Mapping[str, Any], raw)
        value = token.get("access_token")
        if not isinstance(value, str) or not value:
            raise FhirAuthError(f"token endpoint {_where(url)} answered without an access_token")
        if str(token.get("token_type", "bearer")).lower() != "bearer":
            raise FhirAuthError(f"token endpoint {_where(url)} issued a "
                                f"{token.get('token_type')!r} token; only bearer is supported")
        scope = token.get("scope")
        self._check_scope(url, scope if isinstance(scope, str) else None)
        try:
            lifetime = max(1.0, float(token.get("expires_in", DEFAULT_TOKEN_LIFETIME)))
        except (TypeError, ValueError):
            lifetime = DEFAULT_TOKEN_LIFETIME
        self.fetches += 1
        log.info("access token for client %s from %s: expires in %.0f s, scope %s",
                 self.client_id, _where(url), lifetime, scope if scope is not None else "as asked")
        margin = min(RENEW_MARGIN, lifetime / 5)
        return _Token(value, started + lifetime, started + lifetime - margin,
                      scope if isinstance(scope, str) else None)

    def _check_scope(self, url: str, granted: str | None) -> None:
        """RFC 6749 §3.3: the server may grant fewer scopes than asked. None at all makes the
        token useless, which some servers (oidc-provider drops unknown scopes) do silently."""
        if granted is None or not self.scope:
            return
        asked, got = self.scope.split(), set(granted.split())
        missing = [s for s in asked if s not in got]
        if len(missing) == len(asked):
            raise FhirAuthError(f"token endpoint {_where(url)} granted none of the requested "
                                f"scopes ({self.scope}); granted: {granted or 'nothing'}",
                                oauth_error="invalid_scope")
        if missing:
            log.warning("token endpoint %s did not grant the scopes %s", _where(url),
                        " ".join(missing))

    def _check_response(self, response: requests.Response) -> requests.Response:
        """authlib hook on the token endpoint's answer: classify failures (RFC 6749 §5.2)."""
        status = response.status_code
        url = response.request.url or ""
        if status < 400:
            return response
        if status in (408, 429) or status >= 500:
            raise FhirTransientError(
                f"token endpoint {_where(url)}: HTTP {status}", status=status,
                retry_after=parse_retry_after(response.headers.get("Retry-After")))
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            description = body.get("error_description")
            raise FhirAuthError(
                f"token endpoint {_where(url)} refused client {self.client_id!r}: "
                f"{body['error']}" + (f": {description}" if description else ""),
                status=status, oauth_error=body["error"])
        raise FhirAuthError(f"token endpoint {_where(url)}: HTTP {status}", status=status)

    def _authenticate_with_assertion(self, client: Any, method: str, uri: str,
                                     headers: Any, body: str) -> tuple[str, Any, str]:
        """authlib client-auth hook for ``private_key_jwt``: adds a fresh assertion."""
        extra = urlencode({"client_assertion_type": ASSERTION_TYPE,
                           "client_assertion": self.client_assertion(uri)})
        return uri, headers, f"{body}&{extra}" if body else extra

    def client_assertion(self, audience: str) -> str:
        """A signed client assertion for the token endpoint ``audience``.

        SMART App Launch 2.x "Client Authentication: Asymmetric" and RFC 7523 §3: header
        ``alg`` (RS384/ES384), ``kid`` and ``typ``; claims ``iss`` = ``sub`` = client id,
        ``aud`` = the token endpoint URL, ``exp`` ≤ 5 minutes ahead, a new ``jti`` each call
        (servers reject a replayed one).
        """
        if self.key_id is None:
            raise ValueError("client assertions need private_key_jwt")
        now = int(time.time())
        header = {"alg": self.algorithm, "kid": self.key_id, "typ": "JWT"}
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": audience, "iat": now,
                  "exp": now + ASSERTION_LIFETIME, "jti": uuid.uuid4().hex}
        return jwt.encode(header, claims, self._key, algorithms=[self.algorithm])

    # -- discovery ---------------------------------------------------------------------------
    def _discover(self) -> str:
        """The token endpoint from ``{fhir}/.well-known/smart-configuration`` (SMART App Launch
        2.x conformance.html), else from the CapabilityStatement's deprecated ``oauth-uris``
        extension."""
        base = cast(str, self._fhir_base_url)
        url = f"{base}/.well-known/smart-configuration"
        with requests.Session() as session:
            response = _send(session, "GET", url, timeout=self._timeout, verify=self._verify,
                             headers={"Accept": "application/json"})
            found: str | None = None
            if response.status_code < 400:
                body = _json_object("GET", url, response)
                endpoint = body.get("token_endpoint")
                found = endpoint if isinstance(endpoint, str) and endpoint else None
                methods = body.get("token_endpoint_auth_methods_supported")
                if isinstance(methods, list) and methods and self.method not in methods:
                    log.warning("%s does not list %s among its client authentication methods "
                                "(%s)", _where(url), self.method, ", ".join(map(str, methods)))
            elif response.status_code in (408, 429) or response.status_code >= 500:
                raise _http_error("GET", url, response)
            if found is None:
                metadata = f"{base}/metadata"
                response = _send(session, "GET", metadata, timeout=self._timeout,
                                 verify=self._verify, headers={"Accept": FHIR_JSON})
                if response.status_code >= 400:
                    raise _http_error("GET", metadata, response)
                found = token_url_from_capabilities(_json_object("GET", metadata, response))
        if found is None:
            raise FhirAuthError(f"{_where(url)} names no token_endpoint, nor does the "
                                "CapabilityStatement: set fhir.token_url")
        if base.startswith("https:") and not found.startswith("https:"):
            raise FhirAuthError(f"discovered token endpoint {_where(found)} is not https: "
                                "refusing to send credentials there")
        log.info("token endpoint discovered: %s", _where(found))
        return found


def token_url_from_capabilities(statement: Mapping[str, Any]) -> str | None:
    """The ``token`` URI of the ``oauth-uris`` extension in ``rest[].security`` of a
    CapabilityStatement (the SMART 1.0 way, deprecated in 2.x but still served)."""
    for rest in statement.get("rest") or []:
        security = rest.get("security") or {} if isinstance(rest, dict) else {}
        for extension in security.get("extension") or []:
            if extension.get("url", "").endswith("/StructureDefinition/oauth-uris"):
                for item in extension.get("extension") or []:
                    if item.get("url") == "token" and isinstance(item.get("valueUri"), str):
                        return cast(str, item["valueUri"])
    return None


# -- the FHIR client ------------------------------------------------------------------------------
@dataclass(frozen=True)
class WriteResult:
    """What a create or update answered (FHIR R4 http.html §3.1.0.4, §3.1.0.7).

    Attributes
    ----------
    status
        201 created, 200 updated (or, for a conditional create, already there).
    resource
        The resource as stored, when the server returned it (``Prefer: return=representation``).
    location
        The ``Location`` header: ``[base]/[type]/[id]/_history/[vid]``.
    etag
        The ``ETag`` header: ``W/"[vid]"``.
    """

    status: int
    resource: dict[str, Any] | None
    location: str | None
    etag: str | None

    @property
    def created(self) -> bool:
        return self.status == 201

    @property
    def id(self) -> str | None:
        if self.resource and isinstance(self.resource.get("id"), str):
            return cast(str, self.resource["id"])
        return _location_part(self.location, 0)

    @property
    def version_id(self) -> str | None:
        if self.etag:
            return self.etag.removeprefix("W/").strip('"')
        meta = (self.resource or {}).get("meta") or {}
        if isinstance(meta.get("versionId"), str):
            return cast(str, meta["versionId"])
        return _location_part(self.location, 1)


def _location_part(location: str | None, which: int) -> str | None:
    """id (0) or version id (1) from ``…/[type]/[id]/_history/[vid]``."""
    if not location:
        return None
    parts = urlsplit(location).path.rstrip("/").split("/")
    if "_history" in parts:
        at = parts.index("_history")
        return parts[at - 1] if which == 0 else (parts[at + 1] if at + 1 < len(parts) else None)
    return parts[-1] if which == 0 and parts else None


def _pairs(params: Params | str | None) -> list[tuple[str, str]]:
    if params is None:
        return []
    if isinstance(params, str):
        return parse_qsl(params.lstrip("?"), keep_blank_values=True)
    if isinstance(params, Mapping):
        pairs: list[tuple[str, str]] = []
        for name, value in params.items():
            if isinstance(value, str):
                pairs.append((name, value))
            else:
                pairs.extend((name, item) for item in value)
        return pairs
    return [(str(name), str(value)) for name, value in params]


def _query(params: Params | str | None) -> str:
    """A search query string. ``:``, ``|``, ``/`` and ``,`` stay readable (token and reference
    parameters, FHIR R4 search.html §3.1.1.5); everything else is percent-encoded."""
    return urlencode(_pairs(params), quote_via=quote, safe=":|/,")


def _resource_type(resource: Mapping[str, Any]) -> str:
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or not rtype.isalpha():
        raise ValueError("the resource has no valid resourceType")
    return rtype


def _check_id(resource_id: str) -> str:
    # FHIR id: [A-Za-z0-9\-\.]{1,64}; never build a path from anything else
    if not (0 < len(resource_id) <= 64) or not all(c.isascii() and (c.isalnum() or c in "-.")
                                                     for c in resource_id):
        raise ValueError(f"not a FHIR id: {resource_id!r}")
    return resource_id


class FhirClient:
    """The FHIR RESTful API of one server (FHIR R4 http.html), JSON only.

    Parameters
    ----------
    base_url
        The service base URL (``https://emr.example.org/fhir/R4``).
    auth
        Where bearer tokens come from; ``None`` sends no ``Authorization`` header.
    version
        ``R4`` or ``R5``: what :meth:`check_version` expects of the server.
    timeout
        Seconds to wait for a connection or for the next bytes of an answer, per request.
    ca_bundle
        A PEM file of trusted CAs; ``None`` for the system's. TLS is always verified.
    session
        A :class:`requests.Session` to use (connection pooling); one is made by default.

    Thread-safe as far as :class:`requests.Session` is (one pool, no shared request state)
    and :class:`ClientCredentials` is (locked).
    """

    def __init__(self, base_url: str, *, auth: ClientCredentials | None = None,
                 version: str = "R4", timeout: float = 30.0, ca_bundle: str | None = None,
                 session: requests.Session | None = None) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must be an http(s) URL")
        self.base_url = base_url.rstrip("/")
        self.auth = auth
        self.version = version
        self.timeout = timeout
        self._verify: bool | str = ca_bundle or True
        self._session = session or requests.Session()
        if auth is not None and self.base_url.startswith("http:"):
            log.warning("FHIR server %s is plain http: access tokens travel unencrypted",
                        self.base_url)

    @classmethod
    def from_settings(cls, fhir: Mapping[str, Any]) -> FhirClient | None:
        """The client the ``[fhir]`` settings describe (as checked by
        :func:`gateway.config.load_settings`), or ``None`` when publishing is off."""
        base_url = fhir.get("base_url")
        if not base_url:
            return None
        verify: bool | str = fhir.get("ca_bundle") or True
        auth = None
        if fhir.get("auth", "none") != "none":
            method: AuthMethod = fhir.get("auth_method") or (
                "private_key_jwt" if fhir["auth"] == "smart_backend" else "client_secret_basic")
            auth = ClientCredentials(
                fhir["client_id"], method=method, client_secret=fhir.get("client_secret"),
                private_key=fhir.get("private_key"), key_id=fhir.get("key_id"),
                algorithm=fhir.get("algorithm"), scope=fhir.get("scope", ""),
                token_url=fhir.get("token_url"), fhir_base_url=base_url, verify=verify,
                timeout=float(fhir.get("timeout", 30)))
        return cls(base_url, auth=auth, version=fhir.get("version", "R4"),
                   timeout=float(fhir.get("timeout", 30)), ca_bundle=fhir.get("ca_bundle"))

    def __repr__(self) -> str:
        return f"FhirClient({self.base_url!r}, auth={self.auth!r})"

    def close(self) -> None:
        self._session.close()
        if self.auth is not None:
            self.auth.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    # -- interactions --------------------------------------------------------------------------
    def capabilities(self) -> dict[str, Any]:
        """The server's CapabilityStatement (``GET [base]/metadata``, http.html §3.1.0.13)."""
        url = f"{self.base_url}/metadata"
        return _json_object("GET", url, self._request("GET", url))

    def check_version(self) -> str:
        """The server's ``fhirVersion``, checked against :attr:`version`.

        Raises
        ------
        FhirPermanentError
            The server speaks another FHIR release.
        """
        found = str(self.capabilities().get("fhirVersion", ""))
        wanted = {"R4": "4.0", "R4B": "4.3", "R5": "5.0"}.get(self.version, self.version)
        if not found.startswith(wanted):
            raise FhirPermanentError(f"{self.base_url} speaks FHIR {found or '(unknown)'}, "
                                     f"configured for {self.version} ({wanted}.x)")
        return found

    def read(self, resource_type: str, resource_id: str, *,
             elements: Sequence[str] | None = None) -> dict[str, Any]:
        """``GET [base]/[type]/[id]`` (http.html §3.1.0.2); ``elements`` asks for a subset
        (search.html §3.1.1.5.9 ``_elements``, where the server supports it on read).

        Raises
        ------
        FhirPermanentError
            ``status`` 404 (unknown) or 410 (deleted), among others.
        """
        url = f"{self.base_url}/{resource_type}/{_check_id(resource_id)}"
        params = [("_elements", ",".join(elements))] if elements else None
        return _json_object("GET", url, self._request("GET", url, params=params))

    def search(self, resource_type: str, params: Params | str | None = None, *,
               elements: Sequence[str] | None = None, count: int | None = None
               ) -> dict[str, Any]:
        """One page of ``GET [base]/[type]?params`` (http.html §3.1.0.9): the searchset Bundle.

        ``elements`` becomes ``_elements`` (only those elements, plus the mandatory ones), and
        ``count`` ``_count`` (page size).
        """
        pairs = _pairs(params)
        if elements:
            pairs.append(("_elements", ",".join(elements)))
        if count is not None:
            pairs.append(("_count", str(count)))
        url = f"{self.base_url}/{resource_type}"
        if pairs:
            url += "?" + _query(pairs)
        return self._bundle(url)

    def search_all(self, resource_type: str, params: Params | str | None = None, *,
                   elements: Sequence[str] | None = None, count: int | None = None,
                   max_pages: int = 1000) -> Iterator[dict[str, Any]]:
        """Every resource of a search, following ``next`` links to the end (http.html
        §3.1.0.9.2 paging); with ``_include`` the included resources come too.

        ``next`` links are followed only on the server's own origin (the bearer token is never
        sent elsewhere: SMART backend-services "do not send the token to other servers").

        Raises
        ------
        FhirPermanentError
            A ``next`` link leads to another server, repeats, or there are more than
            ``max_pages`` pages.
        """
        bundle = self.search(resource_type, params, elements=elements, count=count)
        seen: set[str] = set()
        for _ in range(max_pages):
            for entry in bundle.get("entry") or []:
                resource = entry.get("resource") if isinstance(entry, dict) else None
                if isinstance(resource, dict) and (entry.get("search") or {}).get(
                        "mode") != "outcome":
                    yield resource
            following = [link.get("url") for link in bundle.get("link") or []
                         if isinstance(link, dict) and link.get("relation") == "next"]
            if not following or not isinstance(following[0], str):
                return
            url = following[0]
            if _origin(url) != _origin(self.base_url):
                raise FhirPermanentError(f"search {resource_type}: next link leads to another "
                                         f"server ({_where(url)}); not following it")
            if url in seen:
                raise FhirPermanentError(f"search {resource_type}: next link repeats itself")
            seen.add(url)
            bundle = self._bundle(url)
        raise FhirPermanentError(f"search {resource_type}: more than {max_pages} pages")

    def create(self, resource: Mapping[str, Any], *,
               if_none_exist: Params | str | None = None) -> WriteResult:
        """``POST [base]/[type]`` (http.html §3.1.0.8); with ``if_none_exist`` (search
        parameters) a conditional create: 201 when created, 200 when one resource already
        matches (nothing written), 412 (permanent) when several do.
        """
        rtype = _resource_type(resource)
        headers = {"Prefer": "return=representation"}
        if if_none_exist is not None:
            headers["If-None-Exist"] = _query(if_none_exist)
        url = f"{self.base_url}/{rtype}"
        return self._write("POST", url, resource, headers)

    def update(self, resource: Mapping[str, Any], *, condition: Params | str | None = None,
               if_match: str | None = None) -> WriteResult:
        """``PUT [base]/[type]/[id]`` (http.html §3.1.0.4), or with ``condition`` the
        conditional update ``PUT [base]/[type]?condition`` (§3.1.0.4.3): update the one match,
        create when none matches, 412 when several do.

        ``if_match`` is a version id (``"3"``) or an ETag (``W/"3"``): the server refuses
        with 412 when the current version differs (§3.1.0.4.2, managing resource contention).
        """
        rtype = _resource_type(resource)
        headers = {"Prefer": "return=representation"}
        if if_match is not None:
            headers["If-Match"] = if_match if if_match.startswith(("W/", '"')) \
                else f'W/"{if_match}"'
        if condition is not None:
            url = f"{self.base_url}/{rtype}?{_query(condition)}"
        else:
            rid = resource.get("id")
            if not isinstance(rid, str):
                raise ValueError("update without a condition needs the resource's id")
            url = f"{self.base_url}/{rtype}/{_check_id(rid)}"
        return self._write("PUT", url, resource, headers)

    def delete(self, resource_type: str, resource_id: str | None = None, *,
               condition: Params | str | None = None) -> int:
        """``DELETE [base]/[type]/[id]``, or conditionally ``DELETE [base]/[type]?condition``
        (http.html §3.1.0.7). Returns the status; a resource already gone (404, 410) is not an
        error, so deleting twice is harmless.
        """
        if (resource_id is None) == (condition is None):
            raise ValueError("give either resource_id or condition")
        if resource_id is not None:
            url = f"{self.base_url}/{resource_type}/{_check_id(resource_id)}"
        else:
            url = f"{self.base_url}/{resource_type}?{_query(condition)}"
        try:
            response = self._request("DELETE", url)
        except FhirPermanentError as exc:
            if exc.status in (404, 410) and not isinstance(exc, FhirAuthError):
                return exc.status
            raise
        return response.status_code

    def transaction(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        """``POST [base]`` with a ``transaction`` (or ``batch``) Bundle (http.html
        §3.1.0.11): the response Bundle. A failed transaction changes nothing and raises."""
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") not in (
                "transaction", "batch"):
            raise ValueError("transaction() needs a Bundle of type transaction or batch")
        url = self.base_url
        response = self._request("POST", url, body=bundle,
                                 headers={"Prefer": "return=representation"})
        return _json_object("POST", url, response)

    # -- plumbing ------------------------------------------------------------------------------
    def _bundle(self, url: str) -> dict[str, Any]:
        # handling=strict: an unknown parameter is an error, never silently ignored (which
        # would widen the search; FHIR R4 search.html §3.1.1.1.2).
        response = self._request("GET", url, headers={"Prefer": "handling=strict"})
        body = _json_object("GET", url, response)
        if body.get("resourceType") != "Bundle":
            raise FhirPermanentError(f"GET {_where(url)}: answer is not a Bundle")
        return body

    def _write(self, method: str, url: str, resource: Mapping[str, Any],
               headers: dict[str, str]) -> WriteResult:
        response = self._request(method, url, body=resource, headers=headers)
        try:
            body = response.json() if response.content else None
        except ValueError:
            body = None
        stored = body if isinstance(body, dict) and body.get("resourceType") != \
            "OperationOutcome" else None
        return WriteResult(response.status_code, stored, response.headers.get("Location"),
                           response.headers.get("ETag"))

    def _request(self, method: str, url: str, *, params: Sequence[tuple[str, str]] | None = None,
                 body: Mapping[str, Any] | None = None,
                 headers: Mapping[str, str] | None = None) -> requests.Response:
        """Send with a bearer token; on 401 renew the token once and send once more."""
        all_headers = {"Accept": FHIR_JSON, **(headers or {})}
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
            all_headers["Content-Type"] = f"{FHIR_JSON}; charset=utf-8"

        def send() -> tuple[requests.Response, str | None]:
            token = self.auth.token() if self.auth is not None else None
            if token is not None:
                all_headers["Authorization"] = f"Bearer {token}"
            response = _send(self._session, method, url, timeout=self.timeout,
                             verify=self._verify, params=params, data=data, headers=all_headers)
            log.debug("%s %s -> %s", method, _where(url), response.status_code)
            return response, token

        response, token = send()
        if response.status_code == 401 and self.auth is not None and token is not None:
            # The token expired early or was revoked (RFC 6750 §3.1 invalid_token): renew it
            # and try once more; a second 401 is an authentication failure.
            log.info("%s %s: 401 with a cached token; renewing it and retrying once",
                     method, _where(url))
            response.close()
            self.auth.invalidate(token)
            response, token = send()
        if response.status_code >= 300 and response.status_code != 304:
            raise _http_error(method, url, response)
        return response
