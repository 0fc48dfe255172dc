"""Real servers for the FHIR side of the tests, started once per session on loopback ports.

- :class:`Sekmet`: sekmet-fhir 0.1.1, a FHIR R4 server (FastAPI + SQLite), over HTTPS with a
  certificate made for the session, with its own SMART Backend Services token endpoint
  (``/auth/token``, discovered through ``/fhir/.well-known/smart-configuration``). Its tokens
  are HS256 JWTs that only sekmet itself validates. Fresh data directory per session.
  Started and stopped by :mod:`bench.sekmet`, which the publish benchmark shares.
- :class:`OAuthServer`: oidc-provider 9.13.3 (node, ``tests/oauth/server.mjs``), a separate
  authorization server issuing RS256 JWT access tokens for client_secret_basic,
  client_secret_post and private_key_jwt clients.
- :class:`ResourceServer`: what an EMR puts in front of its FHIR store when tokens come from a
  separate authorization server. It verifies oidc-provider's tokens (signature against the
  server's JWKS, ``iss``, ``aud`` = its own base URL, ``exp``, SMART scopes per request),
  answers 401/403 like a resource server (RFC 6750 §3), and passes allowed requests on to
  sekmet, rewriting sekmet's URLs to its own. It also serves a smart-configuration naming
  oidc-provider's token endpoint.

Also here, for tests of anything that talks FHIR: :func:`study` (a minimal ImagingStudy),
:func:`credentials` / :func:`sekmet_client` (the test client as registered at each server), and
:class:`FailureServer` (fixture ``failing``), a tiny HTTP server for failure injection only
(429/503 with Retry-After, 401 forever, no answer in time, a token endpoint that records).

Both servers are installed by ``scripts/test.sh`` (``install_sekmet`` and
``npm_install tests/oauth`` in ``scripts/_env.sh``) into the git-ignored ``.infra/``. Client
keys (RSA 2048 for RS384, EC P-384 for ES384) are generated per session and registered with both
servers.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, RSAKey

from bench import sekmet as sekmet_process
from bench.sekmet import SEKMET_BIN, stop_process
from gateway.credentials import Secret
from gateway.fhir_client import ClientCredentials, FhirClient

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / ".infra"
OAUTH_MODULES = INFRA / "node" / "oauth" / "node_modules"  # npm_install tests/oauth
OAUTH_SCRIPT = Path(__file__).parent / "oauth" / "server.mjs"

#: The scopes the gateway asks for by default (gateway.config) plus a few more.
SCOPES = ("system/ImagingStudy.crus system/Endpoint.crus system/Patient.rs "
          "system/ServiceRequest.rs system/ImagingStudy.read system/ImagingStudy.write "
          "system/Patient.read")

JWT_CLIENT = "gw-jwt"  # private_key_jwt; on sekmet with the RSA key only
EC_CLIENT = "gw-jwt-ec"  # sekmet: private_key_jwt with the EC key (see Sekmet.settings)
SECRET_CLIENT = "gw-secret"  # client_secret_basic / _post (sekmet accepts both for one client)
POST_CLIENT = "gw-post"  # oidc-provider: registered for client_secret_post
NARROW_CLIENT = "gw-narrow"  # may only ask for system/Patient.rs


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_until(ready: Any, process: subprocess.Popen[bytes], log: Path, what: str,
                timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log.read_text()}")
        with contextlib.suppress(requests.RequestException):
            if ready():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout} s:\n{log.read_text()}")


# -- keys ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientKey:
    """A private key of the test client and its registered public JWK."""

    kid: str
    algorithm: str
    pem: Secret
    path: Path
    public_jwk: dict[str, Any]

    @property
    def public_key(self) -> RSAKey | ECKey:
        cls = RSAKey if self.algorithm == "RS384" else ECKey
        return cls.import_key(self.public_jwk)


@dataclass(frozen=True)
class ClientKeys:
    rsa: ClientKey
    ec: ClientKey

    @property
    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.rsa.public_jwk, self.ec.public_jwk]}


def make_client_keys(directory: Path) -> ClientKeys:
    """One RSA 2048 key (RS384) and one EC P-384 key (ES384), as PEM files and public JWKs."""
    made = []
    for kid, algorithm, key in (
            ("gw-rsa-1", "RS384", RSAKey.generate_key(2048, private=True)),
            ("gw-ec-1", "ES384", ECKey.generate_key("P-384", private=True))):
        path = directory / f"{kid}.pem"
        pem = key.as_pem(private=True)
        path.write_bytes(pem)
        path.chmod(0o600)
        public = key.as_dict(private=False)
        public.update({"kid": kid, "alg": algorithm, "use": "sig"})
        made.append(ClientKey(kid, algorithm, Secret(pem.decode()), path, public))
    return ClientKeys(*made)


# -- sekmet ----------------------------------------------------------------------------------------
@dataclass
class Sekmet:
    """sekmet-fhir serving FHIR R4 at ``base_url`` over HTTPS (certificate in ``ca_file``)."""

    root: Path
    keys: ClientKeys
    port: int = field(default_factory=free_port)
    client_secret: Secret = field(default_factory=lambda: Secret(secrets.token_urlsafe(24)))
    narrow_secret: Secret = field(default_factory=lambda: Secret(secrets.token_urlsafe(24)))
    #: static token the resource server uses towards sekmet (sekmet's "bearer" scheme)
    static_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    process: subprocess.Popen[bytes] | None = None

    @property
    def origin(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.origin}/fhir"

    @property
    def token_url(self) -> str:
        return f"{self.origin}/auth/token"

    @property
    def ca_file(self) -> Path:
        return self.root / "tls.crt"

    @property
    def log_file(self) -> Path:
        return self.root / sekmet_process.LOG_NAME

    def settings(self) -> dict[str, Any]:
        """sekmet's settings: HTTPS with a certificate made here, SMART clients, scopes."""
        if not self.ca_file.exists():
            subprocess.run([str(SEKMET_BIN), "keys", "tls-cert", "--out", str(self.root / "tls"),
                            "localhost", "127.0.0.1"], check=True, capture_output=True,
                           cwd=self.root)
        return {
            "base_url": self.base_url, "host": "127.0.0.1", "port": self.port,
            "data_dir": str(self.root / "data"), "own_private_key_path": str(self.root / "own.pem"),
            "tls_certfile": str(self.ca_file), "tls_keyfile": str(self.root / "tls.key"),
            "simulator": {"enabled": False}, "log_inbound": False,
            "server_auth": {
                "types": ["smart", "bearer"], "tokens": [self.static_token],
                "token_lifetime": 300, "enforce_scopes": True,
                "smart_clients": [
                    # One key type per client: sekmet 0.1.1 tries the registered keys in
                    # order and answers 500 when an ES384 assertion meets an RSA key first.
                    {"client_id": JWT_CLIENT, "jwks": {"keys": [self.keys.rsa.public_jwk]},
                     "scopes": "system/*.*"},
                    {"client_id": EC_CLIENT, "jwks": {"keys": [self.keys.ec.public_jwk]},
                     "scopes": "system/*.*"},
                    {"client_id": SECRET_CLIENT, "client_secret": self.client_secret.reveal(),
                     "scopes": "system/*.*"},
                    {"client_id": NARROW_CLIENT, "client_secret": self.narrow_secret.reveal(),
                     "scopes": "system/Patient.rs"},
                ],
            },
        }

    def start(self) -> Sekmet:
        reason = sekmet_process.missing_reason()
        if reason is not None:
            pytest.fail(reason)
        self.process = sekmet_process.start(self.settings(), self.root,
                                            verify=str(self.ca_file))
        return self

    def stop(self) -> None:
        stop_process(self.process)


# -- oidc-provider ---------------------------------------------------------------------------------
@dataclass
class OAuthServer:
    """oidc-provider issuing JWT access tokens for ``resource`` (the protected FHIR base)."""

    root: Path
    keys: ClientKeys
    resource: str
    basic_secret: Secret = field(default_factory=lambda: Secret(secrets.token_urlsafe(24)))
    post_secret: Secret = field(default_factory=lambda: Secret(secrets.token_urlsafe(24)))
    issuer: str = ""
    process: subprocess.Popen[bytes] | None = None

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/token"

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}/jwks"

    @property
    def log_file(self) -> Path:
        return self.root / "oauth.log"

    def start(self) -> OAuthServer:
        if not (OAUTH_MODULES / "oidc-provider").is_dir():
            pytest.fail("oidc-provider is not installed: run scripts/test.sh "
                        "(npm_install tests/oauth)")
        # ES modules resolve packages next to the script: run a copy beside node_modules.
        self.root.mkdir(parents=True, exist_ok=True)
        script = self.root / "server.mjs"
        shutil.copyfile(OAUTH_SCRIPT, script)
        link = self.root / "node_modules"
        if not link.exists():
            link.symlink_to(OAUTH_MODULES, target_is_directory=True)
        clients = [
            {"client_id": SECRET_CLIENT, "client_secret": self.basic_secret.reveal()},
            {"client_id": POST_CLIENT, "client_secret": self.post_secret.reveal(),
             "token_endpoint_auth_method": "client_secret_post"},
            {"client_id": JWT_CLIENT, "jwks": self.keys.jwks},
        ]
        clients_file = self.root / "clients.json"
        clients_file.write_text(json.dumps(clients))
        env = {**os.environ, "CLIENTS_FILE": str(clients_file), "RESOURCE": self.resource,
               "SCOPES": SCOPES, "TOKEN_TTL": "300"}
        log = open(self.log_file, "ab")  # noqa: SIM115 -- kept open for the child's lifetime
        self.process = subprocess.Popen(["node", str(script)], stdout=subprocess.PIPE,
                                        stderr=log, cwd=self.root, env=env)
        log.close()
        line = self._first_line()
        self.issuer = f"http://127.0.0.1:{int(line.split()[1])}"
        _wait_until(lambda: requests.get(f"{self.issuer}/.well-known/openid-configuration",
                                         timeout=2).ok, self.process, self.log_file,
                    "oidc-provider")
        return self

    def _first_line(self) -> str:
        """oidc-provider prints ``listening <port>`` once bound."""
        process = self.process
        if process is None or process.stdout is None:
            raise RuntimeError("oidc-provider not started")
        found: list[bytes] = []
        reader = threading.Thread(target=lambda: found.append(process.stdout.readline()),
                                  daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(60)
        if not found or not found[0].startswith(b"listening "):
            stop_process(process)
            raise RuntimeError(f"oidc-provider did not start:\n{self.log_file.read_text()}")
        return found[0].decode()

    def stop(self) -> None:
        stop_process(self.process)


# -- the resource server ---------------------------------------------------------------------------
_PERMISSION = {"GET": "rs", "HEAD": "rs", "POST": "c", "PUT": "u", "PATCH": "u", "DELETE": "d"}
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}


def scopes_allow(scopes: list[str], resource_type: str, needed: str) -> bool:
    """SMART v1/v2 system scopes (scopes-and-launch-context.html): does one of them allow any
    letter of ``needed`` on ``resource_type``?"""
    for scope in scopes:
        context, _, rest = scope.partition("/")
        kind, _, permissions = rest.partition(".")
        permissions = _V1.get(permissions.split("?")[0], permissions.split("?")[0])
        if context == "system" and kind in ("*", resource_type) and (
                set(needed) & set(permissions)):
            return True
    return False


class ResourceServer:
    """A SMART resource server in front of sekmet that trusts oidc-provider's tokens."""

    def __init__(self, upstream: Sekmet, port: int) -> None:
        self.upstream = upstream
        self.port = port
        self.issuer = ""
        self.keys: KeySet | None = None
        self.token_endpoint = ""
        #: ``jti`` of tokens this server no longer accepts (revoked)
        self.revoked: set[str] = set()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def trust(self, oauth: OAuthServer) -> None:
        self.issuer = oauth.issuer
        self.token_endpoint = oauth.token_url
        self.keys = KeySet.import_key_set(requests.get(oauth.jwks_url, timeout=10).json())

    def start(self) -> ResourceServer:
        gate = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def handle_any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                status, headers, content = gate.handle(self.command, self.path,
                                                       dict(self.headers.items()), body)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = handle_any

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def handle(self, method: str, path: str, headers: dict[str, str],
               body: bytes) -> tuple[int, dict[str, str], bytes]:
        route = path.split("?", 1)[0]
        if route == "/fhir/.well-known/smart-configuration":
            return 200, {"Content-Type": "application/json"}, json.dumps({
                "token_endpoint": self.token_endpoint,
                "token_endpoint_auth_methods_supported": [
                    "client_secret_basic", "client_secret_post", "private_key_jwt"],
                "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
                "grant_types_supported": ["client_credentials"],
                "capabilities": ["client-confidential-asymmetric", "permission-v2"],
            }).encode()
        if not route.startswith("/fhir"):
            return 404, {}, b""
        if route != "/fhir/metadata":
            refused = self.authorize(method, route, headers.get("Authorization", ""))
            if refused is not None:
                return refused
        forwarded = {k: v for k, v in headers.items() if k.lower() in (
            "accept", "content-type", "if-none-exist", "if-match", "prefer")}
        forwarded["Authorization"] = f"Bearer {self.upstream.static_token}"
        answer = requests.request(method, self.upstream.origin + path, data=body,
                                  headers=forwarded, timeout=30, allow_redirects=False,
                                  verify=str(self.upstream.ca_file))
        mine = self.base_url.encode()
        out = {k: v.replace(self.upstream.base_url, self.base_url)
               for k, v in answer.headers.items()
               if k.lower() in ("content-type", "etag", "location", "last-modified")}
        return answer.status_code, out, answer.content.replace(
            self.upstream.base_url.encode(), mine)

    def authorize(self, method: str, route: str,
                  header: str) -> tuple[int, dict[str, str], bytes] | None:
        """RFC 6750 §3: 401 invalid_token, 403 insufficient_scope, or ``None`` to let pass."""
        def refuse(status: int, error: str, text: str) -> tuple[int, dict[str, str], bytes]:
            outcome = {"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "login" if status == 401 else "forbidden",
                 "diagnostics": text}]}
            return status, {"Content-Type": "application/fhir+json",
                            "WWW-Authenticate": f'Bearer error="{error}"'}, \
                json.dumps(outcome).encode()

        if not header.startswith("Bearer ") or self.keys is None:
            return refuse(401, "invalid_token", "bearer token required")
        try:
            token = jwt.decode(header[7:], self.keys, algorithms=["RS256"])
            jwt.JWTClaimsRegistry(iss={"essential": True, "value": self.issuer},
                                  aud={"essential": True, "value": self.base_url},
                                  exp={"essential": True}).validate(token.claims)
        except (JoseError, ValueError) as exc:
            return refuse(401, "invalid_token", f"invalid access token: {exc}")
        if token.claims.get("jti") in self.revoked:
            return refuse(401, "invalid_token", "access token revoked")
        parts = [p for p in route.split("/") if p][1:]
        resource_type = parts[0] if parts and parts[0][:1].isupper() else "*"
        needed = _PERMISSION.get(method, "r")
        scopes = str(token.claims.get("scope", "")).split()
        if not scopes_allow(scopes, resource_type, needed):
            return refuse(403, "insufficient_scope",
                          f"scopes {' '.join(scopes) or '(none)'} do not allow {needed} on "
                          f"{resource_type}")
        return None


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def client_keys(tmp_path_factory: pytest.TempPathFactory) -> ClientKeys:
    """The test client's signing keys, made for this session."""
    return make_client_keys(tmp_path_factory.mktemp("client-keys"))


@pytest.fixture(scope="session")
def sekmet(tmp_path_factory: pytest.TempPathFactory, client_keys: ClientKeys) -> Iterator[Sekmet]:
    """sekmet-fhir with its SMART token endpoint, over HTTPS, fresh data."""
    server = Sekmet(tmp_path_factory.mktemp("sekmet"), client_keys).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def resource_server(sekmet: Sekmet) -> Iterator[ResourceServer]:
    """sekmet behind a resource server that accepts oidc-provider's tokens (see
    :class:`ResourceServer`); :func:`oauth_server` makes it trust the authorization server."""
    gate = ResourceServer(sekmet, free_port()).start()
    yield gate
    gate.stop()


@pytest.fixture(scope="session")
def oauth_server(tmp_path_factory: pytest.TempPathFactory, client_keys: ClientKeys,
                 resource_server: ResourceServer) -> Iterator[OAuthServer]:
    """oidc-provider issuing tokens for :func:`resource_server`."""
    server = OAuthServer(tmp_path_factory.mktemp("oauth"), client_keys,
                         resource=resource_server.base_url).start()
    resource_server.trust(server)
    yield server
    server.stop()


# -- resources and clients for these servers -------------------------------------------------------
#: Scopes the tests ask for unless they need more (gateway.config's default, less ServiceRequest).
SCOPE = "system/ImagingStudy.crus system/Endpoint.crus system/Patient.rs"
#: For REST tests that delete, and for transactions: sekmet authorises a transaction
#: (POST [base]) as "c" on every type ("*") rather than entry by entry.
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
def sekmet_fhir(sekmet: Sekmet, client_keys: ClientKeys) -> Iterator[FhirClient]:
    """A FhirClient of sekmet with a SMART Backend Services token (private_key_jwt, RS384,
    discovered token endpoint) and broad scopes."""
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
