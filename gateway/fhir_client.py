"""A small FHIR REST client (FHIR R4 http.html) over a :class:`requests.Session`.

:class:`FhirClient` offers ``read``, ``search`` (+ ``search_all`` over ``next`` links, asking
only for the elements given), ``create`` (``If-None-Exist``), ``update`` (by id or conditional,
``If-Match``), ``delete``, ``transaction`` and ``capabilities``. With a
:class:`~gateway.oauth_client.ClientCredentials` it sends a bearer token with every request; a
401 renews the token once and repeats the request once.

Failures raise the :class:`~gateway.errors.FhirError` tree (see :mod:`gateway.fhir_http`):
:class:`FhirTransientError` (no connection, timeout, 408, 429, 5xx, token endpoint unreachable;
``retry_after`` parsed) to back off on, :class:`FhirPermanentError` (other 4xx, with ``status``
and the server's OperationOutcome) to dead-letter, and its subclass :class:`FhirAuthError` (the
token endpoint refused the client: ``oauth_error`` = ``invalid_client``, ``invalid_scope``…; a
fresh token still got 401; the TLS certificate is not trusted), which concerns every request.

TLS is always verified, against ``ca_bundle`` when given. Every request has a timeout.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import requests

from gateway.errors import FhirAuthError, FhirPermanentError
from gateway.fhir_http import FHIR_JSON, http_error, json_object, origin, send, where
from gateway.fhir_http import parse_retry_after as parse_retry_after
from gateway.oauth_client import AuthMethod, ClientCredentials
from gateway.oauth_client import token_url_from_capabilities as token_url_from_capabilities
from gateway.timing import span

__all__ = ["ClientCredentials", "FhirClient", "Params", "WriteResult", "parse_retry_after",
           "token_url_from_capabilities"]

log = logging.getLogger(__name__)

#: Search parameters: a mapping (a list value repeats the parameter) or ``(name, value)`` pairs;
#: where ``str`` is also accepted, a query string (``identifier=urn:dicom:uid|urn:oid:1.2``).
Params = Mapping[str, str | Sequence[str]] | Sequence[tuple[str, str]]


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
        return json_object("GET", url, self._request("GET", url))

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
        return json_object("GET", url, self._request("GET", url, params=params))

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
            if origin(url) != origin(self.base_url):
                raise FhirPermanentError(f"search {resource_type}: next link leads to another "
                                         f"server ({where(url)}); not following it")
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
        return json_object("POST", url, response)

    # -- plumbing ------------------------------------------------------------------------------
    def _bundle(self, url: str) -> dict[str, Any]:
        # handling=strict: an unknown parameter is an error, never silently ignored (which
        # would widen the search; FHIR R4 search.html §3.1.1.1.2).
        response = self._request("GET", url, headers={"Prefer": "handling=strict"})
        body = json_object("GET", url, response)
        if body.get("resourceType") != "Bundle":
            raise FhirPermanentError(f"GET {where(url)}: answer is not a Bundle")
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

        def attempt() -> tuple[requests.Response, str | None]:
            # Time spent waiting for the servers (token endpoint included, when a token is
            # fetched): the "fhir" part of a request's Server-Timing (gateway.timing).
            with span("fhir"):
                token = self.auth.token() if self.auth is not None else None
                if token is not None:
                    all_headers["Authorization"] = f"Bearer {token}"
                response = send(self._session, method, url, timeout=self.timeout,
                                verify=self._verify, params=params, data=data,
                                headers=all_headers)
            log.debug("%s %s -> %s", method, where(url), response.status_code)
            return response, token

        response, token = attempt()
        if response.status_code == 401 and self.auth is not None and token is not None:
            # The token expired early or was revoked (RFC 6750 §3.1 invalid_token): renew it
            # and try once more; a second 401 is an authentication failure.
            log.info("%s %s: 401 with a cached token; renewing it and retrying once",
                     method, where(url))
            response.close()
            self.auth.invalidate(token)
            response, token = attempt()
        if response.status_code >= 300 and response.status_code != 304:
            raise http_error(method, url, response)
        return response
