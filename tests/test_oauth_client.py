"""gateway.oauth_client: OAuth2 client credentials against real authorization servers.

sekmet's SMART Backend Services token endpoint and oidc-provider issue the tokens (see
tests/fhir_servers.py); a local HTTP server injects failures only (a token endpoint that is
down, busy or records the client assertion it receives).
"""

from __future__ import annotations

import logging
import threading
import time
from urllib.parse import parse_qs

import pytest
from joserfc import jwt

from gateway.credentials import Secret
from gateway.errors import FhirAuthError, FhirPermanentError, FhirTransientError
from gateway.fhir_client import FhirClient
from gateway.oauth_client import ClientCredentials, token_url_from_capabilities

from fhir_servers import (
    JWT_CLIENT,
    NARROW_CLIENT,
    POST_CLIENT,
    SCOPE,
    SECRET_CLIENT,
    Answer,
    ClientKeys,
    FailureServer,
    FakeClock,
    OAuthServer,
    ResourceServer,
    Sekmet,
    credentials,
    free_port,
    sekmet_client,
    study,
)


def test_discovery_falls_back_to_the_capability_statement(sekmet_fhir: FhirClient,
                                                          sekmet: Sekmet) -> None:
    """SMART 1.0's oauth-uris extension in CapabilityStatement.rest.security (deprecated in
    2.x, still served by sekmet)."""
    assert token_url_from_capabilities(sekmet_fhir.capabilities()) == sekmet.token_url
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
