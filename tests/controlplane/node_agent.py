"""The test kubelet: registers Nodes and runs the pods bound to them as confined local processes.

    agent = NodeAgent(kubeconfig, workdir, [NodeSpec(name="node-a", gpus=8)]).start()
    ...
    agent.add_node(NodeSpec(name="node-b", gpus=16))
    agent.stop()                          # kills every process it started

For people: ``python tests/controlplane/node_agent.py --kubeconfig K --node node-a:cpu=8,memory=32Gi,gpu=8``.
It is part of the test harness, not of the product: ``medmo run`` drives the same
:class:`~medmo_operator.local.runner.PodRunner` without it.

What it does, as a kubelet would: Node objects with capacity and allocatable cpu, memory, pods and
``nvidia.com/gpu``; their Leases in ``kube-node-lease`` and the Ready condition kept fresh; pods bound
to its nodes (``spec.nodeName``) run by :class:`PodRunner`, with their status (phase, conditions,
container states, pod IP) written back; deletion honoured gracefully, then the pod object removed;
each pod's hosts file kept in step with the pods and Services of the cluster; projected
ServiceAccount tokens requested from the TokenRequest API bound to the pod, and renewed once 80 % of
their lifetime has passed.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import re
import shlex
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from urllib.parse import urlparse

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines
from pydantic import BaseModel, Field, field_validator, model_validator

from medmo_operator.local import network
from medmo_operator.local.container import now
from medmo_operator.local.podspec import PodConfigError
from medmo_operator.local.runner import PodRunner, RunningPod

log = logging.getLogger(__name__)

LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION_S = 40
HEARTBEAT_S = 10.0
WATCH_TIMEOUT_S = 30
RETRY_S = 1.0
DEFAULT_GRACE_S = 30
GPU_RESOURCE = "nvidia.com/gpu"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class NodeSpec(BaseModel):
    """One Node the agent registers and serves."""

    name: str = Field(description="Node name (a DNS subdomain, e.g. gpu-node-0)")
    cpu: str = Field("8", description="cpu capacity and allocatable, a Kubernetes quantity")
    memory: str = Field("32Gi", description="memory capacity and allocatable, a Kubernetes quantity")
    gpus: int = Field(0, ge=0, description="nvidia.com/gpu capacity: what the scheduler may hand out")
    pods: int = Field(110, ge=1, description="the most pods the scheduler puts on the node")
    labels: dict[str, str] = Field(default_factory=dict, description="extra node labels")
    gpu_devices: list[str] = Field(default_factory=list, description=(
        "host GPU ids behind the node's nvidia.com/gpu, one per GPU; a pod sees only those it was "
        "given (CUDA_VISIBLE_DEVICES). Empty: the count only schedules, and pods see the host's GPUs"))

    @model_validator(mode="after")
    def _one_device_per_gpu(self) -> NodeSpec:
        if self.gpu_devices and len(self.gpu_devices) != self.gpus:
            raise ValueError(f"node {self.name}: gpu_devices lists {len(self.gpu_devices)} ids for gpus={self.gpus}")
        return self

    @field_validator("name")
    @classmethod
    def _dns_name(cls, name: str) -> str:
        if not _NAME.match(name) or len(name) > 253:
            raise ValueError(f"node name {name!r} must be lower-case letters, digits, '-' and '.'")
        return name

    @classmethod
    def parse(cls, text: str) -> NodeSpec:
        """``name:cpu=8,memory=32Gi,gpu=2,devices=0:1,pods=110,label.<key>=<value>`` (all but the name optional)."""
        name, _, rest = text.partition(":")
        fields: dict = {"name": name, "labels": {}}
        for item in filter(None, rest.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"node {name}: {item!r} is not key=value")
            if key.startswith("label."):
                fields["labels"][key[len("label."):]] = value
            elif key in ("cpu", "memory", "pods"):
                fields[key] = value
            elif key in ("gpu", "gpus"):
                fields["gpus"] = value
            elif key == "devices":
                fields["gpu_devices"] = value.split(":")
            else:
                raise ValueError(f"node {name}: unknown key {key!r} (cpu, memory, gpu, devices, pods, label.<key>)")
        return cls(**fields)

    def resources(self) -> dict[str, str]:
        return {"cpu": self.cpu, "memory": self.memory, "pods": str(self.pods), GPU_RESOURCE: str(self.gpus)}


class ApiObjects:
    """ConfigMaps, Secrets and service-account tokens read from the API server."""

    def __init__(self, core: client.CoreV1Api):
        self.core = core

    def _read(self, read: Callable, namespace: str, name: str):
        try:
            return read(name, namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise PodConfigError(f"reading {namespace}/{name}: {error.reason}") from error

    def config_map(self, namespace: str, name: str) -> dict[str, bytes] | None:
        cm = self._read(self.core.read_namespaced_config_map, namespace, name)
        if cm is None:
            return None
        data = {k: v.encode() for k, v in (cm.data or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (cm.binary_data or {}).items()})
        return data

    def secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        secret = self._read(self.core.read_namespaced_secret, namespace, name)
        return None if secret is None else {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}

    def service_account_token(self, namespace: str, service_account: str, audience: str | None,
                              expiration_seconds: int, pod: tuple[str, str] | None = None) -> str | None:
        # Bound to the pod, as a kubelet binds it: the token dies with the pod, and the API server
        # names the pod in the requests it authenticates (user.extra in the audit log).
        bound = None if pod is None else client.V1BoundObjectReference(
            api_version="v1", kind="Pod", name=pod[0], uid=pod[1])
        request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
            audiences=[audience] if audience else [], expiration_seconds=expiration_seconds,
            bound_object_ref=bound))
        try:
            return self.core.create_namespaced_service_account_token(service_account, namespace, request).status.token
        except ApiException as error:
            raise PodConfigError(f"token for service account {namespace}/{service_account}: {error.reason}") from error


class NodeAgent:
    """Registers ``nodes`` with the API server of ``kubeconfig`` and runs their pods under ``workdir``.

    ``entrypoints`` maps images to the command they run (images are not run here), for containers
    that give only ``args``; the back-off settings are those of container restarts.
    """

    def __init__(self, kubeconfig: Path | str, workdir: Path | str, nodes: Iterable[NodeSpec], *,
                 entrypoints: Mapping[str, list[str]] | None = None,
                 backoff_base_s: float = 1.0, backoff_max_s: float = 30.0):
        self.workdir = Path(workdir)
        self.nodes: dict[str, NodeSpec] = {}
        self._initial_nodes = list(nodes)
        self.api = config.new_client_from_config(config_file=str(kubeconfig))
        self.core = client.CoreV1Api(self.api)
        self.leases = client.CoordinationV1Api(self.api)
        server = urlparse(self.api.configuration.host)
        self.runner = PodRunner(
            self.workdir, ApiObjects(self.core), on_change=self._status_changed,
            cluster_records=self._cluster_records, entrypoints=entrypoints, backoff_base_s=backoff_base_s, backoff_max_s=backoff_max_s,
            # In-cluster clients find the API server here (there is no kubernetes Service ClusterIP to reach).
            extra_env={"KUBERNETES_SERVICE_HOST": server.hostname or network.HOST_ADDRESS,
                       "KUBERNETES_SERVICE_PORT": str(server.port or 443)})
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pods: dict[str, dict] = {}  # every pod of the cluster by uid: pod names resolve cluster-wide
        self._services: dict[str, dict] = {}
        self._terminating: set[str] = set()
        self._gpus_held: dict[str, tuple[str, list[str]]] = {}  # pod uid -> (node, device ids)
        self._dirty: set[str] = set()
        self._dirty_event = threading.Event()
        self._hosts_event = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watches: set = set()  # open watch responses, shut down by stop()
        self._node_started = now()

    # --- public API ----------------------------------------------------------------------------
    def start(self) -> NodeAgent:
        for spec in self._initial_nodes:
            self.add_node(spec)
        self._spawn(self._heartbeat_loop, "heartbeat")
        self._spawn(self._status_writer_loop, "status-writer")
        self._spawn(self._hosts_loop, "hosts")
        self._spawn(lambda: self._list_and_watch(self.core.list_service_for_all_namespaces, self._on_service), "services")
        self._spawn(lambda: self._list_and_watch(self.core.list_pod_for_all_namespaces, self._on_pod), "pods")
        return self

    def add_node(self, spec: NodeSpec) -> None:
        """Register (or refresh) a Node; pods the scheduler binds to it run from then on."""
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": spec.name, "labels": {"kubernetes.io/hostname": spec.name,
                                                           "kubernetes.io/os": "linux", **spec.labels}}}
        try:
            self.core.create_node(body)
        except ApiException as error:
            if error.status != 409:
                raise
            self.core.patch_node(spec.name, {"metadata": body["metadata"]})
        with self._lock:
            self.nodes[spec.name] = spec
        self._patch_node_status(spec)
        self._renew_lease(spec.name)

    def remove_node(self, name: str) -> None:
        """Take a Node away (as a scale-down would): its pods' processes are killed, the Node deleted."""
        with self._lock:
            self.nodes.pop(name, None)
        for running in self.runner.pods():
            if (running.pod.get("spec") or {}).get("nodeName") == name:
                self.runner.forget(running.uid)
        self._delete_node_objects(name)

    def _delete_node_objects(self, name: str) -> None:
        self._ignore_missing(lambda: self.core.delete_node(name))
        self._ignore_missing(lambda: self.leases.delete_namespaced_lease(name, LEASE_NAMESPACE))

    def stop(self, delete_nodes: bool = False) -> None:
        """Kill every process started for a pod, stop the loops; optionally remove the Nodes."""
        self._stop.set()
        self._dirty_event.set()
        self._hosts_event.set()
        with self._lock:
            watches = list(self._watches)
        for response in watches:
            response.shutdown()  # unblocks the watch threads' reads
        self.runner.stop()
        for thread in self._threads:
            thread.join(timeout=10)
        if delete_nodes:
            for name in list(self.nodes):
                self._delete_node_objects(name)
        self.api.close()

    def pod(self, namespace: str, name: str) -> RunningPod:
        """The running pod of that name (for its logs and pids); KeyError if this agent has none."""
        for running in self.runner.pods():
            if running.namespace == namespace and running.name == name:
                return running
        raise KeyError(f"no pod {namespace}/{name} on this agent's nodes")

    # --- nodes ---------------------------------------------------------------------------------
    def _node_status(self, spec: NodeSpec) -> dict:
        stamp = now()

        def condition(kind: str, status: str, reason: str, message: str) -> dict:
            return {"type": kind, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": stamp, "lastTransitionTime": self._node_started}

        return {
            "capacity": spec.resources(), "allocatable": spec.resources(),
            "conditions": [
                condition("Ready", "True", "KubeletReady", "medmo node agent is posting ready status"),
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "no memory pressure"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk pressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "no PID pressure"),
            ],
            "addresses": [{"type": "InternalIP", "address": self.runner.host_ip},
                          {"type": "Hostname", "address": spec.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "",
                         "osImage": "medmo local node", "containerRuntimeVersion": "local://processes",
                         "kubeletVersion": "medmo-node-agent", "kubeProxyVersion": "",
                         "operatingSystem": "linux", "architecture": "amd64"},
        }

    def _patch_node_status(self, spec: NodeSpec) -> None:
        self.core.patch_node_status(spec.name, {"status": self._node_status(spec)})

    def _renew_lease(self, name: str) -> None:
        body = {"metadata": {"name": name, "namespace": LEASE_NAMESPACE},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_DURATION_S,
                         "renewTime": _micro_time()}}
        try:
            self.leases.patch_namespaced_lease(name, LEASE_NAMESPACE, {"spec": body["spec"]})
        except ApiException as error:
            if error.status != 404:
                raise
            self.leases.create_namespaced_lease(LEASE_NAMESPACE, body)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock:
                specs = list(self.nodes.values())
            for spec in specs:
                try:
                    self._renew_lease(spec.name)
                    self._patch_node_status(spec)
                except Exception as error:  # the next beat retries; a missed one is harmless
                    log.warning("heartbeat of node %s: %s", spec.name, error)
            try:
                self.runner.refresh_tokens()
            except Exception as error:  # the API server unreachable: the next beat retries
                log.warning("renewing pods' tokens: %s", error)

    # --- watching ------------------------------------------------------------------------------
    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=f"node-agent-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _list_and_watch(self, list_call: Callable, handle: Callable[[str, dict], None]) -> None:
        """List, then watch from the list's resourceVersion; relist when the watch expires (410)."""
        while not self._stop.is_set():
            try:
                listing = json.loads(list_call(_preload_content=False).data)
                handle("SYNC", {"items": listing["items"]})
                version = listing["metadata"]["resourceVersion"]
                while not self._stop.is_set():
                    version = self._watch_once(list_call, handle, version)
                    if version is None:
                        break  # expired: relist
            except Exception as error:  # connection loss, API server restart: start over
                if not self._stop.is_set():
                    log.warning("watch %s: %s; relisting", getattr(list_call, "__name__", list_call), error)
                    self._stop.wait(RETRY_S)

    def _watch_once(self, list_call: Callable, handle: Callable[[str, dict], None], version: str) -> str | None:
        response = list_call(watch=True, resource_version=version, allow_watch_bookmarks=True,
                             timeout_seconds=WATCH_TIMEOUT_S, _preload_content=False,
                             _request_timeout=WATCH_TIMEOUT_S + 15)
        with self._lock:
            self._watches.add(response)
        try:
            for line in iter_resp_lines(response):
                if self._stop.is_set():
                    break
                event = json.loads(line)
                obj = event["object"]
                if event["type"] == "ERROR":
                    if obj.get("code") == 410:
                        return None
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                version = obj["metadata"]["resourceVersion"]
                if event["type"] != "BOOKMARK":
                    handle(event["type"], obj)
        finally:
            with self._lock:
                self._watches.discard(response)
            response.release_conn()
        return version

    def _on_service(self, kind: str, obj: dict) -> None:
        with self._lock:
            if kind == "SYNC":
                self._services = {s["metadata"]["uid"]: s for s in obj["items"]}
            elif kind == "DELETED":
                self._services.pop(obj["metadata"]["uid"], None)
            else:
                self._services[obj["metadata"]["uid"]] = obj
        self._hosts_event.set()

    def _on_pod(self, kind: str, obj: dict) -> None:
        pods = obj["items"] if kind == "SYNC" else [obj]
        with self._lock:
            if kind == "SYNC":
                self._pods = {}
            for pod in pods:
                if kind == "DELETED":
                    self._pods.pop(pod["metadata"]["uid"], None)
                else:
                    self._pods[pod["metadata"]["uid"]] = pod
            mine = [p for p in pods if (p.get("spec") or {}).get("nodeName") in self.nodes]
        if kind == "SYNC":
            # Pods deleted while the watch was down are missing from the new listing.
            listed = {p["metadata"]["uid"] for p in pods}
            for running in self.runner.pods():
                if running.uid not in listed:
                    self._reconcile("DELETED", running.pod)
        for pod in mine:
            self._reconcile(kind, pod)
        self._hosts_event.set()

    # --- pods ----------------------------------------------------------------------------------
    def _reconcile(self, kind: str, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        if kind == "DELETED":
            threading.Thread(target=self.runner.forget, args=(uid,), daemon=True).start()
            self._release_gpus(uid)
            return
        if pod["metadata"].get("deletionTimestamp"):
            with self._lock:
                if uid in self._terminating:
                    return
                self._terminating.add(uid)
            threading.Thread(target=self._terminate, args=(pod,), daemon=True).start()
            return
        if self.runner.get(uid) is None and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
            self.runner.start(pod, extra_env=self._assign_gpus(pod))

    def _assign_gpus(self, pod: dict) -> dict[str, str]:
        """Hand a pod the GPU ids it requested on a node with known devices, as a device plugin would."""
        node = self.nodes.get(pod["spec"]["nodeName"])
        if node is None or not node.gpu_devices:
            return {}
        wanted = sum(int(((c.get("resources") or {}).get("limits") or {}).get(GPU_RESOURCE, 0))
                     for c in pod["spec"].get("containers") or [])
        with self._lock:
            taken = {d for held_node, ids in self._gpus_held.values() if held_node == node.name for d in ids}
            devices = [d for d in node.gpu_devices if d not in taken][:wanted]
            self._gpus_held[pod["metadata"]["uid"]] = (node.name, devices)
        visible = ",".join(devices)
        return {"CUDA_VISIBLE_DEVICES": visible, "NVIDIA_VISIBLE_DEVICES": visible or "void"}

    def _release_gpus(self, uid: str) -> None:
        with self._lock:
            self._gpus_held.pop(uid, None)

    def _terminate(self, pod: dict) -> None:
        """Graceful deletion: stop the processes within the grace period, then remove the object."""
        meta = pod["metadata"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)
        self.runner.stop_pod(meta["uid"], float(grace))
        running = self.runner.get(meta["uid"])
        if running is not None:
            self._write_status(running)
        self._ignore_missing(lambda: self.core.delete_namespaced_pod(
            meta["name"], meta["namespace"], grace_period_seconds=0,
            body=client.V1DeleteOptions(grace_period_seconds=0, preconditions=client.V1Preconditions(uid=meta["uid"]))))

    def _status_changed(self, pod: RunningPod) -> None:
        if pod.finished.is_set():
            self._release_gpus(pod.uid)  # the scheduler counts a finished pod's GPUs as free
        with self._lock:
            self._dirty.add(pod.uid)
        self._dirty_event.set()

    def _status_writer_loop(self) -> None:
        """Write changed pod statuses, coalescing bursts; failed writes are retried."""
        while not self._stop.is_set():
            self._dirty_event.wait()
            self._dirty_event.clear()
            with self._lock:
                uids, self._dirty = self._dirty, set()
            for uid in uids:
                running = self.runner.get(uid)
                if running is None:
                    continue
                try:
                    self._write_status(running)
                except Exception as error:
                    log.warning("status of pod %s/%s: %s; retrying", running.namespace, running.name, error)
                    self._status_changed(running)
                    self._stop.wait(RETRY_S)

    def _write_status(self, running: RunningPod) -> None:
        self._ignore_missing(lambda: self.core.patch_namespaced_pod_status(
            running.name, running.namespace, {"status": running.status()}))

    # --- names ---------------------------------------------------------------------------------
    def _cluster_records(self, pod: RunningPod) -> list[tuple[str, list[str]]]:
        with self._lock:
            pods, services = list(self._pods.values()), list(self._services.values())
        return network.dns_records(pod.namespace, pods, services)

    def _hosts_loop(self) -> None:
        while not self._stop.is_set():
            self._hosts_event.wait()
            self._hosts_event.clear()
            try:
                self.runner.refresh_hosts()
            except OSError as error:  # a full disk, a removed workdir: retried on the next change
                log.warning("rewriting hosts files: %s", error)

    @staticmethod
    def _ignore_missing(call: Callable[[], object]) -> None:
        try:
            call()
        except ApiException as error:
            if error.status != 404:
                raise


def _micro_time() -> str:
    """Lease times are MicroTime: RFC 3339 with microseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() % 1 * 1e6):06d}Z"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python tests/controlplane/node_agent.py",
                                     description="Register Nodes and run their pods as local processes.")
    parser.add_argument("--kubeconfig", required=True, help="kubeconfig of the API server to join")
    parser.add_argument("--node", action="append", required=True, type=NodeSpec.parse,
                        help="name:cpu=8,memory=32Gi,gpu=8 (repeat for more nodes)")
    parser.add_argument("--entrypoint", action="append", default=[], metavar="IMAGE=COMMAND",
                        help="command an image runs when a container gives only args, e.g. "
                             "'trainer=python -m medmo_trainer.launch' (repeatable)")
    parser.add_argument("--workdir", help="where pod directories and logs go (default: a new temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="medmo-node-agent-"))
    entrypoints = {}
    for item in args.entrypoint:
        image, sep, command = item.partition("=")
        if not sep or not command.split():
            parser.error(f"--entrypoint {item!r}: expected IMAGE=COMMAND")
        entrypoints[image] = shlex.split(command)
    agent = NodeAgent(args.kubeconfig, workdir, args.node, entrypoints=entrypoints).start()
    print(f"nodes {', '.join(n.name for n in args.node)} ready; pod logs under {workdir}/pods", flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    agent.stop()


if __name__ == "__main__":
    main()
