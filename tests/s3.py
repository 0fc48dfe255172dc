"""An S3 endpoint for the tests: moto's server (PyPI ``moto[s3,server]``, a test extra), which
speaks the real S3 wire protocol over HTTP on a free loopback port, started once per session.
Each test gets a bucket of its own (:func:`s3_bucket`).

MinIO and SeaweedFS are not installable here (../shared/infra.md); moto keeps objects in
memory, which is all a test needs of it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

#: What boto3 signs with against moto (which accepts any key unless told to check them).
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "gateway-test", "AWS_SECRET_ACCESS_KEY": "gateway-test",
               "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3Bucket:
    endpoint: str
    name: str

    def client(self) -> Any:
        import boto3

        return boto3.session.Session(
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1").client("s3", endpoint_url=self.endpoint)

    def objects(self) -> dict[str, bytes]:
        """Every object of the bucket: name → bytes."""
        s3 = self.client()
        listed = s3.list_objects_v2(Bucket=self.name).get("Contents", [])
        return {item["Key"]: s3.get_object(Bucket=self.name, Key=item["Key"])["Body"].read()
                for item in listed}

    def settings(self, **more: object) -> dict[str, object]:
        """The ``[storage]`` keys of a gateway keeping its blobs in this bucket."""
        return {"backend": "s3", "s3_bucket": self.name, "s3_endpoint_url": self.endpoint,
                "s3_region": "us-east-1", **more}


class MotoServer:
    def __init__(self, root: Path) -> None:
        from conftest import free_port

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = root / "moto.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        moto = Path(sys.executable).parent / "moto_server"
        if not moto.exists():
            pytest.fail("moto_server is not installed: run scripts/test.sh (the test extras)")
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
                                            stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **CREDENTIALS})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"moto_server exited: {self.log.read_text(errors='replace')}")
            try:
                requests.get(self.endpoint, timeout=1)
                return
            except requests.RequestException:
                time.sleep(0.1)
        pytest.fail("moto_server did not answer within 60 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: MotoServer) -> S3Bucket:
    """A new, empty bucket on :func:`s3_server`."""
    bucket = S3Bucket(s3_server.endpoint, f"gw-{uuid.uuid4().hex[:12]}")
    bucket.client().create_bucket(Bucket=bucket.name)
    return bucket
