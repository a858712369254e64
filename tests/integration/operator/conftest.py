"""The operator on the real control plane, running as its ServiceAccount with the ClusterRole from
manifests/base (not as admin), with the node agent running the pods.

  operator_ns   (module)   the CRD and manifests/base's namespace and RBAC applied
  operator      (module)   a running `medmo operator` process (``.restart()``, ``.kill()``, ``.log``)
  kueue         (module)   Kueue's manager with its CRDs and webhooks (``controlplane.kueue.Kueue``;
                           $MEDMO_KUEUE_BIN, else built once by tests/kueue/build.sh: a cold build
                           takes minutes), a ResourceFlavor KUEUE_FLAVOR and
                           the WorkloadPriorityClasses research-low (100) and research-high (1000)
The images STANDIN_IMAGE (entrypoint: standin_trainer.py beside this file) and TRAINER_IMAGE (the
trainer's entrypoint) are in tests/medmo_cases.py.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from medmo_operator import crd, render

from medmo_cases import REPO, STANDIN_IMAGE, TRAINER_IMAGE

from controlplane.kueue import Kueue



RBAC_REFUSAL = re.compile(r'forbidden: User \\?"[^"\\]+\\?" cannot [a-z]+ resource \\?"[^"\\]+\\?"[^,\n]*')
"""How the API server words an authorization refusal; other 403s (a namespace being deleted under a
run another test left behind) are no fault of the ClusterRole."""


def _standin_image() -> Path:
    """The stand-in "image": its script copied outside /tmp. Learner pods mount an emptyDir at
    /tmp, which hides whatever an image holds there, as in a real container; a checkout under /tmp
    would otherwise vanish from the pod's view."""
    source = Path(__file__).with_name("standin_trainer.py")
    target = Path(os.environ.get("MEDMO_CACHE", Path.home() / ".cache" / "medmo")) / "images" / "standin-trainer" / source.name
    if not target.exists() or target.read_bytes() != source.read_bytes():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(source.read_bytes())
        os.replace(tmp, target)
    return target


ENTRYPOINTS = {
    STANDIN_IMAGE: [sys.executable, str(_standin_image())],
    TRAINER_IMAGE: render.TRAINER_ENTRYPOINT,
}


@pytest.fixture(autouse=True)
def _storage_writable_by_pods(tmp_path):
    """Runs store under tmp_path (file:// storage: a hostPath in the pods, which run as the
    trainer's non-root user): handed to that user, as a cluster admin prepares a hostPath."""
    os.chown(tmp_path, render.TRAINER_UID, render.TRAINER_UID)


@pytest.fixture(scope="module")
def operator_ns(control_plane, node_agent):
    """CRD, operator namespace and RBAC; the node agent learns the test images' entrypoints."""
    node_agent.runner.entrypoints.update(ENTRYPOINTS)
    control_plane.kubectl("apply", "-f", str(crd.CRD_PATH))
    control_plane.wait_established("medmotrainings.medmo.io")
    for manifest in ("namespace.yaml", "rbac.yaml"):
        control_plane.kubectl("apply", "-f", str(REPO / "manifests" / "base" / manifest))
    return "medmo-system"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _service_account_kubeconfig(control_plane, path: Path) -> Path:
    """A kubeconfig that authenticates as medmo-system/medmo-operator: the operator gets exactly
    the ClusterRole's permissions."""
    token = control_plane.kubectl("create", "token", "medmo-operator", "-n", "medmo-system", "--duration=4h").stdout.strip()
    admin = yaml.safe_load(Path(control_plane.kubeconfig).read_text())
    cluster = admin["clusters"][0]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": "medmo-operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": cluster["name"], "user": "medmo-operator"}}],
        "current-context": "operator",
    }
    path.write_text(yaml.safe_dump(config))
    return path


class OperatorProcess:
    """`medmo operator` as a child process; stopped by pid."""

    def __init__(self, kubeconfig: Path, workdir: Path, reconcile_interval_s: float = 1.0):
        self.port = _free_port()
        self.reconcile_interval_s = reconcile_interval_s
        self.kubeconfig = kubeconfig
        self.workdir = workdir
        self.log = workdir / "operator.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "MEDMO_PROGRESS_BIND_HOST": "127.0.0.1",
            "MEDMO_PROGRESS_PORT": str(self.port),
            "MEDMO_PROGRESS_ADVERTISE_URL": f"http://127.0.0.1:{self.port}",
            "MEDMO_RECONCILE_INTERVAL": str(self.reconcile_interval_s),
            "MEDMO_OPERATOR_NAMESPACE": "medmo-system",
        }
        env.pop("MEDMO_TOKEN_KEY", None)
        with self.log.open("a") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')}\n")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "medmo_operator.cli", "operator"],
            env=env, stdout=self.log.open("a"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"operator exited: {self.log.read_text()[-3000:]}"
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.3)
        raise AssertionError(f"operator did not start: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: the operator gets no chance to tidy up, as when its node dies."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()


@pytest.fixture(scope="module")
def operator(control_plane, operator_ns, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("operator")
    process = OperatorProcess(_service_account_kubeconfig(control_plane, workdir / "kubeconfig"), workdir)
    process.start()
    yield process
    process.stop()
    refusals = RBAC_REFUSAL.findall(process.log.read_text())
    assert not refusals, f"the operator hit RBAC refusals (the ClusterRole is short): {sorted(set(refusals))}"


KUEUE_BUILD_SCRIPT = REPO / "tests" / "kueue" / "build.sh"
KUEUE_FLAVOR = "medmo-default"


@pytest.fixture(scope="module")
def kueue(control_plane, tmp_path_factory):
    # stdout is only the binary's path; the build's progress goes to stderr.
    binary = os.environ.get("MEDMO_KUEUE_BIN") or subprocess.run(
        [str(KUEUE_BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
    manager = Kueue(control_plane, tmp_path_factory.mktemp("kueue"), binary).start()
    objects = [{"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": KUEUE_FLAVOR}}]
    objects += [{"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "WorkloadPriorityClass", "metadata": {"name": name}, "value": value}
                for name, value in (("research-low", 100), ("research-high", 1000))]
    for obj in objects:
        control_plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(obj))
    yield manager
    manager.stop()
