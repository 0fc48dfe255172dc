"""The FHIR Endpoint for the gateway's DICOMweb (WADO-RS) service.

ImagingStudy.endpoint points viewers at a service that can retrieve the study (R4
imagingstudy notes; standards digest §2). One Endpoint is published per exposed service:

* ``connectionType`` = ``dicom-wado-rs`` from
  ``http://terminology.hl7.org/CodeSystem/endpoint-connection-type`` (R4: one Coding; R5: a
  list of CodeableConcepts);
* payload type text ``DICOM WADO-RS`` and the WADO-RS media types ``application/dicom``,
  ``application/dicom+json``, ``application/dicom+xml``, ``application/octet-stream`` (as the
  R4 WADO-RS example and the IHE MADO WADO endpoint profile give them; the payload type code
  system only defines ``any``/``none``, so no code is claimed). R4 has ``payloadType`` +
  ``payloadMimeType``; R5 moves both into ``payload``;
* ``address`` = the service base: scheme, authority and path, without ``/studies`` and
  without a trailing slash (clients append ``/studies/{uid}…``);
* ``identifier`` = the address as a URI (system ``urn:ietf:rfc:3986``), so the same Endpoint
  is found again with ``Endpoint?identifier=urn:ietf:rfc:3986|<address>`` and updated
  conditionally instead of duplicated.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from fhir_maps.errors import MappingError
from fhir_maps.facts import MappingOptions
from fhir_maps.identity import search_token
from fhir_maps.terminology import URI_SYSTEM

CONNECTION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
WADO_RS_CONNECTION: dict[str, str] = {"system": CONNECTION_TYPE_SYSTEM, "code": "dicom-wado-rs",
                                      "display": "DICOM WADO-RS"}
WADO_RS_PAYLOAD_TEXT = "DICOM WADO-RS"
WADO_RS_MIME_TYPES = ("application/dicom", "application/dicom+json", "application/dicom+xml",
                      "application/octet-stream")


def dicomweb_address(base_url: str | None) -> str:
    """The Endpoint.address for a DICOMweb base URL (validated, no trailing slash).

    Raises
    ------
    MappingError
        No URL, not absolute http(s), or it carries a query, a fragment or ``/studies``.
    """
    if not base_url or not base_url.strip():
        raise MappingError("no DICOMweb base URL is configured for the Endpoint")
    address = base_url.strip().rstrip("/")
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise MappingError(f"DICOMweb base URL {address!r} is not an absolute http(s) URL")
    if parts.query or parts.fragment or "?" in address or "#" in address:
        raise MappingError(f"DICOMweb base URL {address!r} must not have a query or fragment")
    if parts.path.rstrip("/").endswith("/studies"):
        raise MappingError(f"DICOMweb base URL {address!r} must be the service base, "
                           "without /studies")
    return address


def endpoint_identifier(base_url: str | None) -> dict[str, Any]:
    """The stable Endpoint identifier: its address as a URI (``urn:ietf:rfc:3986``)."""
    return {"system": URI_SYSTEM, "value": dicomweb_address(base_url)}


def endpoint_search_token(base_url: str | None) -> str:
    """``urn:ietf:rfc:3986|<address>`` for ``Endpoint?identifier=`` (conditional update)."""
    return search_token(URI_SYSTEM, dicomweb_address(base_url))


def build_endpoint(options: MappingOptions) -> dict[str, Any]:
    """The Endpoint JSON for the DICOMweb WADO-RS service at ``options.dicomweb_base_url``.

    Parameters
    ----------
    options
        ``dicomweb_base_url`` (required), ``endpoint_name``, ``fhir_version``.

    Returns
    -------
    dict
        An ``active`` Endpoint without ``id`` (publish it with a conditional update on
        :func:`endpoint_search_token` and reference it from ImagingStudy.endpoint).

    Raises
    ------
    MappingError
        The base URL is missing or malformed (see :func:`dicomweb_address`).
    """
    address = dicomweb_address(options.dicomweb_base_url)
    resource: dict[str, Any] = {
        "resourceType": "Endpoint",
        "identifier": [endpoint_identifier(address)],
        "status": "active",
    }
    payload_type = [{"text": WADO_RS_PAYLOAD_TEXT}]
    if options.fhir_version == "R4":
        resource["connectionType"] = dict(WADO_RS_CONNECTION)
        resource["name"] = options.endpoint_name
        resource["payloadType"] = payload_type
        resource["payloadMimeType"] = list(WADO_RS_MIME_TYPES)
    else:
        resource["connectionType"] = [{"coding": [dict(WADO_RS_CONNECTION)]}]
        resource["name"] = options.endpoint_name
        resource["payload"] = [{"type": payload_type, "mimeType": list(WADO_RS_MIME_TYPES)}]
    resource["address"] = address
    return resource
