"""Settings: one TOML file plus ``GATEWAY_<SECTION>_<KEY>`` environment overrides.

This is the only module that reads the environment. Everything is validated once, at start-up;
a bad value raises :class:`~gateway.errors.ConfigError` naming the key (``dimse.port``), which the
CLI prints as one line before exiting with status 2.

Every key is documented in ``docs/configuration.md``; ``tests/test_config.py`` checks that the
table there and :data:`SCHEMA` agree.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
            _positive, 1,
            "Receiver processes sharing the DICOM port (SO_REUSEPORT); 1 = in the main process.",
        ),
        "fast_storage": Key(
            _boolean, True,
            "Serve associations that propose only Storage and Verification with the lean "
            "receiver (`gateway/receiver.py`); `false` hands every association to pynetdicom.",
        ),
        "network_timeout": Key(_positive, 60,
                               "Seconds of silence before an association is aborted."),
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
            "Seconds an HTTP connection may stay silent (e.g. mid-upload) before it is closed "
            "and any partial upload discarded.",
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
    return Settings(peers=_parse_peers(peers_raw), **sections)
