"""gateway.fhir_http: what failures of the FHIR server mean (transient or permanent), and TLS.

Real sekmet for 4xx, a stopped server and TLS; a local HTTP server injects 429/503 with
Retry-After and answers too late.
"""

from __future__ import annotations

import time

import pytest

from gateway.errors import FhirAuthError, FhirPermanentError, FhirTransientError
from gateway.fhir_client import FhirClient
from gateway.fhir_http import parse_retry_after

from fhir_servers import (
    Answer,
    ClientKeys,
    FailureServer,
    Sekmet,
    credentials,
    sekmet_client,
    study,
)


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
def test_4xx_is_permanent_with_the_status_and_operation_outcome(sekmet_fhir: FhirClient) -> None:
    with pytest.raises(FhirPermanentError) as invalid:
        sekmet_fhir.create({"resourceType": "ImagingStudy", "status": "available"})  # no subject
    assert invalid.value.status == 400
    assert invalid.value.outcome is not None
    assert invalid.value.outcome["resourceType"] == "OperationOutcome"
    assert "ImagingStudy.subject" in str(invalid.value)
    assert not isinstance(invalid.value, FhirAuthError)
    with pytest.raises(FhirPermanentError) as missing:
        sekmet_fhir.read("ImagingStudy", "does-not-exist")
    assert missing.value.status == 404


def test_error_messages_show_the_path_but_not_the_query(sekmet_fhir: FhirClient) -> None:
    """Search parameters may carry patient identifiers; messages end up in logs."""
    with pytest.raises(FhirPermanentError) as error:
        sekmet_fhir.search("ImagingStudy", {"patient.identifier": "MRN-SECRET-123", "_count": "x"})
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
