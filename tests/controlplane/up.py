"""Start the test control plane (and, with --s3, SeaweedFS) for a person; stay up until Ctrl-C.

    $VENV/bin/python tests/controlplane/up.py [--workdir DIR] [--s3]

It prints the KUBECONFIG to use (and the S3 settings).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# This file's folder is sys.path[0]; the package is imported as `controlplane` from tests/ instead.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from controlplane.harness import ControlPlane  # noqa: E402
from controlplane.seaweed import SeaweedFS  # noqa: E402

BUILD_SCRIPT = Path(__file__).resolve().parent / "build.sh"


def k8s_bin_dir() -> Path:
    if os.environ.get("MEDMO_K8S_BIN"):
        return Path(os.environ["MEDMO_K8S_BIN"])
    return Path(subprocess.run([str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=True).stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="keep certificates, data and logs here (default: a temporary "
                                                     "directory, removed on exit)")
    parser.add_argument("--s3", action="store_true", help="also start SeaweedFS S3")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="medmo-controlplane-"))
    # SIGINT and SIGTERM both end the wait (SIGINT explicitly: a shell's background job starts with
    # it ignored), so servers are stopped either way.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.default_int_handler)
    servers: list[ControlPlane | SeaweedFS] = []
    try:
        plane = ControlPlane(workdir / "k8s", k8s_bin_dir()).start()
        servers.append(plane)
        print(f"export KUBECONFIG={plane.kubeconfig}")
        if args.s3:
            s3 = SeaweedFS(workdir / "s3").start()
            servers.append(s3)
            for name, value in s3.env().items():
                print(f"export {name}={value}")
        print(f"# logs: {workdir}/k8s/logs/; Ctrl-C stops everything", flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        for server in reversed(servers):
            server.stop()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
