"""A real single-machine Kubernetes control plane for tests: etcd, kube-apiserver,
kube-controller-manager and kube-scheduler on 127.0.0.1, with generated certificates.

    cp = ControlPlane(workdir, bin_dir).start()    # bin_dir: what tests/controlplane/build.sh prints
    cp.kubectl("get", "namespaces")                 # kubectl with the admin kubeconfig
    cp.kubeconfig                                   # for kopf / the kubernetes client / KUBECONFIG
    cp.stop()                                       # also runs at interpreter exit

There are no nodes: pods stay Pending until something registers Nodes and runs their pods
(medmo_operator.local's node agent).
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import yaml

from . import pki
from .processes import ManagedProcess, ServerStartError, free_ports, spawn, start_retrying_lost_ports, wait_until

BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
# Nothing connects to ClusterIPs here; the range only has to be valid.
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
FEATURE_GATES = "GenericWorkload=true,GangScheduling=true"
"""Kubernetes 1.36's alpha Workload API and kube-scheduler's gang scheduling of its PodGroups (the
operator's scheduling.gang), on every component: the API server serves scheduling.k8s.io/v1alpha2
(RUNTIME_CONFIG) and keeps pods' spec.schedulingGroup, the scheduler places a PodGroup's pods all or
none, the controller-manager runs the PodGroup protection controller. WorkloadWithJob (the Job
controller making a Workload for every Indexed Job) stays off: the operator makes its own."""
RUNTIME_CONFIG = "scheduling.k8s.io/v1alpha2=true"
AUDITED_USERS = ("system:serviceaccount:medmo-system:medmo-operator",)
"""Whose requests the API server's audit log records (at Metadata level: who, verb, resource, answer)."""
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [{"level": "Metadata", "users": list(AUDITED_USERS)}, {"level": "None"}],
}


class KubectlError(subprocess.CalledProcessError):
    """kubectl exited non-zero; the message includes its stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr: {self.stderr.strip()}"


def _kubeconfig(server: str, user: str, client: pki.KeyPair, ca_cert: Path) -> dict:
    """A kubeconfig with the certificates inlined, so it works from any directory and for every client."""
    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "medmo-test", "cluster": {"server": server, "certificate-authority-data": b64(ca_cert)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(client.cert),
                                          "client-key-data": b64(client.key)}}],
        "contexts": [{"name": "medmo-test", "context": {"cluster": "medmo-test", "user": user, "namespace": "default"}}],
        "current-context": "medmo-test",
        "preferences": {},
    }


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler, started from ``bin_dir``.

    All state (certificates, etcd data, logs under ``logs/``, kubeconfigs) lives in ``workdir``.
    After :meth:`start`, ``server`` is the API server URL and ``kubeconfig`` the admin
    (system:masters) kubeconfig.
    """

    def __init__(self, workdir: Path | str, bin_dir: Path | str, startup_timeout_s: float = 180.0,
                 extra_apiserver_args: Sequence[str] = ()):
        self.workdir = Path(workdir)
        self.extra_apiserver_args = list(extra_apiserver_args)
        """Appended to kube-apiserver's flags, e.g. an audit policy and log for a benchmark."""
        self.bin_dir = Path(bin_dir)
        self.startup_timeout_s = startup_timeout_s
        self.kubeconfig = self.workdir / "kubeconfig"
        self.audit_log = self.workdir / "logs" / "audit.log"
        """JSON lines, one per request of AUDITED_USERS (a watch's also when its response starts)."""
        self.server = ""
        self.processes: list[ManagedProcess] = []
        missing = [b for b in BINARIES if not os.access(self.bin_dir / b, os.X_OK)]
        if missing:
            raise FileNotFoundError(f"{', '.join(missing)} not found in {self.bin_dir}; "
                                    "build them with tests/controlplane/build.sh (it prints the bin dir)")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> ControlPlane:
        """Start all components and return once the API server is ready and controllers run."""
        if self.processes:
            raise RuntimeError("this ControlPlane is already started")
        atexit.register(self.stop)
        start_retrying_lost_ports(self._start, self._clean_up_failed_start)
        return self

    def _clean_up_failed_start(self) -> None:
        self._stop_processes()
        self.processes = []
        shutil.rmtree(self.workdir / "etcd", ignore_errors=True)  # its member records the old peer port

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        certs = pki.generate(self.workdir / "pki")
        etcd_port, etcd_peer_port, api_port, kcm_port, sched_port = free_ports(5)
        self.server = f"https://127.0.0.1:{api_port}"
        self._write_kubeconfig(self.kubeconfig, "medmo-admin", certs.admin, certs)
        kcm_kubeconfig = self.workdir / "controller-manager.kubeconfig"
        self._write_kubeconfig(kcm_kubeconfig, "system:kube-controller-manager", certs.controller_manager, certs)
        sched_kubeconfig = self.workdir / "scheduler.kubeconfig"
        self._write_kubeconfig(sched_kubeconfig, "system:kube-scheduler", certs.scheduler, certs)

        etcd = self._spawn("etcd", self._etcd_args(etcd_port, etcd_peer_port))
        wait_until(lambda: self._etcd_healthy(etcd_port), self.startup_timeout_s, "etcd to be healthy", [etcd])

        audit_policy = self.workdir / "audit-policy.yaml"
        audit_policy.write_text(yaml.safe_dump(AUDIT_POLICY))
        apiserver = self._spawn("kube-apiserver", self._apiserver_args(api_port, etcd_port, certs, audit_policy))
        wait_until(lambda: self._get_ok(self.server + "/readyz", certs, client=certs.admin),
                   self.startup_timeout_s, "kube-apiserver /readyz", [etcd, apiserver])

        self._spawn("kube-controller-manager", self._controller_manager_args(kcm_port, kcm_kubeconfig, certs))
        self._spawn("kube-scheduler", [
            *self._common_component_args(sched_port, sched_kubeconfig, certs), "--leader-elect=false",
            f"--feature-gates={FEATURE_GATES}"])
        wait_until(lambda: self._get_ok(f"https://127.0.0.1:{kcm_port}/healthz", certs)
                   and self._get_ok(f"https://127.0.0.1:{sched_port}/healthz", certs),
                   self.startup_timeout_s, "controller-manager and scheduler /healthz", self.processes)
        # Controllers are really working once the service-account controller has acted.
        wait_until(lambda: self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0,
                   self.startup_timeout_s, "the default ServiceAccount (controllers running)", self.processes)

    def _spawn(self, name: str, args: list[str]) -> ManagedProcess:
        proc = spawn(name, [str(self.bin_dir / name), *args], self.workdir / "logs" / f"{name}.log")
        self.processes.append(proc)
        return proc

    def _write_kubeconfig(self, path: Path, user: str, client: pki.KeyPair, certs: pki.ControlPlanePKI) -> None:
        path.write_text(yaml.safe_dump(_kubeconfig(self.server, user, client, certs.ca.cert)))
        path.chmod(0o600)

    def _etcd_args(self, port: int, peer_port: int) -> list[str]:
        client_url, peer_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer_port}"
        return [
            "--name=medmo-test",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client_url}", f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=medmo-test={peer_url}",
            "--log-level=warn",
            # Test data is thrown away with the workdir: durability is not worth the fsyncs.
            "--unsafe-no-fsync",
        ]

    def _apiserver_args(self, port: int, etcd_port: int, certs: pki.ControlPlanePKI, audit_policy: Path) -> list[str]:
        return [
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={port}",
            f"--tls-cert-file={certs.serving.cert}", f"--tls-private-key-file={certs.serving.key}",
            f"--client-ca-file={certs.ca.cert}",
            f"--service-account-key-file={certs.service_account_pub}",
            f"--service-account-signing-key-file={certs.service_account_key}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--authorization-mode=Node,RBAC",
            # The default reconciler would publish 127.0.0.1 as the `kubernetes` Service's endpoint,
            # which Endpoints validation refuses (loopback), logging an error every 10 s.
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true",
            "--profiling=false",
            f"--feature-gates={FEATURE_GATES}", f"--runtime-config={RUNTIME_CONFIG}",
            f"--audit-policy-file={audit_policy}", f"--audit-log-path={self.audit_log}", "--audit-log-maxsize=0",
            *self.extra_apiserver_args,
        ]

    def _common_component_args(self, port: int, kubeconfig: Path, certs: pki.ControlPlanePKI) -> list[str]:
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
            f"--client-ca-file={certs.ca.cert}",
            "--bind-address=127.0.0.1", f"--secure-port={port}",
            f"--tls-cert-file={certs.serving.cert}", f"--tls-private-key-file={certs.serving.key}",
            "--profiling=false",
        ]

    def _controller_manager_args(self, port: int, kubeconfig: Path, certs: pki.ControlPlanePKI) -> list[str]:
        return [
            *self._common_component_args(port, kubeconfig, certs),
            "--leader-elect=false",
            # Every controller runs under its own service account, with its own RBAC, as on a real cluster.
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={certs.service_account_key}",
            f"--root-ca-file={certs.ca.cert}",  # published in each namespace as kube-root-ca.crt
            f"--cluster-signing-cert-file={certs.ca.cert}", f"--cluster-signing-key-file={certs.ca.key}",
            "--controllers=*",
            f"--feature-gates={FEATURE_GATES}",
            "--kube-api-qps=100", "--kube-api-burst=200",
        ]

    @staticmethod
    def _etcd_healthy(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                return json.load(response).get("health") == "true"
        except (OSError, ValueError):
            return False

    @staticmethod
    def _get_ok(url: str, certs: pki.ControlPlanePKI, client: pki.KeyPair | None = None) -> bool:
        context = ssl.create_default_context(cafile=str(certs.ca.cert))
        if client is not None:
            context.load_cert_chain(str(client.cert), str(client.key))
        try:
            with urllib.request.urlopen(url, timeout=5, context=context) as response:
                return response.status == 200
        except OSError:  # refused, TLS not ready, or an HTTP error status
            return False

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout_s: float = 120.0) -> subprocess.CompletedProcess:
        """Run kubectl against this control plane; text output captured.

        With ``check``, a non-zero exit raises :class:`KubectlError`, whose message has kubectl's stderr.
        """
        result = subprocess.run(
            # A cache of its own: kubectl keys its discovery cache by host:port, and ports recur
            # across control planes with different CRDs.
            [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}",
             f"--cache-dir={self.workdir / 'kubectl-cache'}", *args],
            input=input, capture_output=True, text=True, timeout=timeout_s,
        )
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, result.args, result.stdout, result.stderr)
        return result

    def wait_established(self, crd: str, timeout_s: float = 60.0) -> None:
        """Wait until the API server serves the CRD named ``crd`` (e.g. ``medmotrainings.medmo.io``).

        Polls the condition itself: ``kubectl wait --for=condition=Established`` issued right after
        an apply can fail at once with ".status.conditions accessor error" while the new CRD has no
        status yet.
        """
        deadline = time.monotonic() + timeout_s
        query = '{.status.conditions[?(@.type=="Established")].status}'
        while True:
            result = self.kubectl("get", f"crd/{crd}", "-o", f"jsonpath={query}", check=False)
            if result.returncode == 0 and result.stdout.strip() == "True":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {crd} not Established after {timeout_s}s: {result.stdout}{result.stderr}")
            time.sleep(0.2)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop every component by pid (SIGTERM, then SIGKILL after ``grace_s``), in reverse start order."""
        self._stop_processes(grace_s)
        atexit.unregister(self.stop)

    def _stop_processes(self, grace_s: float = 10.0) -> None:
        for proc in reversed(self.processes):
            proc.stop(signal.SIGTERM, grace_s)


__all__ = ["ControlPlane", "KubectlError", "ServerStartError"]
