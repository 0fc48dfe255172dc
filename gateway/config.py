"""Settings: one TOML file plus ``GATEWAY_<SECTION>_<KEY>`` environment overrides.

This is the only module that reads the environment. Everything is validated once, at start-up;
a bad value raises :class:`~gateway.errors.ConfigError` naming the key (``dimse.port``), which the
CLI prints as one line before exiting with status 2.

Every key is documented in ``docs/configuration.md``; ``tests/test_config.py`` checks that the
table there and :data:`SCHEMA` agree.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.credentials import SIGNING_ALGORITHMS, Secret, load_signing_key
from gateway.errors import ConfigError

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: 16 chars, no backslash


def _ae_title(key: str, value: Any) -> str:
    text = _string(key, value).strip()
    if not text or not _AE_RE.match(text):
        raise ConfigError(f"{key}: not a valid AE title (1-16 printable characters, no '\\'): "
                          f"{value!r}")
    return text


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _port(key: str, value: Any) -> int:
    number = _integer(key, value)
    if not 0 <= number <= 65535:
        raise ConfigError(f"{key}: must be a TCP port 0-65535, got {value!r}")
    return number


def _integer(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    raise ConfigError(f"{key}: expected an integer, got {value!r}")


def _positive(key: str, value: Any) -> int:
    number = _integer(key, value)
    if number < 1:
        raise ConfigError(f"{key}: must be at least 1, got {value!r}")
    return number


def _non_negative(key: str, value: Any) -> int:
    number = _integer(key, value)
    if number < 0:
        raise ConfigError(f"{key}: must be 0 or more, got {value!r}")
    return number


def _boolean(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    if isinstance(value, str) and value.strip().lower() in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _ae_list(key: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError(f"{key}: expected a list of AE titles, got {value!r}")
    return tuple(_ae_title(key, item) for item in items if str(item).strip())


def _url(key: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    text = _string(key, value).strip()
    if not re.match(r"^https?://[^/\s]+", text):
        raise ConfigError(f"{key}: expected an http(s) URL, got {value!r}")
    return text.rstrip("/")


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def parse(key: str, value: Any) -> str:
        text = _string(key, value).strip().lower()
        if text not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(choices)}; got {value!r}")
        return text

    return parse


def _optional_string(key: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    return _string(key, value)


def _exact_choice(*choices: str) -> Callable[[str, Any], str]:
    """Like :func:`_choice`, for values written in upper case (``R4``, ``RS384``)."""

    def parse(key: str, value: Any) -> str:
        text = _string(key, value).strip().upper()
        if text not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(choices)}; got {value!r}")
        return text

    return parse


def _optional(parse: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    def optional(key: str, value: Any) -> Any:
        return None if value is None or value == "" else parse(key, value)

    return optional


def _secret(key: str, value: Any) -> Secret | None:
    if value is None or value == "":
        return None
    if isinstance(value, Secret):
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string")  # never echo a secret
    return Secret(value)


def _seconds(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number of seconds, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected a number of seconds, got {value!r}") from None
    if not 0 < number < float("inf"):
        raise ConfigError(f"{key}: must be more than 0 seconds, got {value!r}")
    return number


def _wait(key: str, value: Any) -> float:
    """A number of seconds that may be 0."""
    return 0.0 if value in (0, "0", 0.0) else _seconds(key, value)


def _system_map(key: str, value: Any) -> dict[str, str]:
    """Issuer → identifier system URI: a TOML table, or ``ISSUER=uri,ISSUER2=uri2`` (env)."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        pairs = [item.partition("=") for item in value.split(",") if item.strip()]
        if any(not sep for _issuer, sep, _uri in pairs):
            raise ConfigError(f"{key}: expected ISSUER=system pairs separated by commas, "
                              f"got {value!r}")
        value = {issuer.strip(): uri.strip() for issuer, _sep, uri in pairs}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table of issuer = \"system URI\"")
    found = {}
    for issuer, uri in value.items():
        if not str(issuer).strip():
            raise ConfigError(f"{key}: an issuer must not be empty")
        found[str(issuer)] = _system_uri(f"{key}.{issuer}", uri)
    return found


def _system_uri(key: str, value: Any) -> str:
    text = _string(key, value).strip()
    if not re.match(r"^(urn:|https?://)\S+$", text):
        raise ConfigError(f"{key}: expected an identifier system URI (urn:oid:…, urn:uuid:…, "
                          f"http(s)://…), got {value!r}")
    return text


def _optional_system(key: str, value: Any) -> str | None:
    return None if value is None or value == "" else _system_uri(key, value)


def _timezone(key: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    text = _string(key, value).strip()
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{key}: not an IANA time zone name (e.g. Europe/Paris): "
                          f"{value!r}") from None
    return text


@dataclass(frozen=True)
class Key:
    """One configuration key: its parser, default and the sentence the reference table shows."""

    parse: Callable[[str, Any], Any]
    default: Any
    doc: str


#: section -> key -> definition. ``dimse.peers`` is a table of tables and handled separately.
SCHEMA: dict[str, dict[str, Key]] = {
    "dimse": {
        "ae_title": Key(_ae_title, "IMAGING_GW", "The gateway's own AE title (called AE)."),
        "host": Key(_string, "0.0.0.0", "Address the DICOM listener binds to."),
        "port": Key(_port, 11112, "DICOM listener port (0 picks a free port)."),
        "allowed_callers": Key(
            _ae_list, None,
            "Allow-list of calling AE titles; when set, others are rejected at association "
            "(A-ASSOCIATE-RJ, reason: calling AE title not recognised). Unset: any caller.",
        ),
        "check_called_ae": Key(
            _boolean, True,
            "Reject associations whose called AE title is not `ae_title` "
            "(reason: called AE title not recognised).",
        ),
        "max_pdu": Key(
            _non_negative, 0,
            "Maximum PDU length the gateway advertises for receiving, in bytes (0 = unlimited).",
        ),
        "workers": Key(
            _non_negative, 0,
            "Processes serving DICOM storage associations, the main one included: the main "
            "process accepts each association and hands a storage one to the least busy "
            "(`gateway/workers.py`); 1 = the main process alone; 0 = one per CPU core, at "
            "most 4.",
        ),
        "lean_upper_layer": Key(
            _boolean, True,
            "Serve associations with the gateway's lean DICOM Upper Layer "
            "(`gateway/receiver.py`: storage, verification, query/retrieve) unless they "
            "propose Storage Commitment, which pynetdicom serves; `false` hands every "
            "association to pynetdicom.",
        ),
        "network_timeout": Key(_positive, 60,
                               "Seconds of silence before an association is aborted."),
        "pending_interval": Key(
            _wait, 1.0,
            "C-MOVE and C-GET: a Pending response with the sub-operation counts (PS3.4 C.4.2.3.1, "
            "optional) is sent after a sub-operation once this many seconds have passed since "
            "the last response; 0 = after every sub-operation (each one costs the requester a "
            "response to decode: a C-MOVE of small images by a pynetdicom requester ran 1.4 to "
            "1.7 times faster without them). Associations served by pynetdicom (those proposing "
            "Storage Commitment) answer after every sub-operation.",
        ),
        "commitment_report_delay": Key(
            _wait, 0.5,
            "Storage Commitment (PS3.4 J.3.3): seconds after the N-ACTION response during which "
            "a requester that releases its association is noticed; one still open after that "
            "gets the N-EVENT-REPORT on the same association, otherwise the report goes on a "
            "new association to the requester's `[dimse.peers]` entry. 0 = report at once.",
        ),
    },
    "http": {
        "host": Key(_string, "0.0.0.0", "Address the HTTP server binds to."),
        "port": Key(_port, 8080,
                    "HTTP port for DICOMweb (`/dicomweb`), the API (`/api`) and health."),
        "public_url": Key(
            _url, None,
            "Externally visible base URL (e.g. `https://pacs.example.org`); used in Retrieve URLs "
            "and FHIR Endpoints. Default `http://<host>:<port>`.",
        ),
        "read_timeout": Key(
            _positive, 60,
            "Seconds an HTTP connection may stay silent (mid-upload, or idle between the "
            "requests of a kept-alive connection) before it is closed and any partial upload "
            "discarded.",
        ),
        "threads": Key(
            _positive, 32,
            "HTTP requests served at once (a pool of threads); more wait for a free one. An "
            "idle keep-alive connection takes none.",
        ),
        "max_request_bytes": Key(
            _positive, 2 * 1024**3,
            "Largest accepted request body (STOW-RS) in bytes; larger → 413.",
        ),
        "allow_delete": Key(
            _boolean, True,
            "Accept `DELETE` of studies, series and instances under `/dicomweb` (blobs and index "
            "rows go; the FHIR ImagingStudy is updated). `false` answers 405.",
        ),
        "qido_max_results": Key(
            _positive, 1000,
            "Most matches one QIDO-RS answer carries; a larger answer is cut with a `Warning` "
            "header and the client pages on with `offset`.",
        ),
    },
    "storage": {
        "path": Key(_string, "./data", "Directory holding the stored instances (and, by default, "
                                        "the SQLite index)."),
        "duplicate_policy": Key(
            _choice("reject", "replace"), "reject",
            "What a *different* object arriving with an already stored SOP Instance UID does: "
            "`reject` (keep the stored one; C-STORE 0x0111, STOW-RS 409) or `replace` "
            "(atomically replace the blob and its index row). An identical re-send is always a "
            "success that changes nothing.",
        ),
        "min_free_bytes": Key(
            _non_negative, 100 * 1024**2,
            "Free space to keep on the storage file system: below it, stores are refused with "
            "0xA700 (STOW-RS 503) so senders keep their copies and retry, instead of the disk "
            "filling up mid-transfer.",
        ),
        "fsync": Key(
            _boolean, True,
            "fsync every blob and its directory before acknowledging. Turn off only for "
            "throw-away test instances.",
        ),
        "fsync_directories": Key(
            _choice("auto", "always"), "auto",
            "`auto`: skip the directory fsync after a new blob's own fsync where the file "
            "system makes the blob's name durable with it (ext4, XFS on Linux); `always`: "
            "fsync the directory too, on any file system.",
        ),
        "backend": Key(
            _choice("files", "s3"), "files",
            "Where blobs are kept: `files` (under `path`) or `s3` (objects in `s3_bucket`; "
            "`path` then holds, in `s3-cache/`, the staging area and a local cache of blobs, "
            "and, by default, the SQLite index). With `s3` a C-STORE is acknowledged once S3 "
            "has answered the upload; credentials come from boto3's usual chain "
            "(`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, a profile, a service account's "
            "web identity, an instance role).",
        ),
        "s3_bucket": Key(_optional_string, None,
                         "The bucket of `backend = \"s3\"` (required then; it must exist)."),
        "s3_prefix": Key(_string, "",
                         "Prefix of every object name (e.g. `archive/`): an object is "
                         "`<s3_prefix><StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm`."),
        "s3_endpoint_url": Key(
            _optional_string, None,
            "Endpoint of an S3-compatible store (MinIO, Ceph, a cloud's S3 API); unset: AWS. "
            "Addressing is path-style when set.",
        ),
        "s3_region": Key(_optional_string, None,
                         "Region of the bucket (unset: boto3's default, `AWS_REGION`)."),
        "cache_max_bytes": Key(
            _non_negative, 10 * 1024**3,
            "`backend = \"s3\"`: most bytes of blobs kept in the local cache under `path` "
            "(new blobs and blobs read back); the least recently used go first.",
        ),
        "cache_new_blobs": Key(
            _boolean, False,
            "Keep newly stored blobs in the operating system's page cache. By default their "
            "pages are released once the blob is durable: an image is written once and seldom "
            "read back soon, so caching it would push out what is read often (the index, "
            "studies being retrieved), and released memory makes the next image's writes "
            "cheaper. Turn on when viewers read each new study within minutes of its arrival.",
        ),
    },
    "index": {
        "url": Key(
            _optional_string, None,
            "SQLAlchemy URL of the index. Default: `sqlite:///<storage.path>/index.sqlite`. "
            "PostgreSQL: `postgresql+psycopg://user:pass@host/db`.",
        ),
    },
    "log": {
        "level": Key(_choice("debug", "info", "warning", "error"), "info", "Log level."),
    },
    "publish": {
        "quiet_seconds": Key(
            _wait, 10.0,
            "A study is published once no instance has arrived for this long (and again after "
            "each later change).",
        ),
        "patient_policy": Key(
            _choice("create", "hold", "identifier"), "create",
            "When the FHIR server has no Patient with the study's patient identifier: `create` "
            "it from the DICOM demographics (conditional create), `hold` the study until the "
            "EMR knows the patient, or refer to the patient by `identifier` only.",
        ),
        "patient_system": Key(
            _optional_system, None,
            "Identifier system of Patient IDs that carry no Issuer of Patient ID (e.g. your "
            "MRN system `urn:oid:…`). Required when publishing is on.",
        ),
        "patient_systems": Key(
            _system_map, {},
            "Issuer of Patient ID → identifier system, as a table `[publish.patient_systems]` "
            "(`HOSP_A = \"urn:oid:…\"`) or `ISSUER=uri,…`. A patient whose issuer is not listed "
            "is not published (no guessing across sites); it waits in the failed list.",
        ),
        "accession_system": Key(
            _optional_system, None,
            "Identifier system of accession numbers without an issuer (used to find the "
            "ServiceRequest and in ImagingStudy.identifier).",
        ),
        "accession_systems": Key(
            _system_map, {},
            "Issuer of Accession Number → identifier system (table or `ISSUER=uri,…`).",
        ),
        "timezone": Key(
            _timezone, None,
            "IANA time zone of the modalities, for study and series times that carry no "
            "Timezone Offset From UTC. Unset: such times are published as dates only.",
        ),
        "on_delete": Key(
            _choice("entered-in-error", "delete"), "entered-in-error",
            "What a study deleted or entirely rejected becomes on the FHIR server: its "
            "ImagingStudy marked `entered-in-error`, or deleted.",
        ),
        "include_instances": Key(
            _boolean, True,
            "List every instance in ImagingStudy.series.instance (`false`: series and counts "
            "only, for very large studies).",
        ),
        "max_backoff": Key(
            _positive, 300,
            "Longest wait, in seconds, between attempts while the FHIR or OAuth server is "
            "unavailable (exponential back-off with jitter up to this).",
        ),
        "workers": Key(
            _positive, 4,
            "Studies published at the same time (each is a few requests to the FHIR server).",
        ),
        "hold_seconds": Key(
            _positive, 60,
            "With `patient_policy = \"hold\"`: seconds between looks for the Patient.",
        ),
    },
    "cohorts": {
        "cache_seconds": Key(
            _wait, 60.0,
            "How long a cohort's members, once evaluated against the FHIR server, are reused "
            "before the next use evaluates them again (0: every use).",
        ),
        "ae_prefix": Key(
            _ae_title, "COHORT_",
            "Cohort *n* answers C-FIND/C-MOVE/C-GET addressed to the AE title "
            "`<ae_prefix><n>`, seeing only its members.",
        ),
    },
    "fhir": {
        "base_url": Key(
            _url, None,
            "Base URL of the FHIR server that receives ImagingStudy and Endpoint "
            "(e.g. `https://emr.example.org/fhir/R4`). Unset: publishing is off and the other "
            "`fhir.*` keys are not checked.",
        ),
        "version": Key(_exact_choice("R4", "R5"), "R4", "FHIR release the server speaks: `R4` "
                                                         "(4.0.1) or `R5`."),
        "auth": Key(
            _choice("none", "client_credentials", "smart_backend"), "smart_backend",
            "How the gateway gets access tokens: `smart_backend` (SMART Backend Services: "
            "client credentials grant, `private_key_jwt` with RS384/ES384), "
            "`client_credentials` (OAuth2 client credentials grant with any `auth_method`) or "
            "`none` (no `Authorization` header).",
        ),
        "token_url": Key(
            _url, None,
            "OAuth2 token endpoint. Unset: discovered from "
            "`<base_url>/.well-known/smart-configuration` (falling back to the "
            "CapabilityStatement's `oauth-uris` extension).",
        ),
        "client_id": Key(_optional_string, None, "OAuth2 client id registered at the "
                                                 "authorization server (required unless "
                                                 "`auth = \"none\"`)."),
        "auth_method": Key(
            _optional(_choice("client_secret_basic", "client_secret_post", "private_key_jwt")),
            None,
            "Client authentication at the token endpoint: `client_secret_basic`, "
            "`client_secret_post` or `private_key_jwt`. Unset: `private_key_jwt` for "
            "`smart_backend` (the only method it allows), `client_secret_basic` otherwise.",
        ),
        "client_secret": Key(
            _secret, None,
            "Client secret for `client_secret_basic`/`_post`. Better kept out of the file: set "
            "`GATEWAY_FHIR_CLIENT_SECRET` or `client_secret_file`. Never logged.",
        ),
        "client_secret_file": Key(
            _optional_string, None,
            "File holding the client secret (a trailing newline is ignored), e.g. a mounted "
            "Kubernetes Secret. Read at start-up.",
        ),
        "private_key": Key(
            _secret, None,
            "PEM private key for `private_key_jwt`, for setting it through "
            "`GATEWAY_FHIR_PRIVATE_KEY`; prefer `private_key_file`. Never logged.",
        ),
        "private_key_file": Key(
            _optional_string, None,
            "PEM file with the private key that signs client assertions: RSA (≥ 2048 bits) for "
            "RS384 or EC P-384 for ES384. Its public key is registered at the authorization "
            "server (JWKS) under `key_id`. Read at start-up.",
        ),
        "key_id": Key(_optional_string, None,
                      "`kid` of the registered public key, sent in every client assertion "
                      "(required for `private_key_jwt`)."),
        "algorithm": Key(
            _optional(_exact_choice(*SIGNING_ALGORITHMS)), None,
            "Client assertion signature: `RS384` or `ES384`. Unset: the one that fits the key.",
        ),
        "scope": Key(
            _optional_string, None,
            "Scopes requested with every token (SMART v2 syntax; v1 servers want e.g. "
            "`system/ImagingStudy.write system/ImagingStudy.read …`). Unset: what the gateway "
            "needs, `system/*.rs system/ImagingStudy.cud system/Endpoint.cu` (reading and "
            "searching any resource, for cohorts and study context), plus `system/Patient.c` "
            "when `publish.patient_policy = \"create\"`.",
        ),
        "ca_bundle": Key(
            _optional_string, None,
            "PEM file of the CAs trusted for the FHIR server and the token endpoint (TLS is "
            "always verified). Unset: the system's CAs.",
        ),
        "timeout": Key(_seconds, 30,
                       "Seconds to wait for a connection or for the next bytes of an answer, "
                       "on every FHIR and token request."),
    },
}

_PEER_KEYS: dict[str, Key] = {
    "host": Key(_string, None, "Host name or address of the remote AE."),
    "port": Key(_port, None, "Port of the remote AE."),
}


@dataclass(frozen=True)
class Peer:
    """A remote AE the gateway may open associations to (e.g. a C-MOVE destination)."""

    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class Settings:
    """Validated settings, one attribute per section, each a mapping of key to typed value."""

    dimse: Mapping[str, Any]
    http: Mapping[str, Any]
    storage: Mapping[str, Any]
    index: Mapping[str, Any]
    log: Mapping[str, Any]
    fhir: Mapping[str, Any]
    publish: Mapping[str, Any] = field(default_factory=dict)
    cohorts: Mapping[str, Any] = field(default_factory=dict)
    peers: Mapping[str, Peer] = field(default_factory=dict)

    @property
    def storage_path(self) -> Path:
        return Path(self.storage["path"]).resolve()

    @property
    def index_url(self) -> str:
        url: str | None = self.index["url"]
        return url or f"sqlite:///{self.storage_path / 'index.sqlite'}"

    @property
    def public_url(self) -> str:
        """The externally visible HTTP base URL, without a trailing slash."""
        url: str | None = self.http["public_url"]
        if url:
            return url
        host = self.http["host"]
        if host in ("0.0.0.0", "::", ""):
            host = "localhost"
        return f"http://{host}:{self.http['port']}"

    @property
    def fhir_scope(self) -> str:
        """``fhir.scope``, or what publishing needs with the configured patient policy."""
        scope: str | None = self.fhir.get("scope")
        if scope:
            return scope
        # Read and search everything (cohorts and context search any clinical resource);
        # write only what publishing writes.
        scope = "system/*.rs system/ImagingStudy.cud system/Endpoint.cu"
        if self.publish.get("patient_policy") == "create":
            scope += " system/Patient.c"
        return scope

    @property
    def dimse_workers(self) -> int:
        """``dimse.workers`` with 0 (automatic) resolved: one per CPU core, at most 4."""
        workers: int = self.dimse["workers"]
        return workers or max(1, min(4, os.cpu_count() or 1))

    @property
    def dicomweb_url(self) -> str:
        """Base URL of the DICOMweb service (PS3.18 service base, no trailing slash)."""
        return f"{self.public_url}/dicomweb"


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Map ``GATEWAY_DIMSE_AE_TITLE=X`` to ``{"dimse": {"ae_title": "X"}}``."""
    result: dict[str, dict[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith("GATEWAY_"):
            continue
        rest = name[len("GATEWAY_"):].lower()
        section = next((s for s in SCHEMA if rest.startswith(s + "_")), None)
        if section is None:
            # Not ours: e.g. Kubernetes service links (GATEWAY_PORT, GATEWAY_SERVICE_HOST) for
            # a Service named "gateway". A misspelt key inside a known section still fails.
            continue
        key = rest[len(section) + 1:]
        if key not in SCHEMA[section]:
            raise ConfigError(f"{name}: unknown key {section}.{key}")
        result.setdefault(section, {})[key] = value
    return result


def _parse_peers(raw: Any) -> dict[str, Peer]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("dimse.peers: expected tables like [dimse.peers.AE_TITLE]")
    peers: dict[str, Peer] = {}
    for title, table in raw.items():
        where = f"dimse.peers.{title}"
        ae = _ae_title(where, title)
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table with host and port")
        unknown = set(table) - set(_PEER_KEYS)
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key")
        missing = set(_PEER_KEYS) - set(table)
        if missing:
            raise ConfigError(f"{where}.{sorted(missing)[0]}: required")
        peers[ae] = Peer(ae, _string(f"{where}.host", table["host"]),
                         _port(f"{where}.port", table["port"]))
    return peers


def load_settings(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Read, merge and validate the settings.

    Precedence, lowest first: defaults, the TOML file, ``GATEWAY_*`` variables, ``overrides``
    (used by tests and the CLI).
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    unknown_sections = set(data) - set(SCHEMA)
    if unknown_sections:
        raise ConfigError(f"{sorted(unknown_sections)[0]}: unknown section "
                          f"(known: {', '.join(SCHEMA)})")
    env = _env_overrides(os.environ if environ is None else environ)
    sections: dict[str, dict[str, Any]] = {}
    peers_raw = None
    for section, keys in SCHEMA.items():
        raw = data.get(section, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"{section}: expected a table [{section}], got {raw!r}")
        given = dict(raw)
        if section == "dimse":
            peers_raw = given.pop("peers", None)
        for key in given:
            if key not in keys:
                raise ConfigError(f"{section}.{key}: unknown key")
        given.update(env.get(section, {}))
        given.update((overrides or {}).get(section, {}))
        sections[section] = {
            key: (definition.parse(f"{section}.{key}", given[key]) if key in given
                  else definition.default)
            for key, definition in keys.items()
        }
    _resolve_fhir(sections["fhir"])
    if sections["storage"]["backend"] == "s3" and not sections["storage"]["s3_bucket"]:
        raise ConfigError("storage.s3_bucket: required when storage.backend = \"s3\"")
    if sections["fhir"]["base_url"] is not None and sections["publish"]["patient_system"] is None \
            and not sections["publish"]["patient_systems"]:
        raise ConfigError("publish.patient_system: required when fhir.base_url is set (the "
                          "identifier system of your Patient IDs, e.g. urn:oid:…)")
    return Settings(peers=_parse_peers(peers_raw), **sections)


def _read_secret_file(key: str, path: str) -> Secret:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not UTF-8 text") from None
    if not text:
        raise ConfigError(f"{key}: {path} is empty")
    return Secret(text)


def _one_of(fhir: dict[str, Any], value_key: str) -> tuple[Secret | None, str]:
    """The secret given inline or through ``<value_key>_file``, and the key that gave it."""
    file_key = f"{value_key}_file"
    inline, path = fhir[value_key], fhir[file_key]
    if inline is not None and path is not None:
        raise ConfigError(f"fhir.{file_key}: set either fhir.{value_key} or fhir.{file_key}, "
                          "not both")
    if path is not None:
        return _read_secret_file(f"fhir.{file_key}", path), f"fhir.{file_key}"
    return inline, f"fhir.{value_key}"


def _resolve_fhir(fhir: dict[str, Any]) -> None:
    """Check the ``[fhir]`` keys together, once publishing is on (``base_url`` set).

    Reads ``client_secret_file`` and ``private_key_file`` into ``client_secret`` and
    ``private_key`` (as :class:`~gateway.credentials.Secret`), and fills in the effective
    ``auth_method`` and ``algorithm``, so that a missing file, a key that cannot sign or a
    missing client id stops the gateway at start-up rather than at its first publish.
    SMART Backend Services (SMART App Launch 2.x, backend-services) requires asymmetric client
    authentication with a ``kid``; RFC 6749 §2.3.1 the client id with a secret.
    """
    if fhir["base_url"] is None:
        return
    fhir["client_secret"], _ = _one_of(fhir, "client_secret")
    fhir["private_key"], key_source = _one_of(fhir, "private_key")
    if fhir["ca_bundle"] is not None and not os.path.isfile(fhir["ca_bundle"]):
        raise ConfigError(f"fhir.ca_bundle: file not found: {fhir['ca_bundle']}")
    auth = fhir["auth"]
    if auth == "none":
        return
    method = fhir["auth_method"]
    if auth == "smart_backend":
        if method not in (None, "private_key_jwt"):
            raise ConfigError("fhir.auth_method: SMART Backend Services authenticates with "
                              'private_key_jwt; use auth = "client_credentials" for a client '
                              f"secret, got {method!r}")
        method = "private_key_jwt"
    fhir["auth_method"] = method = method or "client_secret_basic"
    if not fhir["client_id"]:
        raise ConfigError(f'fhir.client_id: required with auth = "{auth}"')
    if method != "private_key_jwt":
        if fhir["client_secret"] is None:
            raise ConfigError(f"fhir.client_secret: required with auth_method {method} (or "
                              "fhir.client_secret_file, or GATEWAY_FHIR_CLIENT_SECRET)")
        return
    if fhir["private_key"] is None:
        raise ConfigError("fhir.private_key_file: required with auth_method private_key_jwt "
                          "(or fhir.private_key / GATEWAY_FHIR_PRIVATE_KEY)")
    if not fhir["key_id"]:
        raise ConfigError("fhir.key_id: required with auth_method private_key_jwt (the kid "
                          "of the registered public key)")
    try:
        _, fitting = load_signing_key(fhir["private_key"], None)
    except ValueError as exc:
        raise ConfigError(f"{key_source}: {exc}") from None
    if fhir["algorithm"] not in (None, fitting):
        raise ConfigError(f"fhir.algorithm: {fhir['algorithm']} does not fit the key in "
                          f"{key_source}, which signs with {fitting}")
    fhir["algorithm"] = fitting


def setup_logging(settings: Settings) -> None:
    """Log lines to stderr at ``log.level``, each naming its process (main or receiver)."""
    logging.basicConfig(
        level=getattr(logging, settings.log["level"].upper()),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
