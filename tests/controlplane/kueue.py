"""Kueue on a test control plane: its manager as a local process, with its CRDs and webhooks.

    kueue = Kueue(control_plane, workdir, binary).start()   # binary: what tests/kueue/build.sh prints
    ...                                                      # ResourceFlavors, ClusterQueues, LocalQueues
    kueue.stop()                                             # also removes its webhook configurations

The manager runs as the cluster admin (its kubeconfig is the control plane's), serves its webhooks on
127.0.0.1 with the control plane's serving certificate (issued for 127.0.0.1 by the control plane's
CA), and the API server reaches them by URL. Integrations: batch/job, pod and deployment, the last
two for the namespaces outside kube-system and kueue-system, as Kueue's own manifests install them.
Its webhooks refuse (failurePolicy Fail) while it is down, so :meth:`stop` deletes them first: the
rest of the session's tests create Jobs and Pods without Kueue.
"""

from __future__ import annotations

import base64
import json
import shutil
import urllib.request
from pathlib import Path

import yaml

from .harness import ControlPlane
from .processes import ManagedProcess, free_ports, spawn, start_retrying_lost_ports, wait_until

NAMESPACE = "kueue-system"
WEBHOOK_CONFIGURATIONS = ("kueue-mutating-webhook-configuration", "kueue-validating-webhook-configuration")
"""As Kueue's manifests name them, prefixed with kueue- (as its kustomization does)."""
INTEGRATIONS = ("batch/job", "pod", "deployment")
METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")
MANAGED_LABEL = "kueue.x-k8s.io/managed"
"""Kueue's label on the pods it manages, and the name of the finalizer it puts on them."""
_OUTSIDE_SYSTEM_NAMESPACES = {"matchExpressions": [
    {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", NAMESPACE]}]}
_INTEGRATION_RESOURCES = {("batch", "jobs"), ("", "pods"), ("apps", "deployments")}
"""What the started integrations' webhooks cover; those of other integrations are left out (nothing
would answer them), Kueue's own kinds are kept."""
_EVERY_POD_OR_DEPLOYMENT = {("", "pods"), ("apps", "deployments")}
"""Webhooks that see every Pod or Deployment: kept out of the system namespaces, as Kueue's
kustomization does."""


def webhook_configurations(manifests: Path, base_url: str, ca_bundle: str) -> list[dict]:
    """Kueue's MutatingWebhookConfiguration and ValidatingWebhookConfiguration (its released
    manifests, config/components/webhook/manifests.yaml), reaching the manager by URL instead of
    through a Service, limited to Kueue's own kinds and the started integrations."""
    configurations = []
    for configuration in yaml.safe_load_all(manifests.read_text()):
        webhooks = []
        for hook in configuration["webhooks"]:
            resources = {(group, resource) for rule in hook["rules"] for group in rule["apiGroups"] for resource in rule["resources"]}
            if not all(group == "kueue.x-k8s.io" or (group, r.split("/")[0]) in _INTEGRATION_RESOURCES for group, r in resources):
                continue
            hook["clientConfig"] = {"url": base_url + hook["clientConfig"]["service"]["path"], "caBundle": ca_bundle}
            if resources & _EVERY_POD_OR_DEPLOYMENT:
                hook["namespaceSelector"] = _OUTSIDE_SYSTEM_NAMESPACES
            webhooks.append(hook)
        configuration["metadata"] = {"name": f"kueue-{configuration['metadata']['name']}"}
        configuration["webhooks"] = webhooks
        configurations.append(configuration)
    return configurations


class Kueue:
    """Kueue's manager (``binary``), its CRDs and webhook manifests (in ``<binary>/../../crds`` and
    ``webhooks.yaml`` beside it, where build.sh puts them), on ``control_plane``. Logs:
    ``<workdir>/kueue.log``."""

    def __init__(self, control_plane: ControlPlane, workdir: Path | str, binary: Path | str, startup_timeout_s: float = 120.0):
        self.control_plane = control_plane
        self.workdir = Path(workdir)
        self.binary = Path(binary)
        self.crds = self.binary.parent.parent / "crds"
        self.webhook_manifests = self.binary.parent.parent / "webhooks.yaml"
        self.startup_timeout_s = startup_timeout_s
        self.process: ManagedProcess | None = None
        self.log = self.workdir / "kueue.log"

    def start(self) -> Kueue:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cp = self.control_plane
        cp.kubectl("apply", "--server-side", "-f", str(self.crds))
        for crd in sorted(self.crds.glob("*.yaml")):
            cp.wait_established(yaml.safe_load(crd.read_text())["metadata"]["name"])
        cp.kubectl("create", "namespace", NAMESPACE, check=False)
        start_retrying_lost_ports(self._start, self.stop)
        return self

    def _start(self) -> None:
        cp = self.control_plane
        pki = cp.workdir / "pki"
        certs = self.workdir / "certs"
        certs.mkdir(exist_ok=True)
        # The control plane's serving certificate is for 127.0.0.1, signed by the CA the API server trusts.
        shutil.copyfile(pki / "serving.crt", certs / "tls.crt")
        shutil.copyfile(pki / "serving.key", certs / "tls.key")
        webhook_port, health_port, visibility_port = free_ports(3)
        config = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": NAMESPACE,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
            "metrics": {"bindAddress": "0"},
            "webhook": {"port": webhook_port, "host": "127.0.0.1", "certDir": str(certs)},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "clientConnection": {"qps": 100, "burst": 200},
            "integrations": {"frameworks": list(INTEGRATIONS)},
        }
        config_path = self.workdir / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        # Without internal cert management Kueue's manager reads a metrics certificate from the
        # fixed path /etc/kueue/metrics/certs (even with metrics off): it gets one there in a mount
        # namespace of its own, over an overlay of /etc, so nothing outside the workdir changes.
        etc = self.workdir / "etc-overlay"
        for layer in ("upper", "work"):
            (etc / layer).mkdir(parents=True, exist_ok=True)
        in_own_etc = (f"mount -t overlay overlay -o lowerdir=/etc,upperdir={etc / 'upper'},workdir={etc / 'work'} /etc"
                      f" && mkdir -p {METRICS_CERT_DIR.parent} && ln -sfn {certs} {METRICS_CERT_DIR} && exec \"$@\"")
        self.process = spawn("kueue", [
            "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", in_own_etc, "sh",
            str(self.binary), f"--config={config_path}", f"--kubeconfig={cp.kubeconfig}",
            # Pending-workload positions come from its visibility API, an aggregated API server the
            # test API server is not set up to front; it is not started.
            "--feature-gates=VisibilityOnDemand=false", f"--visibility-server-port={visibility_port}",
        ], self.log)
        wait_until(lambda: _get_ok(f"http://127.0.0.1:{health_port}/readyz"), self.startup_timeout_s,
                   "Kueue's /readyz", [self.process])
        ca_bundle = _b64(pki / "ca.crt")
        for configuration in webhook_configurations(self.webhook_manifests, f"https://127.0.0.1:{webhook_port}", ca_bundle):
            cp.kubectl("apply", "-f", "-", input=json.dumps(configuration))
        # The webhooks answer once a ResourceFlavor passes through them (a server-side dry run).
        probe = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "webhook-probe"}}
        wait_until(lambda: cp.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(probe), check=False).returncode == 0,
                   self.startup_timeout_s, "Kueue's webhooks to answer", [self.process])

    def stop(self) -> None:
        """Removes the webhook configurations (nothing would answer them), stops the manager by pid,
        and lets go of the pods it still held (its finalizer on pods it admitted would otherwise keep
        them, and their namespaces, terminating for the rest of the session)."""
        cp = self.control_plane
        for kind, name in zip(("mutatingwebhookconfiguration", "validatingwebhookconfiguration"), WEBHOOK_CONFIGURATIONS):
            cp.kubectl("delete", kind, name, "--ignore-not-found", check=False)
        if self.process is not None:
            self.process.stop(grace_s=10)
        held = cp.kubectl("get", "pods", "-A", "-l", f"{MANAGED_LABEL}=true", "-o", "json", check=False)
        for pod in json.loads(held.stdout or '{"items": []}')["items"] if held.returncode == 0 else []:
            meta = pod["metadata"]
            finalizers = [f for f in meta.get("finalizers", []) if f != MANAGED_LABEL]
            cp.kubectl("patch", "pod", meta["name"], "-n", meta["namespace"], "--type=merge",
                       "-p", json.dumps({"metadata": {"finalizers": finalizers or None}}), check=False)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


__all__ = ["Kueue", "webhook_configurations"]
