"""OAuth2 client credentials for a FHIR server, the SMART Backend Services way.

:class:`ClientCredentials` gets access tokens from an OAuth2 token endpoint with the client
credentials grant (RFC 6749 §4.4) through authlib, authenticating the client with
``client_secret_basic``, ``client_secret_post`` (RFC 6749 §2.3.1) or ``private_key_jwt``
(RFC 7523 §2.2 as SMART App Launch 2.x "Client Authentication: Asymmetric" profiles it; authlib's
own ``PrivateKeyJWT`` signs RS256 with a one-hour ``exp``, which SMART servers refuse, so the
assertion is built here). The token endpoint is configured or discovered from
``{fhir}/.well-known/smart-configuration``. Tokens are cached and renewed a minute before they
expire; one lock makes the cache safe for several publisher threads, and only one of them
fetches at a time. The client secret, the private key, tokens and assertions never appear in a
repr, a log line or an exception message.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, cast
from urllib.parse import urlencode

import requests

from gateway.credentials import Secret, load_signing_key
from gateway.errors import FhirAuthError, FhirError, FhirTransientError
from gateway.fhir_http import (
    FHIR_JSON,
    http_error,
    json_object,
    parse_retry_after,
    send,
    transport_error,
    where,
)

log = logging.getLogger(__name__)

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
            self._key, signing = load_signing_key(private_key, algorithm)
            self.algorithm: str | None = signing
            self.key_id: str | None = key_id
            secret = None
            auth_method = self._authenticate_with_assertion
        elif method in ("client_secret_basic", "client_secret_post"):
            if client_secret is None:
                raise ValueError(f"{method} needs client_secret")
            self.algorithm = self.key_id = None
            secret = client_secret.reveal()
            auth_method = method
        else:
            raise ValueError(f"unknown client authentication method {method!r}")
        # authlib and joserfc (with cryptography behind them: 0.2 s to import, ~10 MB) are
        # loaded only by a process that authenticates, not by every gateway process.
        from authlib.integrations.requests_client import OAuth2Session

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
        from authlib.common.errors import AuthlibBaseError

        url = self.token_url
        started = self._clock()
        try:
            raw = self._oauth.fetch_token(url, grant_type="client_credentials",
                                          timeout=self._timeout, verify=self._verify)
        except FhirError:
            raise
        except AuthlibBaseError as exc:  # an "error" member in a 2xx answer
            raise FhirAuthError(f"token endpoint {where(url)} refused client "
                                f"{self.client_id!r}: {exc.error}: {exc.description}",
                                oauth_error=str(exc.error)) from None
        except requests.RequestException as exc:
            raise transport_error("POST", url, exc, self._timeout) from exc
        token = cast(Mapping[str, Any], raw)
        value = token.get("access_token")
        if not isinstance(value, str) or not value:
            raise FhirAuthError(f"token endpoint {where(url)} answered without an access_token")
        if str(token.get("token_type", "bearer")).lower() != "bearer":
            raise FhirAuthError(f"token endpoint {where(url)} issued a "
                                f"{token.get('token_type')!r} token; only bearer is supported")
        scope = token.get("scope")
        self._check_scope(url, scope if isinstance(scope, str) else None)
        try:
            lifetime = max(1.0, float(token.get("expires_in", DEFAULT_TOKEN_LIFETIME)))
        except (TypeError, ValueError):
            lifetime = DEFAULT_TOKEN_LIFETIME
        self.fetches += 1
        log.info("access token for client %s from %s: expires in %.0f s, scope %s",
                 self.client_id, where(url), lifetime, scope if scope is not None else "as asked")
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
            raise FhirAuthError(f"token endpoint {where(url)} granted none of the requested "
                                f"scopes ({self.scope}); granted: {granted or 'nothing'}",
                                oauth_error="invalid_scope")
        if missing:
            log.warning("token endpoint %s did not grant the scopes %s", where(url),
                        " ".join(missing))

    def _check_response(self, response: requests.Response) -> requests.Response:
        """authlib hook on the token endpoint's answer: classify failures (RFC 6749 §5.2)."""
        status = response.status_code
        url = response.request.url or ""
        if status < 400:
            return response
        if status in (408, 429) or status >= 500:
            raise FhirTransientError(
                f"token endpoint {where(url)}: HTTP {status}", status=status,
                retry_after=parse_retry_after(response.headers.get("Retry-After")))
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            description = body.get("error_description")
            raise FhirAuthError(
                f"token endpoint {where(url)} refused client {self.client_id!r}: "
                f"{body['error']}" + (f": {description}" if description else ""),
                status=status, oauth_error=body["error"])
        raise FhirAuthError(f"token endpoint {where(url)}: HTTP {status}", status=status)

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
        if self.key_id is None or self.algorithm is None:
            raise ValueError("client assertions need private_key_jwt")
        from joserfc import jwt

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
            response = send(session, "GET", url, timeout=self._timeout, verify=self._verify,
                            headers={"Accept": "application/json"})
            found: str | None = None
            if response.status_code < 400:
                body = json_object("GET", url, response)
                endpoint = body.get("token_endpoint")
                found = endpoint if isinstance(endpoint, str) and endpoint else None
                methods = body.get("token_endpoint_auth_methods_supported")
                if isinstance(methods, list) and methods and self.method not in methods:
                    log.warning("%s does not list %s among its client authentication methods "
                                "(%s)", where(url), self.method, ", ".join(map(str, methods)))
            elif response.status_code in (408, 429) or response.status_code >= 500:
                raise http_error("GET", url, response)
            if found is None:
                metadata = f"{base}/metadata"
                response = send(session, "GET", metadata, timeout=self._timeout,
                                verify=self._verify, headers={"Accept": FHIR_JSON})
                if response.status_code >= 400:
                    raise http_error("GET", metadata, response)
                found = token_url_from_capabilities(json_object("GET", metadata, response))
        if found is None:
            raise FhirAuthError(f"{where(url)} names no token_endpoint, nor does the "
                                "CapabilityStatement: set fhir.token_url")
        if base.startswith("https:") and not found.startswith("https:"):
            raise FhirAuthError(f"discovered token endpoint {where(found)} is not https: "
                                "refusing to send credentials there")
        log.info("token endpoint discovered: %s", where(found))
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
