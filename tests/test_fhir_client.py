"""gateway.fhir_client against real servers (tests/fhir_servers.py).

Who validates what (also in test_oauth_client.py and test_fhir_http.py):

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
import uuid
from pathlib import Path

import pytest

from gateway.config import load_settings
from gateway.errors import FhirAuthError, FhirPermanentError
from gateway.fhir_client import (
    ClientCredentials,
    FhirClient,
    WriteResult,
)

from fhir_servers import (
    EC_CLIENT,
    SCOPE,
    SECRET_CLIENT,
    Answer,
    ClientKeys,
    FailureServer,
    OAuthServer,
    ResourceServer,
    Sekmet,
    by_uid,
    credentials,
    sekmet_client,
    study,
)

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
        "GATEWAY_FHIR_CA_BUNDLE": str(sekmet.ca_file),
        "GATEWAY_PUBLISH_PATIENT_SYSTEM": "urn:oid:1.2.3.4"})
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
def test_conditional_create_twice_creates_one_resource(sekmet_fhir: FhirClient) -> None:
    resource = study()
    identifier = f"urn:dicom:uid|{resource['identifier'][0]['value']}"
    first = sekmet_fhir.create(resource, if_none_exist=by_uid(resource))  # a query string
    second = sekmet_fhir.create(resource, if_none_exist={"identifier": identifier})  # or a mapping
    assert (first.status, second.status) == (201, 200)
    assert first.id == second.id and first.version_id == second.version_id == "1"
    assert sekmet_fhir.search("ImagingStudy", {"identifier": identifier})["total"] == 1


def test_update_with_a_stale_if_match_is_a_permanent_412(sekmet_fhir: FhirClient) -> None:
    created = sekmet_fhir.create(study())
    stored = dict(created.resource or {})
    updated = sekmet_fhir.update({**stored, "description": "v2"}, if_match=created.version_id)
    assert updated.status == 200 and updated.version_id == "2"
    with pytest.raises(FhirPermanentError) as stale:
        sekmet_fhir.update({**stored, "description": "v3"}, if_match="1")
    assert stale.value.status == 412
    assert stale.value.outcome and stale.value.outcome["issue"][0]["code"] == "conflict"
    assert sekmet_fhir.read("ImagingStudy", str(created.id))["description"] == "v2"
    # An ETag works as well as a bare version id.
    assert sekmet_fhir.update({**stored, "description": "v3"}, if_match='W/"2"').version_id == "3"


def test_conditional_update_creates_then_updates_and_sekmet_ignores_its_if_match(
        sekmet_fhir: FhirClient) -> None:
    """PUT ImagingStudy?identifier=…: 201 when nothing matches, then 200 on the one match.
    sekmet 0.1.1 does not check If-Match on a *conditional* update (only on PUT by id): a
    stale version still updates. Publishers must not rely on If-Match there."""
    resource = study()
    created = sekmet_fhir.update(resource, condition=by_uid(resource))
    assert created.status == 201
    again = sekmet_fhir.update({**resource, "description": "second"}, condition=by_uid(resource))
    assert again.status == 200 and again.id == created.id and again.version_id == "2"
    stale = sekmet_fhir.update({**resource, "description": "third"}, condition=by_uid(resource),
                          if_match="1")
    assert stale.status == 200 and stale.version_id == "3"  # sekmet behaviour, see docstring


def test_conditional_update_with_several_matches_is_a_permanent_412(
        sekmet_fhir: FhirClient) -> None:
    resource = study()
    sekmet_fhir.create(resource)
    sekmet_fhir.create(resource)
    with pytest.raises(FhirPermanentError) as error:
        sekmet_fhir.update(resource, condition=by_uid(resource))
    assert error.value.status == 412


def test_search_all_pages_to_the_end_asking_only_for_the_elements_given(
        sekmet_fhir: FhirClient) -> None:
    system = f"urn:uuid:{uuid.uuid4()}"
    made = set()
    for n in range(5):
        resource = study(description=f"study {n}", note=[{"text": "long"}])
        resource["identifier"].append({"system": system, "value": str(n)})
        made.add(sekmet_fhir.create(resource).id)
    bundle = sekmet_fhir.search("ImagingStudy", {"identifier": f"{system}|"}, count=2)
    assert bundle["total"] == 5 and len(bundle["entry"]) == 2
    found = list(sekmet_fhir.search_all("ImagingStudy", {"identifier": f"{system}|"},
                                   elements=["description"], count=2))
    assert {r["id"] for r in found} == made
    for resource in found:
        assert resource["description"].startswith("study ")
        assert "note" not in resource and "identifier" not in resource


def test_searches_are_strict_about_unknown_parameters(sekmet_fhir: FhirClient) -> None:
    """Prefer: handling=strict (FHIR R4 search.html §3.1.1.1.2): a parameter the server does
    not know is an error, not silently dropped (which would return everything)."""
    with pytest.raises(FhirPermanentError) as error:
        sekmet_fhir.search("ImagingStudy", {"description": "x"})
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


def test_delete_is_harmless_twice(sekmet_fhir: FhirClient) -> None:
    created = sekmet_fhir.create(study())
    assert sekmet_fhir.delete("ImagingStudy", str(created.id)) == 200
    with pytest.raises(FhirPermanentError) as gone:
        sekmet_fhir.read("ImagingStudy", str(created.id))
    assert gone.value.status == 410
    assert sekmet_fhir.delete("ImagingStudy", str(created.id)) in (200, 204, 404, 410)
    resource = study()
    sekmet_fhir.create(resource)
    assert sekmet_fhir.delete("ImagingStudy", condition=by_uid(resource)) == 200
    assert sekmet_fhir.search("ImagingStudy", by_uid(resource))["total"] == 0


def test_transaction_is_all_or_nothing(sekmet_fhir: FhirClient) -> None:
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
    answer = sekmet_fhir.transaction(bundle)
    assert answer["type"] == "transaction-response"
    assert [e["response"]["status"][:3] for e in answer["entry"]] == ["201", "201"]
    stored = sekmet_fhir.search("ImagingStudy", [("identifier", f"urn:dicom:uid|urn:oid:{uid}")])
    subject = stored["entry"][0]["resource"]["subject"]["reference"]
    assert subject.startswith("Patient/")
    broken = {**bundle, "entry": [bundle["entry"][0], {
        "resource": {"resourceType": "ImagingStudy", "status": "available"},  # no subject
        "request": {"method": "POST", "url": "ImagingStudy"}}]}
    broken["entry"][0] = {**bundle["entry"][0], "request": {"method": "POST", "url": "Patient"}}
    before = sekmet_fhir.search("Patient", [("identifier", patient_id["value"])])["total"]
    with pytest.raises(FhirPermanentError):
        sekmet_fhir.transaction(broken)
    assert sekmet_fhir.search("Patient", [("identifier", patient_id["value"])])["total"] == before


def test_capabilities_and_the_fhir_version(sekmet_fhir: FhirClient) -> None:
    statement = sekmet_fhir.capabilities()
    assert statement["resourceType"] == "CapabilityStatement"
    assert sekmet_fhir.check_version().startswith("4.0")
    sekmet_fhir.version = "R5"
    with pytest.raises(FhirPermanentError, match="configured for R5"):
        sekmet_fhir.check_version()


def test_write_result_reads_id_and_version_from_the_headers() -> None:
    result = WriteResult(201, None, "https://h/fhir/ImagingStudy/abc/_history/4", None)
    assert (result.id, result.version_id, result.created) == ("abc", "4", True)
    assert WriteResult(200, {"id": "x", "meta": {"versionId": "9"}}, None, None).version_id == "9"


def test_invalid_ids_never_reach_the_url(sekmet_fhir: FhirClient) -> None:
    for bad in ("../metadata", "a/b", "", "x" * 65, "a?b"):
        with pytest.raises(ValueError):
            sekmet_fhir.read("ImagingStudy", bad)


# -- from the settings -----------------------------------------------------------------------------
def test_a_client_from_settings_with_the_secret_in_the_environment(sekmet: Sekmet) -> None:
    settings = load_settings(environ={
        "GATEWAY_FHIR_BASE_URL": sekmet.base_url, "GATEWAY_FHIR_AUTH": "client_credentials",
        "GATEWAY_FHIR_AUTH_METHOD": "client_secret_post", "GATEWAY_FHIR_CLIENT_ID": SECRET_CLIENT,
        "GATEWAY_FHIR_CLIENT_SECRET": sekmet.client_secret.reveal(),
        "GATEWAY_FHIR_CA_BUNDLE": str(sekmet.ca_file), "GATEWAY_FHIR_SCOPE": SCOPE,
        "GATEWAY_PUBLISH_PATIENT_SYSTEM": "urn:oid:1.2.3.4"})
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

[publish]
patient_system = "urn:oid:1.2.3.4"
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


def test_each_exchange_counts_as_fhir_time_of_the_request_collecting_it(
        sekmet_fhir: FhirClient) -> None:
    """gateway.timing: what a request spent waiting for the FHIR server (Server-Timing)."""
    from gateway import timing

    token = timing.start()
    try:
        sekmet_fhir.search("Patient", {"_id": "does-not-exist"})
        with pytest.raises(FhirPermanentError):
            sekmet_fhir.search("Patient", {"no-such-parameter": "1"})
        collected = timing.current()
        assert collected is not None and collected.counts == {"fhir": 2}
        assert collected.seconds["fhir"] > 0
    finally:
        timing.stop(token)
