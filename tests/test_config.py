"""Settings (gateway.config): one TOML file plus ``GATEWAY_<SECTION>_<KEY>`` variables, checked
once at start-up.

The promise to the operator (docs/configuration.md): defaults that run out of the box; the
environment wins over the file; a bad or unknown value stops the gateway with exit code 2 and
one line that starts with the dotted key, so a typo never passes silently; and every key is
documented.

Every call passes ``environ`` explicitly, so the variables of whoever runs the tests do not leak
in.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import SCHEMA, Peer, load_settings
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "configuration.md"


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


# -- defaults, file, environment -----------------------------------------------------------------
def test_defaults_without_file_or_environment() -> None:
    settings = load_settings(environ={})
    assert settings.dimse["ae_title"] == "IMAGING_GW"
    assert settings.dimse["port"] == 11112
    assert settings.http["port"] == 8080
    assert settings.dimse["allowed_callers"] is None
    assert settings.storage["duplicate_policy"] == "reject"
    assert settings.peers == {}
    assert settings.storage_path == Path("./data").resolve()
    assert settings.index_url == f"sqlite:///{Path('./data').resolve() / 'index.sqlite'}"
    for section, keys in SCHEMA.items():
        for key, definition in keys.items():
            assert getattr(settings, section)[key] == definition.default, f"{section}.{key}"


@pytest.mark.parametrize("section, key", [(s, k) for s, keys in SCHEMA.items() for k in keys
                                          if keys[k].default is not None])
def test_every_default_is_a_valid_value_of_its_key(section: str, key: str) -> None:
    definition = SCHEMA[section][key]
    assert definition.parse(f"{section}.{key}", definition.default) == definition.default


def test_values_from_the_toml_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, f"""
[dimse]
ae_title = "PACS_GW"
port = 104
allowed_callers = ["CT_SCANNER_1", "MR_3T"]
check_called_ae = false

[http]
port = 8042
public_url = "https://imaging.example.org/"
max_request_bytes = 1048576

[storage]
path = "{tmp_path / 'blobs'}"
duplicate_policy = "replace"
fsync = false

[log]
level = "DEBUG"
""")
    settings = load_settings(path, environ={})
    assert settings.dimse["ae_title"] == "PACS_GW"
    assert settings.dimse["port"] == 104
    assert settings.dimse["allowed_callers"] == ("CT_SCANNER_1", "MR_3T")
    assert settings.dimse["check_called_ae"] is False
    assert settings.http["port"] == 8042
    assert settings.http["max_request_bytes"] == 1048576
    assert settings.public_url == "https://imaging.example.org"  # no trailing slash
    assert settings.dicomweb_url == "https://imaging.example.org/dicomweb"
    assert settings.storage["duplicate_policy"] == "replace"
    assert settings.storage["fsync"] is False
    assert settings.log["level"] == "debug"
    assert settings.storage_path == tmp_path / "blobs"
    assert settings.index_url == f"sqlite:///{tmp_path / 'blobs' / 'index.sqlite'}"
    assert settings.http["host"] == "0.0.0.0"  # not in the file: the default


def test_environment_variables_override_defaults() -> None:
    settings = load_settings(environ={
        "GATEWAY_DIMSE_AE_TITLE": "FROM_ENV",
        "GATEWAY_HTTP_PORT": "9090",
        "GATEWAY_DIMSE_ALLOWED_CALLERS": "A,B",
        "GATEWAY_STORAGE_FSYNC": "false",
        "GATEWAY_INDEX_URL": "postgresql+psycopg://gw@db/gw",
        "PATH": "/usr/bin",  # not ours: ignored
    })
    assert settings.dimse["ae_title"] == "FROM_ENV"
    assert settings.http["port"] == 9090
    assert settings.dimse["allowed_callers"] == ("A", "B")
    assert settings.storage["fsync"] is False
    assert settings.index_url == "postgresql+psycopg://gw@db/gw"


def test_environment_wins_over_the_file_and_overrides_over_both(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[dimse]\nae_title = "FROM_FILE"\nport = 104\n[http]\nport = 8081\n')
    environ = {"GATEWAY_HTTP_PORT": "9090", "GATEWAY_DIMSE_AE_TITLE": "FROM_ENV"}
    settings = load_settings(path, environ=environ)
    assert settings.http["port"] == 9090
    assert settings.dimse["ae_title"] == "FROM_ENV"
    assert settings.dimse["port"] == 104  # only in the file
    settings = load_settings(path, environ=environ, overrides={"http": {"port": 7070}})
    assert settings.http["port"] == 7070


def test_peers_table(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[dimse.peers.STORESCP]\nhost = "10.0.0.20"\nport = 104\n'
                           '[dimse.peers.WORKSTATION]\nhost = "ws.example.org"\nport = 11113\n')
    settings = load_settings(path, environ={})
    assert settings.peers == {"STORESCP": Peer("STORESCP", "10.0.0.20", 104),
                              "WORKSTATION": Peer("WORKSTATION", "ws.example.org", 11113)}


# -- bad values: ConfigError starting with the dotted key ----------------------------------------
BAD_FILES = [
    ("dimse.port", "[dimse]\nport = 70000"),
    ("dimse.port", '[dimse]\nport = "eleven"'),
    ("dimse.port", "[dimse]\nport = 104.5"),
    ("dimse.ae_title", '[dimse]\nae_title = "SEVENTEEN_CHARS_X"'),  # AE VR: 16 at most
    ("dimse.ae_title", '[dimse]\nae_title = "A\\\\B"'),  # backslash: the VR's delimiter
    ("dimse.ae_title", '[dimse]\nae_title = "   "'),
    ("dimse.ae_title", "[dimse]\nae_title = 42"),
    ("dimse.allowed_callers", '[dimse]\nallowed_callers = ["CT1", 5]'),
    ("dimse.allowed_callers", "[dimse]\nallowed_callers = 5"),
    ("dimse.check_called_ae", '[dimse]\ncheck_called_ae = "maybe"'),
    ("dimse.max_pdu", "[dimse]\nmax_pdu = -1"),
    ("dimse.workers", "[dimse]\nworkers = -1"),
    ("dimse.network_timeout", "[dimse]\nnetwork_timeout = true"),
    ("http.port", "[http]\nport = -1"),
    ("http.public_url", '[http]\npublic_url = "ftp://files.example.org"'),
    ("http.public_url", '[http]\npublic_url = "imaging.example.org"'),
    ("http.max_request_bytes", "[http]\nmax_request_bytes = 0"),
    ("http.threads", "[http]\nthreads = 0"),
    ("storage.path", "[storage]\npath = 5"),
    ("storage.duplicate_policy", '[storage]\nduplicate_policy = "overwrite"'),
    ("storage.min_free_bytes", "[storage]\nmin_free_bytes = -1"),
    ("storage.fsync", '[storage]\nfsync = "sometimes"'),
    ("storage.fsync_directories", '[storage]\nfsync_directories = "never"'),
    ("index.url", "[index]\nurl = 5"),
    ("log.level", '[log]\nlevel = "verbose"'),
    ("dimse.peers.STORESCP.port", '[dimse.peers.STORESCP]\nhost = "h"\nport = 99999'),
    ("dimse.peers.STORESCP.host", "[dimse.peers.STORESCP]\nport = 104"),
    ("dimse.peers.STORESCP.colour", '[dimse.peers.STORESCP]\nhost = "h"\nport = 1\ncolour = 1'),
    ("dimse.peers.SEVENTEEN_CHARS_X", '[dimse.peers.SEVENTEEN_CHARS_X]\nhost = "h"\nport = 1'),
    ("dimse.peers", "[dimse]\npeers = 5"),
    ("dimse.colour", '[dimse]\ncolour = "red"'),  # unknown key
    ("dicom", "[dicom]\nport = 104"),  # unknown section
    ("log", 'log = "debug"'),  # a section given as a value, not a table
    ("storage", "storage = 5"),
]


@pytest.mark.parametrize("key, text", BAD_FILES, ids=[f"{k}:{t.splitlines()[-1]}"
                                                      for k, t in BAD_FILES])
def test_bad_value_in_the_file_names_its_key(tmp_path: Path, key: str, text: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(_toml(tmp_path, text + "\n"), environ={})
    message = str(error.value)
    assert re.match(rf"{re.escape(key)}\b", message), message
    assert "\n" not in message


@pytest.mark.parametrize("variable, value, key", [
    ("GATEWAY_DIMSE_PORT", "abc", "dimse.port"),
    ("GATEWAY_HTTP_PORT", "65536", "http.port"),
    ("GATEWAY_STORAGE_FSYNC", "sometimes", "storage.fsync"),
    ("GATEWAY_DIMSE_ALLOWED_CALLERS", "CT1,WAY_TOO_LONG_AE_TITLE", "dimse.allowed_callers"),
    ("GATEWAY_LOG_LEVEL", "loud", "log.level"),
])
def test_bad_value_in_the_environment_names_its_key(variable: str, value: str, key: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(environ={variable: value})
    assert str(error.value).startswith(f"{key}:"), str(error.value)


def test_misspelt_key_in_a_known_section_is_rejected() -> None:
    """A misspelt variable is an error, named as it was set."""
    with pytest.raises(ConfigError) as error:
        load_settings(environ={"GATEWAY_DIMSE_COLOUR": "1"})
    assert str(error.value).startswith("GATEWAY_DIMSE_COLOUR:"), str(error.value)
    assert "dimse.colour" in str(error.value)


def test_variables_outside_the_known_sections_are_left_alone() -> None:
    """Kubernetes injects GATEWAY_PORT, GATEWAY_SERVICE_HOST… for a Service named "gateway";
    they are not settings and must not stop the gateway."""
    settings = load_settings(environ={"GATEWAY_PORT": "tcp://10.0.0.1:8080",
                                      "GATEWAY_SERVICE_HOST": "10.0.0.1",
                                      "GATEWAY_PORT_8080_TCP_ADDR": "10.0.0.1"})
    assert settings.http["port"] == 8080


def test_missing_file_and_invalid_toml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml", environ={})
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_settings(_toml(tmp_path, "[dimse\nport = 1\n"), environ={})


# -- the CLI -------------------------------------------------------------------------------------
def test_serve_with_a_bad_value_exits_2_with_one_line_naming_the_key(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[dimse]\nae_title = "IMAGING_GW"\nport = "eleven"\n')
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    result = subprocess.run([str(Path(sys.executable).parent / "imaging-gateway"), "serve",
                             "--config", str(path)], capture_output=True, text=True,
                            timeout=60, env=environ)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "dimse.port" in lines[0], lines[0]
    assert result.stdout == ""


# -- the reference table -------------------------------------------------------------------------
def _documented() -> dict[str, str]:
    """docs/configuration.md table rows: `section.key` → its default cell (backticks removed)."""
    assert DOCS.exists(), f"{DOCS} is missing"
    rows: dict[str, str] = {}
    for line in DOCS.read_text().splitlines():
        match = re.match(r"^\|\s*`([A-Za-z_]+(?:\.[A-Za-z0-9_<>]+)+)`\s*\|([^|]*)\|", line)
        if match:
            rows[match.group(1)] = match.group(2).strip().strip("`")
    return rows


def _shown(default: object) -> str:
    if default is None:
        return "—"
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, str):
        return f'"{default}"'
    return str(default)


def test_every_key_is_documented_with_its_default() -> None:
    documented = _documented()
    expected = {f"{s}.{k}" for s, keys in SCHEMA.items() for k in keys}
    expected |= {"dimse.peers.<AE>.host", "dimse.peers.<AE>.port"}
    assert sorted(expected - set(documented)) == [], "keys missing from docs/configuration.md"
    assert sorted(set(documented) - expected) == [], "documented keys that do not exist"
    for section, keys in SCHEMA.items():
        for key, definition in keys.items():
            assert documented[f"{section}.{key}"] == _shown(definition.default), \
                f"{section}.{key}: documented default differs"


def test_the_documented_example_is_a_valid_configuration(tmp_path: Path) -> None:
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert blocks, "no ```toml example in docs/configuration.md"
    for block in blocks:
        load_settings(_toml(tmp_path, block), environ={})


# -- [fhir]: publishing and its OAuth2 credentials -------------------------------------------------
FHIR_ON = {"GATEWAY_FHIR_BASE_URL": "https://emr.example.org/fhir/R4",
           "GATEWAY_PUBLISH_PATIENT_SYSTEM": "urn:oid:1.2.3.4"}


@pytest.fixture(scope="module")
def pem_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from joserfc.jwk import ECKey, RSAKey

    folder = tmp_path_factory.mktemp("keys")
    keys = {"rsa": RSAKey.generate_key(2048, private=True),
            "ec384": ECKey.generate_key("P-384", private=True),
            "ec256": ECKey.generate_key("P-256", private=True)}
    paths = {}
    for name, key in keys.items():
        paths[name] = folder / f"{name}.pem"
        paths[name].write_bytes(key.as_pem(private=True))
    paths["garbage"] = folder / "garbage.pem"
    paths["garbage"].write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    return paths


def test_fhir_publishing_is_off_by_default_and_then_nothing_else_is_checked() -> None:
    settings = load_settings(environ={"GATEWAY_FHIR_PRIVATE_KEY_FILE": "/nowhere.pem"})
    assert settings.fhir["base_url"] is None
    assert settings.fhir["auth"] == "smart_backend" and settings.fhir["version"] == "R4"


def test_fhir_client_secret_from_the_environment_or_a_file(tmp_path: Path) -> None:
    common = {**FHIR_ON, "GATEWAY_FHIR_AUTH": "client_credentials",
              "GATEWAY_FHIR_CLIENT_ID": "gw"}
    settings = load_settings(environ={**common, "GATEWAY_FHIR_CLIENT_SECRET": "s3cret!"})
    assert settings.fhir["client_secret"].reveal() == "s3cret!"
    assert settings.fhir["auth_method"] == "client_secret_basic"
    assert "s3cret!" not in repr(settings) and "s3cret!" not in str(settings.fhir)
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-a-file\n")  # as `echo … > file` or a Kubernetes Secret leaves it
    settings = load_settings(environ={**common, "GATEWAY_FHIR_CLIENT_SECRET_FILE":
                                      str(secret_file),
                                      "GATEWAY_FHIR_AUTH_METHOD": "client_secret_post"})
    assert settings.fhir["client_secret"].reveal() == "from-a-file"
    assert settings.fhir["auth_method"] == "client_secret_post"


def test_fhir_smart_backend_key_from_a_file_or_the_environment(pem_keys: dict[str, Path]) -> None:
    common = {**FHIR_ON, "GATEWAY_FHIR_CLIENT_ID": "gw", "GATEWAY_FHIR_KEY_ID": "k1"}
    from_file = load_settings(environ={**common,
                                       "GATEWAY_FHIR_PRIVATE_KEY_FILE": str(pem_keys["ec384"])})
    assert from_file.fhir["algorithm"] == "ES384"
    assert from_file.fhir["auth_method"] == "private_key_jwt"
    pem = pem_keys["rsa"].read_text()
    from_env = load_settings(environ={**common, "GATEWAY_FHIR_PRIVATE_KEY": pem,
                                      "GATEWAY_FHIR_ALGORITHM": "rs384"})
    assert from_env.fhir["algorithm"] == "RS384"
    assert pem.splitlines()[1] not in repr(from_env)


BAD_FHIR = [
    ({"GATEWAY_FHIR_VERSION": "R3"}, "fhir.version"),
    ({"GATEWAY_FHIR_AUTH": "magic"}, "fhir.auth"),
    ({"GATEWAY_FHIR_TIMEOUT": "0"}, "fhir.timeout"),
    ({"GATEWAY_FHIR_TIMEOUT": "soon"}, "fhir.timeout"),
    ({"GATEWAY_FHIR_BASE_URL": "ftp://emr/fhir"}, "fhir.base_url"),
    ({"GATEWAY_FHIR_ALGORITHM": "HS256"}, "fhir.algorithm"),
    ({"GATEWAY_FHIR_AUTH_METHOD": "client_secret_jwt"}, "fhir.auth_method"),
    ({"GATEWAY_FHIR_AUTH": "client_credentials"}, "fhir.client_id"),
    ({"GATEWAY_FHIR_AUTH": "client_credentials", "GATEWAY_FHIR_CLIENT_ID": "gw"},
     "fhir.client_secret"),
    ({"GATEWAY_FHIR_AUTH": "client_credentials", "GATEWAY_FHIR_CLIENT_ID": "gw",
      "GATEWAY_FHIR_CLIENT_SECRET": "x", "GATEWAY_FHIR_CLIENT_SECRET_FILE": "/etc/hostname"},
     "fhir.client_secret_file"),
    ({"GATEWAY_FHIR_AUTH": "client_credentials", "GATEWAY_FHIR_CLIENT_ID": "gw",
      "GATEWAY_FHIR_CLIENT_SECRET_FILE": "/no/such/secret"}, "fhir.client_secret_file"),
    ({"GATEWAY_FHIR_CLIENT_ID": "gw", "GATEWAY_FHIR_AUTH_METHOD": "client_secret_basic",
      "GATEWAY_FHIR_CLIENT_SECRET": "x"}, "fhir.auth_method"),
    ({"GATEWAY_FHIR_CLIENT_ID": "gw", "GATEWAY_FHIR_KEY_ID": "k"}, "fhir.private_key_file"),
    ({"GATEWAY_FHIR_CLIENT_ID": "gw", "GATEWAY_FHIR_PRIVATE_KEY_FILE": "ec384"}, "fhir.key_id"),
    ({"GATEWAY_FHIR_CLIENT_ID": "gw", "GATEWAY_FHIR_KEY_ID": "k",
      "GATEWAY_FHIR_PRIVATE_KEY_FILE": "garbage"}, "fhir.private_key_file"),
    ({"GATEWAY_FHIR_CLIENT_ID": "gw", "GATEWAY_FHIR_KEY_ID": "k",
      "GATEWAY_FHIR_PRIVATE_KEY_FILE": "ec256"}, "fhir.private_key_file"),
    ({"GATEWAY_FHIR_CLIENT_ID": "gw", "GATEWAY_FHIR_KEY_ID": "k",
      "GATEWAY_FHIR_PRIVATE_KEY_FILE": "ec384", "GATEWAY_FHIR_ALGORITHM": "RS384"},
     "fhir.algorithm"),
    ({"GATEWAY_FHIR_CLIENT_ID": "gw", "GATEWAY_FHIR_KEY_ID": "k",
      "GATEWAY_FHIR_PRIVATE_KEY": "not a key"}, "fhir.private_key"),
    ({"GATEWAY_FHIR_AUTH": "none", "GATEWAY_FHIR_CA_BUNDLE": "/no/such/ca.pem"},
     "fhir.ca_bundle"),
]


@pytest.mark.parametrize("variables, key", BAD_FHIR,
                         ids=[f"{k}:{'+'.join(v).removeprefix('GATEWAY_FHIR_')}"
                              for v, k in BAD_FHIR])
def test_a_bad_fhir_setting_names_its_key_in_one_line(
        variables: dict[str, str], key: str, pem_keys: dict[str, Path]) -> None:
    environ = {**FHIR_ON, **{name: str(pem_keys.get(value, value))
                             for name, value in variables.items()}}
    with pytest.raises(ConfigError) as error:
        load_settings(environ=environ)
    message = str(error.value)
    assert re.match(rf"{re.escape(key)}\b", message), message
    assert "\n" not in message
    assert "BEGIN" not in message and "s3cret" not in message


def test_dimse_workers_default_to_one_process_per_core_up_to_four() -> None:
    assert load_settings(environ={}).dimse_workers == max(1, min(4, os.cpu_count() or 1))
    assert load_settings(environ={"GATEWAY_DIMSE_WORKERS": "3"}).dimse_workers == 3
    assert load_settings(environ={"GATEWAY_DIMSE_WORKERS": "1"}).dimse_workers == 1
