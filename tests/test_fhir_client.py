"""gateway.fhir_client against real servers (tests/fhir_servers.py).

Who validates what:

- **sekmet** (FHIR R4, HTTPS) issues tokens at its own SMART Backend Services token endpoint and
  validates them itself: every auth method end to end, discovery, renewal, conditional
  create/update, If-Match, paging, transactions, TLS.
- **oidc-provider** issues RS256 JWT access tokens (client_secret_basic, client_secret_post,
  private_key_jwt); the **resource server** in front of sekmet verifies them against
  oidc-provider's JWKS (iss, aud, exp, SMART scopes) and can revoke one (401 → renew).
- A tiny local HTTP server injects failures only (429/503 with Retry-After, a server that
  always answers 401, one that never answers, a token endpoint that records the assertion).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from joserfc import jwt

from gateway.config import load_settings
from gateway.credentials import Secret
from gateway.errors import FhirAuthError, FhirPermanentError, FhirTransientError
from gateway.fhir_client import (
    ClientCredentials,
    FhirClient,
    WriteResult,
    parse_retry_after,
    token_url_from_capabilities,
)

from fhir_servers import (
    EC_CLIENT,
    JWT_CLIENT,
    NARROW_CLIENT,
    POST_CLIENT,
    SECRET_CLIENT,
    ClientKeys,
    OAuthServer,
    ResourceServer,
    Sekmet,
    free_port,
)

SCOPE = "system/ImagingStudy.crus system/Endpoint.crus system/Patient.rs"
#: For the REST tests: deletes, and sekmet authorises a transaction (POST [base]) as "c" on
#: every type ("*") rather than entry by entry.
BROAD_SCOPE = "system/*.cruds"


def study(uid: str | None = None, **extra: Any) -> dict[str, Any]:
    """A minimal valid R4 ImagingStudy with a fresh Study Instance UID identifier."""
    uid = uid or f"2.25.{uuid.uuid4().int}"
    return {"resourceType": "ImagingStudy", "status": "available",
            "subject": {"reference": "Patient/example"},
            "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}], **extra}


def by_uid(resource: dict[str, Any]) -> str:
    return f"identifier=urn:dicom:uid|{resource['identifier'][0]['value']}"


class FakeClock:
    """Monotonic time that tests move forward (no sleeping while a token ages)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def credentials(server: Sekmet | OAuthServer, keys: ClientKeys, method: str, *,
                key: str = "rsa", scope: str = SCOPE, token_url: str | None = None,
                fhir_base_url: str | None = None, verify: bool | str = True,
                clock: Callable[[], float] = time.monotonic,
                timeout: float = 30) -> ClientCredentials:
    """Credentials of the test client for ``method`` as registered at ``server``."""
    if method == "private_key_jwt":
        pair = keys.rsa if key == "rsa" else keys.ec
        # oidc-provider holds both keys for one client; sekmet one client per key type
        client_id = EC_CLIENT if key == "ec" and isinstance(server, Sekmet) else JWT_CLIENT
        return ClientCredentials(client_id, method="private_key_jwt", private_key=pair.pem,
                                 key_id=pair.kid, algorithm=pair.algorithm, scope=scope,
                                 token_url=token_url, fhir_base_url=fhir_base_url,
                                 verify=verify, clock=clock, timeout=timeout)
    if isinstance(server, Sekmet):
        client_id, secret = SECRET_CLIENT, server.client_secret
    elif method == "client_secret_post":
        client_id, secret = POST_CLIENT, server.post_secret
    else:
        client_id, secret = SECRET_CLIENT, server.basic_secret
    return ClientCredentials(client_id, method=method, client_secret=secret,  # type: ignore[arg-type]
                             scope=scope, token_url=token_url, fhir_base_url=fhir_base_url,
                             verify=verify, clock=clock, timeout=timeout)


def sekmet_client(sekmet: Sekmet, keys: ClientKeys, method: str = "private_key_jwt",
                  **kwargs: Any) -> FhirClient:
    """A client of sekmet, discovering sekmet's token endpoint unless ``token_url`` is given."""
    auth = credentials(sekmet, keys, method, fhir_base_url=sekmet.base_url,
                       verify=str(sekmet.ca_file), **kwargs)
    return FhirClient(sekmet.base_url, auth=auth, ca_bundle=str(sekmet.ca_file), timeout=30)


@pytest.fixture
def client(sekmet: Sekmet, client_keys: ClientKeys) -> Iterator[FhirClient]:
    with sekmet_client(sekmet, client_keys, scope=BROAD_SCOPE) as made:
        yield made


# -- failure injection ----------------------------------------------------------------------------
@dataclass
class Answer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    delay: float = 0.0


class FailureServer:
    """Answers each request with the next queued :class:`Answer` (the last one repeats) and
    records what it got. For failure injection only: the happy path runs on real servers."""

    def __init__(self) -> None:
        self.answers: list[Answer] = [Answer(503)]
        self.received: list[tuple[str, str, dict[str, str], bytes]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def handle_any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                server.received.append((self.command, self.path, dict(self.headers.items()),
                                        body))
                answer = server.answers.pop(0) if len(server.answers) > 1 else server.answers[0]
                if answer.delay:
                    time.sleep(answer.delay)
                content = b"" if answer.body is None else (
                    answer.body if isinstance(answer.body, bytes) else
                    json.dumps(answer.body).encode())
                try:
                    self.send_response(answer.status)
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(content)))
                    self.end_headers()
                    self.wfile.write(content)
                except OSError:  # the client gave up (timeout test)
                    pass

            do_GET = do_POST = do_PUT = do_DELETE = handle_any

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def failing() -> Iterator[FailureServer]:
    server = FailureServer()
    yield server
    server.close()


# -- every auth method, on both authorization servers ----------------------------------------------
AUTH_CASES = [("client_secret_basic", "rsa"), ("client_secret_post", "rsa"),
              ("private_key_jwt", "rsa"), ("private_key_jwt", "ec")]
AUTH_IDS = ["client_secret_basic", "client_secret_post", "private_key_jwt-RS384",
            "private_key_jwt-ES384"]


@pytest.mark.parametrize("method, key", AUTH_CASES, ids=AUTH_IDS)
def test_each_auth_method_gets_a_sekmet_token_and_creates_and_reads(
        sekmet: Sekmet, client_keys: ClientKeys, method: str, key: str) -> None:
    """sekmet's SMART token endpoint issues the token, sekmet validates it. The endpoint is
    discovered from /.well-known/smart-configuration (no token_url configured)."""
    with sekmet_client(sekmet, client_keys, method, key=key) as fhir:
        created = fhir.create(study(description=method))
        assert created.status == 201 and created.id
        read = fhir.read("ImagingStudy", created.id)
        assert read["description"] == method
        assert fhir.auth is not None and fhir.auth.token_url == sekmet.token_url
        assert fhir.auth.fetches == 1


@pytest.mark.parametrize("method, key", AUTH_CASES, ids=AUTH_IDS)
def test_each_auth_method_gets_an_oidc_provider_token_accepted_by_the_resource_server(
        oauth_server: OAuthServer, resource_server: ResourceServer, client_keys: ClientKeys,
        method: str, key: str) -> None:
    """oidc-provider issues the token; the resource server in front of sekmet verifies it with
    oidc-provider's JWKS. Its smart-configuration names oidc-provider's token endpoint."""
    auth = credentials(oauth_server, client_keys, method, key=key,
                       fhir_base_url=resource_server.base_url)
    with FhirClient(resource_server.base_url, auth=auth) as fhir:
        created = fhir.create(study(description=f"via oidc-provider {method}"))
        assert created.created
        assert fhir.read("ImagingStudy", str(created.id))["description"].endswith(method)
        assert auth.token_url == oauth_server.token_url
        assert auth.granted_scope == SCOPE


def test_discovery_falls_back_to_the_capability_statement(client: FhirClient,
                                                          sekmet: Sekmet) -> None:
    """SMART 1.0's oauth-uris extension in CapabilityStatement.rest.security (deprecated in
    2.x, still served by sekmet)."""
    assert token_url_from_capabilities(client.capabilities()) == sekmet.token_url
    assert token_url_from_capabilities({"resourceType": "CapabilityStatement"}) is None


def test_discovery_without_a_token_endpoint_is_an_auth_error(failing: FailureServer) -> None:
    failing.answers = [Answer(404), Answer(200, {"Content-Type": "application/fhir+json"},
                                           {"resourceType": "CapabilityStatement"})]
    auth = ClientCredentials("c", method="client_secret_basic", client_secret=Secret("s"),
                             fhir_base_url=failing.url + "/fhir")
    with pytest.raises(FhirAuthError, match=r"set fhir\.token_url"):
        auth.token()


# -- the token cache -------------------------------------------------------------------------------
def test_the_token_is_reused_while_valid_and_renewed_before_it_expires(
        sekmet: Sekmet, client_keys: ClientKeys) -> None:
    clock = FakeClock()
    with sekmet_client(sekmet, client_keys, clock=clock) as fhir:
        auth = fhir.auth
        assert auth is not None
        created = fhir.create(study())
        first = auth.token()
        for _ in range(3):
            fhir.read("ImagingStudy", str(created.id))
        assert auth.fetches == 1 and auth.token() == first
        clock.now += 300 - 61  # sekmet's tokens live 300 s; not yet in the last minute
        fhir.read("ImagingStudy", str(created.id))
        assert auth.fetches == 1
        clock.now += 2  # within a minute of expiry: renewed before the server would refuse it
        fhir.read("ImagingStudy", str(created.id))
        assert auth.fetches == 2 and auth.token() != first
        clock.now += 3600  # long expired: renewed too
        fhir.read("ImagingStudy", str(created.id))
        assert auth.fetches == 3


def test_threads_share_one_token(sekmet: Sekmet, client_keys: ClientKeys) -> None:
    """Eight threads start at once with an empty cache: one token request, every read works."""
    with sekmet_client(sekmet, client_keys, "client_secret_basic") as fhir:
        errors: list[BaseException] = []
        start = threading.Barrier(8)

        def work() -> None:
            start.wait()
            try:
                fhir.search("ImagingStudy", {"_id": "nothing-here"})
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        assert fhir.auth is not None and fhir.auth.fetches == 1


def test_a_401_renews_the_token_once_and_retries(
        oauth_server: OAuthServer, resource_server: ResourceServer,
        client_keys: ClientKeys) -> None:
    """The resource server revokes the cached token: the next request gets a real 401, the
    client fetches a new token and the request succeeds."""
    auth = credentials(oauth_server, client_keys, "private_key_jwt",
                       fhir_base_url=resource_server.base_url)
    with FhirClient(resource_server.base_url, auth=auth) as fhir:
        created = fhir.create(study())
        revoked = auth.token()
        resource_server.revoked.add(_jti(revoked))
        assert fhir.read("ImagingStudy", str(created.id))["id"] == created.id
        assert auth.fetches == 2 and auth.token() != revoked


def _jti(token: str) -> str:
    """The ``jti`` of a JWT access token, read without verifying (the test knows its issuer)."""
    import base64

    payload = token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"])


def test_a_second_401_is_an_auth_error_after_exactly_one_renewal(
        failing: FailureServer, sekmet: Sekmet, client_keys: ClientKeys) -> None:
    """A server that refuses every token: one renewal, one retry, then FhirAuthError."""
    failing.answers = [Answer(401, {"WWW-Authenticate": 'Bearer error="invalid_token"',
                                    "Content-Type": "application/fhir+json"},
                              {"resourceType": "OperationOutcome", "issue": [
                                  {"severity": "error", "code": "login",
                                   "diagnostics": "token not accepted"}]})]
    auth = credentials(sekmet, client_keys, "private_key_jwt", token_url=sekmet.token_url,
                       verify=str(sekmet.ca_file))
    with FhirClient(failing.url + "/fhir", auth=auth) as fhir, \
            pytest.raises(FhirAuthError) as error:
        fhir.read("ImagingStudy", "x")
    assert error.value.status == 401
    assert "token not accepted" in str(error.value)
    assert len(failing.received) == 2 and auth.fetches == 2


# -- refused credentials ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_a_wrong_client_secret_is_permanent_with_the_oauth_error(
        sekmet: Sekmet, oauth_server: OAuthServer, method: str) -> None:
    for server, token_url, verify in ((sekmet, sekmet.token_url, str(sekmet.ca_file)),
                                      (oauth_server, oauth_server.token_url, True)):
        client_id = POST_CLIENT if server is oauth_server and method.endswith("post") \
            else SECRET_CLIENT
        auth = ClientCredentials(client_id, method=method,  # type: ignore[arg-type]
                                 client_secret=Secret("not-the-secret"), scope=SCOPE,
                                 token_url=token_url, verify=verify)
        with pytest.raises(FhirAuthError) as error:
            auth.token()
        assert error.value.oauth_error == "invalid_client", str(error.value)
        assert error.value.status == 401
        assert "invalid_client" in str(error.value)
        assert not isinstance(error.value, FhirTransientError)


def test_an_unknown_client_or_key_is_refused(sekmet: Sekmet, oauth_server: OAuthServer,
                                             client_keys: ClientKeys) -> None:
    """sekmet looks the client up by iss; oidc-provider also picks the key by kid (sekmet
    0.1.1 ignores kid and tries every key registered for the client)."""
    unknown_client = ClientCredentials("nobody", private_key=client_keys.ec.pem,
                                       key_id=client_keys.ec.kid, scope=SCOPE,
                                       token_url=sekmet.token_url, verify=str(sekmet.ca_file))
    unknown_kid = ClientCredentials(JWT_CLIENT, private_key=client_keys.rsa.pem,
                                    key_id="not-registered", scope=SCOPE,
                                    token_url=oauth_server.token_url)
    for each in (unknown_client, unknown_kid):
        with pytest.raises(FhirAuthError) as error:
            each.token()
        assert error.value.oauth_error == "invalid_client"


def test_a_scope_sekmet_will_not_grant_is_permanent_with_the_reason(sekmet: Sekmet) -> None:
    """sekmet answers invalid_scope when none of the requested scopes is allowed."""
    auth = ClientCredentials(NARROW_CLIENT, method="client_secret_basic",
                             client_secret=sekmet.narrow_secret, scope="system/ImagingStudy.cu",
                             token_url=sekmet.token_url, verify=str(sekmet.ca_file))
    with pytest.raises(FhirAuthError) as error:
        auth.token()
    assert error.value.oauth_error == "invalid_scope"
    assert "system/ImagingStudy.cu" in str(error.value)


def test_a_partly_granted_scope_is_used_and_warned_about(
        sekmet: Sekmet, caplog: pytest.LogCaptureFixture) -> None:
    auth = ClientCredentials(NARROW_CLIENT, method="client_secret_basic",
                             client_secret=sekmet.narrow_secret,
                             scope="system/Patient.rs system/ImagingStudy.cu",
                             token_url=sekmet.token_url, verify=str(sekmet.ca_file))
    with caplog.at_level(logging.WARNING, logger="gateway.fhir_client"):
        auth.token()
    assert auth.granted_scope == "system/Patient.rs"
    assert "system/ImagingStudy.cu" in caplog.text
    with FhirClient(sekmet.base_url, auth=auth, ca_bundle=str(sekmet.ca_file)) as fhir, \
            pytest.raises(FhirPermanentError) as error:
        fhir.create(study())
    assert error.value.status == 403


def test_oidc_provider_drops_unknown_scopes_and_the_resource_server_says_403(
        oauth_server: OAuthServer, resource_server: ResourceServer) -> None:
    """oidc-provider does not answer invalid_scope: it silently issues a token without the
    unknown scope (and without a `scope` member, which RFC 6749 §5.1 reads as "as
    requested"). The refusal comes from the resource server, as a permanent 403."""
    auth = ClientCredentials(SECRET_CLIENT, method="client_secret_basic",
                             client_secret=oauth_server.basic_secret,
                             scope="system/Unknown.cruds", token_url=oauth_server.token_url)
    assert auth.token()
    assert auth.granted_scope is None
    with FhirClient(resource_server.base_url, auth=auth) as fhir, \
            pytest.raises(FhirPermanentError) as error:
        fhir.create(study())
    assert error.value.status == 403
    assert error.value.outcome is not None
    assert "do not allow c on ImagingStudy" in str(error.value)


# -- transient failures ----------------------------------------------------------------------------
def test_a_token_endpoint_that_is_down_or_failing_is_transient(
        failing: FailureServer) -> None:
    closed = ClientCredentials("c", method="client_secret_basic", client_secret=Secret("s"),
                               token_url=f"http://127.0.0.1:{free_port()}/token")
    with pytest.raises(FhirTransientError, match="cannot connect"):
        closed.token()
    failing.answers = [Answer(503, {"Retry-After": "17"})]
    busy = ClientCredentials("c", method="client_secret_basic", client_secret=Secret("s"),
                             token_url=failing.url + "/token")
    with pytest.raises(FhirTransientError) as error:
        busy.token()
    assert error.value.status == 503 and error.value.retry_after == 17
    failing.answers = [Answer(400, {"Content-Type": "text/html"}, b"<html>bad</html>")]
    with pytest.raises(FhirAuthError) as refused:
        busy.token()
    assert refused.value.status == 400


def test_a_valid_token_outlives_a_token_endpoint_outage(failing: FailureServer,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Renewal starts a minute early: if the token endpoint is down then, the current token is
    used until it really expires; only then does the outage become a transient error."""
    failing.answers = [Answer(200, {"Content-Type": "application/json"},
                              {"access_token": "first", "token_type": "Bearer",
                               "expires_in": 300}),
                       Answer(503, {"Retry-After": "30"})]
    clock = FakeClock()
    auth = ClientCredentials("c", method="client_secret_basic", client_secret=Secret("s"),
                             token_url=failing.url + "/token", clock=clock)
    assert auth.token() == "first"
    clock.now += 250  # due for renewal, not expired
    with caplog.at_level(logging.WARNING, logger="gateway.fhir_client"):
        assert auth.token() == "first"
    assert "token endpoint unavailable" in caplog.text
    clock.now += 60  # expired now
    with pytest.raises(FhirTransientError) as error:
        auth.token()
    assert error.value.retry_after == 30


def test_a_stopped_fhir_server_is_transient(sekmet: Sekmet, client_keys: ClientKeys) -> None:
    with sekmet_client(sekmet, client_keys, "client_secret_basic") as fhir:
        created = fhir.create(study())
        sekmet.stop()
        try:
            with pytest.raises(FhirTransientError, match="cannot connect") as error:
                fhir.read("ImagingStudy", str(created.id))
            assert error.value.status is None and error.value.retry_after is None
        finally:
            sekmet.start()
        assert fhir.read("ImagingStudy", str(created.id))["id"] == created.id


@pytest.mark.parametrize("status", [429, 503])
def test_429_and_503_are_transient_with_the_retry_after_delay(failing: FailureServer,
                                                             status: int) -> None:
    outcome = {"resourceType": "OperationOutcome",
               "issue": [{"severity": "error", "code": "throttled", "diagnostics": "slow down"}]}
    failing.answers = [Answer(status, {"Retry-After": "7"}, outcome)]
    with FhirClient(failing.url + "/fhir", timeout=10) as fhir:
        with pytest.raises(FhirTransientError) as error:
            fhir.create(study())
        assert error.value.status == status and error.value.retry_after == 7
        assert error.value.outcome == outcome and "slow down" in str(error.value)
        later = time.time() + 120
        failing.answers = [Answer(status, {"Retry-After": time.strftime(
            "%a, %d %b %Y %H:%M:%S GMT", time.gmtime(later))})]
        with pytest.raises(FhirTransientError) as dated:
            fhir.read("ImagingStudy", "x")
        assert dated.value.retry_after is not None and 60 < dated.value.retry_after <= 121


def test_parse_retry_after() -> None:
    assert parse_retry_after("120") == 120
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 - 30) == 30
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 + 30) == 0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_a_server_that_does_not_answer_in_time_is_transient(failing: FailureServer) -> None:
    failing.answers = [Answer(200, delay=3)]
    with FhirClient(failing.url + "/fhir", timeout=0.5) as fhir, \
            pytest.raises(FhirTransientError, match=r"no answer within 0\.5 s"):
        fhir.read("ImagingStudy", "x")


# -- permanent failures ----------------------------------------------------------------------------
def test_4xx_is_permanent_with_the_status_and_operation_outcome(client: FhirClient) -> None:
    with pytest.raises(FhirPermanentError) as invalid:
        client.create({"resourceType": "ImagingStudy", "status": "available"})  # no subject
    assert invalid.value.status == 400
    assert invalid.value.outcome is not None
    assert invalid.value.outcome["resourceType"] == "OperationOutcome"
    assert "ImagingStudy.subject" in str(invalid.value)
    assert not isinstance(invalid.value, FhirAuthError)
    with pytest.raises(FhirPermanentError) as missing:
        client.read("ImagingStudy", "does-not-exist")
    assert missing.value.status == 404


def test_error_messages_show_the_path_but_not_the_query(client: FhirClient) -> None:
    """Search parameters may carry patient identifiers; messages end up in logs."""
    with pytest.raises(FhirPermanentError) as error:
        client.search("ImagingStudy", {"patient.identifier": "MRN-SECRET-123", "_count": "x"})
    assert "/fhir/ImagingStudy" in str(error.value)
    assert "MRN-SECRET-123" not in str(error.value)


# -- TLS -------------------------------------------------------------------------------------------
def test_tls_is_verified_against_the_configured_ca_bundle(
        sekmet: Sekmet, client_keys: ClientKeys, monkeypatch: pytest.MonkeyPatch) -> None:
    # requests lets REQUESTS_CA_BUNDLE replace a Session's own `verify`; the client passes its
    # CA bundle on every request, so the variable cannot undo the configuration.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    with sekmet_client(sekmet, client_keys) as fhir:
        assert fhir.capabilities()["fhirVersion"].startswith("4.0")
    untrusting = credentials(sekmet, client_keys, "private_key_jwt",
                             fhir_base_url=sekmet.base_url)
    with pytest.raises(FhirAuthError, match="TLS certificate is not trusted"):
        untrusting.token()
    with FhirClient(sekmet.base_url) as anonymous, \
            pytest.raises(FhirAuthError, match=r"fhir\.ca_bundle"):
        anonymous.capabilities()


# -- the client assertion --------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["rsa", "ec"])
def test_the_client_assertion_on_the_wire_is_smart_conformant(
        failing: FailureServer, client_keys: ClientKeys, which: str) -> None:
    """SMART App Launch 2.x client-confidential-asymmetric / RFC 7523 §3, read from what the
    client actually posts (the injector refuses it, so each try signs a new one)."""
    pair = client_keys.rsa if which == "rsa" else client_keys.ec
    failing.answers = [Answer(400, {"Content-Type": "application/json"},
                              {"error": "invalid_client", "error_description": "recorded"})]
    token_url = failing.url + "/auth/token"
    auth = ClientCredentials(JWT_CLIENT, private_key=pair.pem, key_id=pair.kid, scope=SCOPE,
                             token_url=token_url)
    sent = []
    for _ in range(2):
        before = int(time.time())
        with pytest.raises(FhirAuthError, match="recorded"):
            auth.token()
        method, _, headers, body = failing.received[-1]
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        assert method == "POST" and "Authorization" not in headers
        assert form["grant_type"] == "client_credentials"
        assert form["scope"] == SCOPE
        assert form["client_assertion_type"] == \
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        token = jwt.decode(form["client_assertion"], pair.public_key,
                           algorithms=[pair.algorithm])
        assert token.header == {"alg": pair.algorithm, "kid": pair.kid, "typ": "JWT"}
        claims = token.claims
        assert claims["iss"] == claims["sub"] == JWT_CLIENT
        assert claims["aud"] == token_url
        assert 0 < claims["exp"] - before <= 300
        assert claims["exp"] > claims["iat"] >= before
        sent.append(claims["jti"])
    assert len(set(sent)) == 2 and all(len(j) >= 16 for j in sent)


def test_sekmet_accepts_consecutive_assertions(sekmet: Sekmet, client_keys: ClientKeys) -> None:
    """sekmet refuses a replayed jti: token requests in a row all succeed."""
    auth = credentials(sekmet, client_keys, "private_key_jwt", key="ec",
                       token_url=sekmet.token_url, verify=str(sekmet.ca_file))
    for _ in range(3):
        auth.invalidate(auth.token())
    assert auth.fetches == 3


# -- secrets ---------------------------------------------------------------------------------------
def test_secrets_never_appear_in_logs_reprs_or_errors(
        sekmet: Sekmet, oauth_server: OAuthServer, resource_server: ResourceServer,
        client_keys: ClientKeys, failing: FailureServer,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    tokens: list[str] = []
    for method in ("client_secret_basic", "client_secret_post", "private_key_jwt"):
        with sekmet_client(sekmet, client_keys, method) as fhir:
            fhir.create(study())
            assert fhir.auth is not None
            tokens.append(fhir.auth.token())
            texts += [repr(fhir), repr(fhir.auth)]
        auth = credentials(oauth_server, client_keys, method,
                           fhir_base_url=resource_server.base_url)
        with FhirClient(resource_server.base_url, auth=auth) as fhir:
            fhir.search("ImagingStudy", {"_count": "1"})
            tokens.append(auth.token())
            texts.append(repr(fhir))
    # failures carry no secret either
    for wrong in ("client_secret_basic", "client_secret_post"):
        bad = ClientCredentials(SECRET_CLIENT, method=wrong,  # type: ignore[arg-type]
                                client_secret=sekmet.client_secret, scope="system/Nope.x",
                                token_url=failing.url + "/token")
        failing.answers = [Answer(401, {"Content-Type": "application/json"},
                                  {"error": "invalid_client"})]
        with pytest.raises(FhirAuthError) as error:
            bad.token()
        texts += [str(error.value), repr(error.value), repr(bad)]
    settings = load_settings(environ={
        "GATEWAY_FHIR_BASE_URL": sekmet.base_url, "GATEWAY_FHIR_AUTH": "client_credentials",
        "GATEWAY_FHIR_CLIENT_ID": SECRET_CLIENT,
        "GATEWAY_FHIR_CLIENT_SECRET": sekmet.client_secret.reveal(),
        "GATEWAY_FHIR_CA_BUNDLE": str(sekmet.ca_file)})
    texts += [repr(settings), str(settings.fhir)]
    everything = caplog.text + "\n".join(texts)
    assert "access token for client" in caplog.text  # the logging did happen
    for secret in (sekmet.client_secret, oauth_server.basic_secret, oauth_server.post_secret):
        assert secret.reveal() not in everything
    pem_body = client_keys.rsa.pem.reveal().splitlines()[1]
    assert pem_body not in everything
    for token in tokens:
        assert token not in everything and token.split(".")[2] not in everything
    assert "client_assertion=" not in everything


# -- FHIR interactions on sekmet -------------------------------------------------------------------
def test_conditional_create_twice_creates_one_resource(client: FhirClient) -> None:
    resource = study()
    identifier = f"urn:dicom:uid|{resource['identifier'][0]['value']}"
    first = client.create(resource, if_none_exist=by_uid(resource))  # a query string
    second = client.create(resource, if_none_exist={"identifier": identifier})  # or a mapping
    assert (first.status, second.status) == (201, 200)
    assert first.id == second.id and first.version_id == second.version_id == "1"
    assert client.search("ImagingStudy", {"identifier": identifier})["total"] == 1


def test_update_with_a_stale_if_match_is_a_permanent_412(client: FhirClient) -> None:
    created = client.create(study())
    stored = dict(created.resource or {})
    updated = client.update({**stored, "description": "v2"}, if_match=created.version_id)
    assert updated.status == 200 and updated.version_id == "2"
    with pytest.raises(FhirPermanentError) as stale:
        client.update({**stored, "description": "v3"}, if_match="1")
    assert stale.value.status == 412
    assert stale.value.outcome and stale.value.outcome["issue"][0]["code"] == "conflict"
    assert client.read("ImagingStudy", str(created.id))["description"] == "v2"
    # An ETag works as well as a bare version id.
    assert client.update({**stored, "description": "v3"}, if_match='W/"2"').version_id == "3"


def test_conditional_update_creates_then_updates_and_sekmet_ignores_its_if_match(
        client: FhirClient) -> None:
    """PUT ImagingStudy?identifier=…: 201 when nothing matches, then 200 on the one match.
    sekmet 0.1.1 does not check If-Match on a *conditional* update (only on PUT by id): a
    stale version still updates. Publishers must not rely on If-Match there."""
    resource = study()
    created = client.update(resource, condition=by_uid(resource))
    assert created.status == 201
    again = client.update({**resource, "description": "second"}, condition=by_uid(resource))
    assert again.status == 200 and again.id == created.id and again.version_id == "2"
    stale = client.update({**resource, "description": "third"}, condition=by_uid(resource),
                          if_match="1")
    assert stale.status == 200 and stale.version_id == "3"  # sekmet behaviour, see docstring


def test_conditional_update_with_several_matches_is_a_permanent_412(client: FhirClient) -> None:
    resource = study()
    client.create(resource)
    client.create(resource)
    with pytest.raises(FhirPermanentError) as error:
        client.update(resource, condition=by_uid(resource))
    assert error.value.status == 412


def test_search_all_pages_to_the_end_asking_only_for_the_elements_given(
        client: FhirClient) -> None:
    system = f"urn:uuid:{uuid.uuid4()}"
    made = set()
    for n in range(5):
        resource = study(description=f"study {n}", note=[{"text": "long"}])
        resource["identifier"].append({"system": system, "value": str(n)})
        made.add(client.create(resource).id)
    bundle = client.search("ImagingStudy", {"identifier": f"{system}|"}, count=2)
    assert bundle["total"] == 5 and len(bundle["entry"]) == 2
    found = list(client.search_all("ImagingStudy", {"identifier": f"{system}|"},
                                   elements=["description"], count=2))
    assert {r["id"] for r in found} == made
    for resource in found:
        assert resource["description"].startswith("study ")
        assert "note" not in resource and "identifier" not in resource


def test_searches_are_strict_about_unknown_parameters(client: FhirClient) -> None:
    """Prefer: handling=strict (FHIR R4 search.html §3.1.1.1.2): a parameter the server does
    not know is an error, not silently dropped (which would return everything)."""
    with pytest.raises(FhirPermanentError) as error:
        client.search("ImagingStudy", {"description": "x"})
    assert error.value.status == 400


def test_search_all_does_not_follow_a_next_link_to_another_server(
        failing: FailureServer) -> None:
    page = {"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": {"resourceType": "Patient", "id": "a"}}],
            "link": [{"relation": "next", "url": "https://elsewhere.example/fhir/Patient?p=2"}]}
    failing.answers = [Answer(200, {"Content-Type": "application/fhir+json"}, page)]
    with FhirClient(failing.url + "/fhir") as fhir:
        results = fhir.search_all("Patient")
        assert next(results)["id"] == "a"
        with pytest.raises(FhirPermanentError, match="another server"):
            next(results)


def test_delete_is_harmless_twice(client: FhirClient) -> None:
    created = client.create(study())
    assert client.delete("ImagingStudy", str(created.id)) == 200
    with pytest.raises(FhirPermanentError) as gone:
        client.read("ImagingStudy", str(created.id))
    assert gone.value.status == 410
    assert client.delete("ImagingStudy", str(created.id)) in (200, 204, 404, 410)
    resource = study()
    client.create(resource)
    assert client.delete("ImagingStudy", condition=by_uid(resource)) == 200
    assert client.search("ImagingStudy", by_uid(resource))["total"] == 0


def test_transaction_is_all_or_nothing(client: FhirClient) -> None:
    uid = f"2.25.{uuid.uuid4().int}"
    patient_id = {"system": "urn:oid:1.2.3.4.5.1", "value": uuid.uuid4().hex}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:patient", "resource": {"resourceType": "Patient",
                                                     "identifier": [patient_id]},
         "request": {"method": "POST", "url": "Patient",
                     "ifNoneExist": f"identifier={patient_id['system']}|{patient_id['value']}"}},
        {"resource": {**study(uid), "subject": {"reference": "urn:uuid:patient"}},
         "request": {"method": "PUT",
                     "url": f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{uid}"}},
    ]}
    answer = client.transaction(bundle)
    assert answer["type"] == "transaction-response"
    assert [e["response"]["status"][:3] for e in answer["entry"]] == ["201", "201"]
    stored = client.search("ImagingStudy", [("identifier", f"urn:dicom:uid|urn:oid:{uid}")])
    subject = stored["entry"][0]["resource"]["subject"]["reference"]
    assert subject.startswith("Patient/")
    broken = {**bundle, "entry": [bundle["entry"][0], {
        "resource": {"resourceType": "ImagingStudy", "status": "available"},  # no subject
        "request": {"method": "POST", "url": "ImagingStudy"}}]}
    broken["entry"][0] = {**bundle["entry"][0], "request": {"method": "POST", "url": "Patient"}}
    before = client.search("Patient", [("identifier", patient_id["value"])])["total"]
    with pytest.raises(FhirPermanentError):
        client.transaction(broken)
    assert client.search("Patient", [("identifier", patient_id["value"])])["total"] == before


def test_capabilities_and_the_fhir_version(client: FhirClient) -> None:
    statement = client.capabilities()
    assert statement["resourceType"] == "CapabilityStatement"
    assert client.check_version().startswith("4.0")
    client.version = "R5"
    with pytest.raises(FhirPermanentError, match="configured for R5"):
        client.check_version()


def test_write_result_reads_id_and_version_from_the_headers() -> None:
    result = WriteResult(201, None, "https://h/fhir/ImagingStudy/abc/_history/4", None)
    assert (result.id, result.version_id, result.created) == ("abc", "4", True)
    assert WriteResult(200, {"id": "x", "meta": {"versionId": "9"}}, None, None).version_id == "9"


def test_invalid_ids_never_reach_the_url(client: FhirClient) -> None:
    for bad in ("../metadata", "a/b", "", "x" * 65, "a?b"):
        with pytest.raises(ValueError):
            client.read("ImagingStudy", bad)


# -- from the settings -----------------------------------------------------------------------------
def test_a_client_from_settings_with_the_secret_in_the_environment(sekmet: Sekmet) -> None:
    settings = load_settings(environ={
        "GATEWAY_FHIR_BASE_URL": sekmet.base_url, "GATEWAY_FHIR_AUTH": "client_credentials",
        "GATEWAY_FHIR_AUTH_METHOD": "client_secret_post", "GATEWAY_FHIR_CLIENT_ID": SECRET_CLIENT,
        "GATEWAY_FHIR_CLIENT_SECRET": sekmet.client_secret.reveal(),
        "GATEWAY_FHIR_CA_BUNDLE": str(sekmet.ca_file), "GATEWAY_FHIR_SCOPE": SCOPE})
    fhir = FhirClient.from_settings(settings.fhir)
    assert fhir is not None
    with fhir:
        assert fhir.create(study()).created
        assert fhir.auth is not None and fhir.auth.method == "client_secret_post"


def test_a_smart_backend_client_from_a_toml_file(sekmet: Sekmet, client_keys: ClientKeys,
                                                tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f"""
[fhir]
base_url = "{sekmet.base_url}"
client_id = "{EC_CLIENT}"
private_key_file = "{client_keys.ec.path}"
key_id = "{client_keys.ec.kid}"
ca_bundle = "{sekmet.ca_file}"
timeout = 20
""")
    settings = load_settings(config, environ={})
    assert settings.fhir["algorithm"] == "ES384"
    fhir = FhirClient.from_settings(settings.fhir)
    assert fhir is not None and fhir.auth is not None
    with fhir:
        assert fhir.search("ImagingStudy", {"_count": "1"})["resourceType"] == "Bundle"
        assert fhir.auth.token_url == sekmet.token_url and fhir.timeout == 20


def test_no_base_url_means_no_client() -> None:
    assert FhirClient.from_settings(load_settings(environ={}).fhir) is None
