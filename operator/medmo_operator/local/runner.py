"""Runs pods as local processes, without an API server: the part of a kubelet this project needs.

    runner = PodRunner(workdir, objects=StaticObjects())
    pod = runner.start(pod_dict)          # or a kubernetes.client.V1Pod
    pod.wait_finished(timeout_s=60)       # "Succeeded" / "Failed"
    pod.status()                          # the pod's status as the API would hold it
    pod.log_path("main")                  # the container's stdout and stderr
    runner.stop()                         # every process it started is killed

Containers are confined as a kubelet and a container runtime confine them (see :mod:`sandbox`):
each runs ``command`` (or the image's entrypoint given to the runner) + ``args`` in its own mount
and PID namespaces, on an overlay of the host's ``/`` (the "image": this Python environment first
on PATH), as its securityContext's user, with only the environment its spec gives plus what a
runtime sets, and with the pod's volumes mounted at their mount paths. A container's processes
never outlive the runner. Confinement needs root: the runner refuses to start without it.

The pieces: :mod:`volumes` (a pod's volumes), :mod:`container` (one container's process and
state), :mod:`podstatus` (phase, conditions, restart policy), :mod:`probes` (readiness),
:mod:`network` (addresses and names); :class:`RunningPod` ties them into a pod's lifecycle.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import network
from .container import ContainerRun
from .image import image_env, python_paths
from .podspec import (Identity, ObjectSource, PodConfigError, container_command, container_identity,
                      expand_references, home_of, resolve_env, unsupported_features)
from .podstatus import RESTART_RESET_AFTER_S, PodConditions, RestartPolicy
from .probes import ReadinessProber
from .sandbox import Mount
from .volumes import PodVolumes, safe_name

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 30.0
CONFIG_RETRY_S = 1.0


class ConfinementError(RuntimeError):
    """Pods cannot be confined on this machine (the runner is not root)."""


def as_pod_dict(pod: Any) -> dict:
    """An object as the API's camelCase dict, from a dict or a ``kubernetes.client`` model (V1Pod...)."""
    if isinstance(pod, Mapping):
        return dict(pod)
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(pod)


class RunningPod:
    """A pod the runner has taken on: its address, directories, containers and lifecycle thread."""

    def __init__(self, runner: PodRunner, pod: dict, ip: str, extra_env: Mapping[str, str] | None = None):
        meta = pod["metadata"]
        self.runner = runner
        self.pod = pod
        self.extra_env = dict(extra_env or {})  # what the node adds for this pod (its GPUs)
        self.uid: str = meta.get("uid") or f"local-{meta['name']}"
        self.namespace: str = meta.get("namespace", "default")
        self.name: str = meta["name"]
        self.ip = ip
        self.directory = runner.workdir / "pods" / safe_name(f"{self.namespace}_{self.name}_{self.uid}")
        self.network_dir = self.directory / "network"
        spec = pod.get("spec") or {}
        self.volumes = PodVolumes(pod, self.directory / "volumes", runner.objects, ip)
        self.restart_policy = RestartPolicy(spec.get("restartPolicy", "Always"), runner.backoff_base_s, runner.backoff_max_s)
        self.init_containers = [ContainerRun.of(c, self.directory, init=True) for c in spec.get("initContainers") or []]
        self.containers = [ContainerRun.of(c, self.directory, init=False) for c in spec.get("containers") or []]
        self.state = PodConditions()
        self.hosts_text = ""  # what the pod's hosts file holds
        self.stopping = threading.Event()
        self.finished = threading.Event()
        self._lock = threading.RLock()
        self._thread = threading.Thread(target=self._run, name=f"pod-{self.namespace}/{self.name}", daemon=True)

    # --- what callers read -------------------------------------------------------------------
    def log_path(self, container: str) -> Path:
        return next(c.log_path for c in self.init_containers + self.containers if c.name == container)

    def pids(self) -> dict[str, int]:
        """Current process id (the container's launcher, on the host) of each container started."""
        with self._lock:
            return {c.name: c.process.pid for c in self.init_containers + self.containers if c.process}

    def command_pids(self) -> dict[str, int]:
        """Host pid of each running container's command (inside its PID namespace, it is PID 2)."""
        with self._lock:
            runs = [c for c in self.init_containers + self.containers if c.running]
        return {c.name: pid for c in runs if (pid := c.command_pid()) is not None}

    @property
    def phase(self) -> str:
        with self._lock:
            return self._phase()

    def wait_finished(self, timeout_s: float | None = None) -> str:
        """Block until every container has ended for good; returns the final phase."""
        if not self.finished.wait(timeout_s):
            raise TimeoutError(f"pod {self.namespace}/{self.name} still {self.phase} after {timeout_s}s")
        return self.phase

    def status(self) -> dict:
        """The pod's status in the API's form (phase, conditions, IPs, container statuses)."""
        with self._lock:
            phase = self._phase()
            status = {
                "phase": phase,
                "hostIP": self.runner.host_ip, "hostIPs": [{"ip": self.runner.host_ip}],
                "podIP": self.ip, "podIPs": [{"ip": self.ip}],
                "startTime": self.state.started_at,
                "conditions": self.state.conditions(phase, self.containers),
                "initContainerStatuses": [c.status() for c in self.init_containers],
                "containerStatuses": [c.status() for c in self.containers],
            }
            if self.state.failure:
                status["reason"], status["message"] = self.state.failure
            return status

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, grace_s: float) -> None:
        """Graceful stop: SIGTERM to every container, then SIGKILL after ``grace_s``."""
        self.stopping.set()
        with self._lock:
            runs = [c for c in self.init_containers + self.containers if c.process and c.process.poll() is None]
        for run in runs:
            run.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for run in runs:
            try:
                run.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for run in runs:
            run.kill()
        self._thread.join(timeout=10)

    def _changed(self) -> None:
        self.runner.notify(self)

    def _run(self) -> None:
        try:
            self._run_pod()
        except Exception as error:  # a bug here must still end the pod visibly, not hang it
            log.exception("pod %s/%s", self.namespace, self.name)
            self._fail("RunnerError", f"the local pod runner failed: {error}")
        finally:
            with self._lock:
                self.finished.set()
            self._changed()

    def _run_pod(self) -> None:
        unsupported = unsupported_features(self.pod, self.runner.entrypoints)
        if unsupported:
            self._fail("UnsupportedPodSpec", "the local node runs pods as confined processes and cannot honour: "
                       + ", ".join(unsupported))
            return
        if not self._retry_config(self.volumes.prepare, "ContainerCreating"):
            return
        self._set_condition("PodReadyToStartContainers", True)
        for run in self.init_containers:
            if not self._run_to_success(run):
                return
        self._set_condition("Initialized", True)
        threads = [threading.Thread(target=self._run_container, args=(run,), daemon=True,
                                    name=f"container-{self.name}/{run.name}") for run in self.containers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _retry_config(self, attempt: Callable[[], Any], reason: str, only: ContainerRun | None = None) -> Any:
        """``attempt()``'s result (True for None), retried while config is missing as the kubelet does;
        None once the pod is stopping."""
        while not self.stopping.is_set():
            try:
                return attempt() or True
            except PodConfigError as error:
                self._set_waiting(reason, str(error), only=only)
                self.stopping.wait(CONFIG_RETRY_S)
        return None

    def _container_env(self, run: ContainerRun, identity: Identity) -> dict[str, str]:
        """The container's whole environment: the image's, the node's, the pod spec's, then the network's."""
        env = image_env() | {"HOME": home_of(identity.uid)} | self.extra_env
        env.update(resolve_env(self.pod, run.spec, self.runner.objects, self.ip))
        net = self.runner.network_env(self)
        if env.get("LD_PRELOAD"):
            net["LD_PRELOAD"] = f"{net['LD_PRELOAD']} {env['LD_PRELOAD']}"
        return env | net

    def _launch_config(self, run: ContainerRun) -> tuple[list[str], dict[str, str], Identity, list[Mount]]:
        """What ``run.launch`` takes; raises :class:`PodConfigError` (CreateContainerConfigError) if it cannot be made."""
        identity = container_identity(self.pod, run.spec)
        env = self._container_env(run, identity)
        command = [expand_references(a, env) for a in container_command(run.spec, self.runner.entrypoints)]
        mounts = self.volumes.mounts(run.spec)
        mounts.append(Mount(str(self.network_dir), network.POD_NETWORK_MOUNT))
        return command, env, identity, mounts

    def _execute(self, run: ContainerRun) -> dict | None:
        """Run the container once to its end; None when the pod is stopping before it starts."""
        config = self._retry_config(lambda: self._launch_config(run), "CreateContainerConfigError", only=run)
        if config is None:
            return None
        with self._lock:
            if self.stopping.is_set():
                return None
            run.directory.mkdir(parents=True, exist_ok=True)
            run.launch(*config, open_up=python_paths(), hostname=network.pod_hostname(self.pod))
        self._changed()
        if "readinessProbe" in run.spec and not run.init:
            ReadinessProber(run, self.ip, self.stopping, lambda passed: self._set_ready(run, passed)).start(
                f"probe-{self.name}/{run.name}")
        returncode = run.process.wait()
        with self._lock:
            terminated = run.finish(returncode)
        self._changed()
        return terminated

    def _set_ready(self, run: ContainerRun, passed: bool) -> None:
        with self._lock:
            run.probe_passed = passed
        self._changed()

    def _back_off(self, run: ContainerRun, attempt: int) -> bool:
        """Wait before restarting ``run``; False when the pod is stopped meanwhile."""
        delay = self.restart_policy.delay_s(attempt)
        with self._lock:
            run.last_state = run.state
            run.restart_count += 1
            run.state = {"waiting": {"reason": "CrashLoopBackOff",
                                     "message": f"back-off {delay:g}s restarting failed container {run.name}"}}
        self._changed()
        return not self.stopping.wait(delay)

    def _run_to_success(self, run: ContainerRun) -> bool:
        """Run an init container until it succeeds (or, under restartPolicy Never, fails the pod)."""
        attempt = 0
        while True:
            terminated = self._execute(run)
            if terminated is None:
                return False
            if terminated["exitCode"] == 0:
                return True
            if not self.restart_policy.retries_init() or self.stopping.is_set():
                self._fail("InitContainerFailed", f"init container {run.name} exited with {terminated['exitCode']}")
                return False
            if not self._back_off(run, attempt):
                return False
            attempt += 1

    def _run_container(self, run: ContainerRun) -> None:
        attempt = 0
        while True:
            started = time.monotonic()
            terminated = self._execute(run)
            if terminated is None or not self._restart_wanted(terminated["exitCode"]):
                return
            # A container that ran a while before failing starts its back-off afresh.
            attempt = 0 if time.monotonic() - started > RESTART_RESET_AFTER_S else attempt
            if not self._back_off(run, attempt):
                return
            attempt += 1

    def _restart_wanted(self, exit_code: int) -> bool:
        return not self.stopping.is_set() and self.restart_policy.restarts(exit_code)

    # --- status pieces -------------------------------------------------------------------------
    def _fail(self, reason: str, message: str) -> None:
        with self._lock:
            self.state.failure = (reason, message)
        self._changed()

    def _set_waiting(self, reason: str, message: str, only: ContainerRun | None = None) -> None:
        with self._lock:
            for run in [only] if only else self.init_containers + self.containers:
                if not run.terminated and not run.running:
                    run.state = {"waiting": {"reason": reason, "message": message}}
        self._changed()

    def _set_condition(self, kind: str, value: bool) -> None:
        with self._lock:
            self.state.mark(kind, value)
        self._changed()

    def _phase(self) -> str:
        pending = any(self._restart_wanted(c.terminated["exitCode"]) for c in self.containers if c.terminated)
        return self.state.phase(self.containers, pending)


class PodRunner:
    """Runs pods as confined processes on loopback addresses; usable with or without an API server.

    ``objects`` supplies ConfigMaps, Secrets and tokens; ``on_change(pod)`` is called (from runner
    threads) whenever a pod's status may have changed; ``cluster_records(pod)`` gives the cluster
    names a pod's hosts file holds beyond its own (default: this runner's pods and the Services
    given to :meth:`add_service`); ``entrypoints`` maps images to the command they would run, for
    containers that set only ``args``; ``extra_env`` is what the node adds to every container (as a
    kubelet adds KUBERNETES_SERVICE_HOST), before the pod's own variables.
    """

    def __init__(self, workdir: Path | str, objects: ObjectSource, *,
                 on_change: Callable[[RunningPod], None] | None = None,
                 cluster_records: Callable[[RunningPod], list[tuple[str, list[str]]]] | None = None,
                 extra_env: Mapping[str, str] | None = None, host_ip: str = network.HOST_ADDRESS,
                 entrypoints: Mapping[str, list[str]] | None = None,
                 backoff_base_s: float = 1.0, backoff_max_s: float = 30.0):
        # Every path handed to a pod is absolute: its processes run in their own working directory.
        self.workdir = Path(workdir).resolve()
        self.objects = objects
        self.on_change = on_change
        self.cluster_records = cluster_records or self._own_records
        self._services: dict[tuple[str, str], dict] = {}
        self.host_ip = host_ip
        self.entrypoints = dict(entrypoints or {})
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        if os.geteuid() != 0:
            raise ConfinementError(
                "the local pod runner confines pods as a kubelet does (mount and PID namespaces, an overlay "
                "root, the pod's runAsUser), which needs root: run it as root (e.g. with sudo, or in a "
                "container started with --privileged)")
        self._shim = network.build_shim()
        self._nss_wrapper = network.find_nss_wrapper()
        self._addresses = network.AddressPool()
        self._pods: dict[str, RunningPod] = {}
        self._lock = threading.Lock()
        self._hosts_lock = threading.Lock()  # one writer of hosts files at a time
        self.extra_env = dict(extra_env or {})

    def start(self, pod: Any, extra_env: Mapping[str, str] | None = None) -> RunningPod:
        """Start running ``pod`` (a dict in the API's form or a V1Pod); returns at once.

        ``extra_env`` is added to every container's environment (after the runner's, before the pod's).
        """
        pod = as_pod_dict(pod)
        uid = pod["metadata"].get("uid") or f"local-{pod['metadata']['name']}"
        with self._lock:
            if uid in self._pods:
                return self._pods[uid]
            running = RunningPod(self, pod, self._addresses.acquire(), self.extra_env | dict(extra_env or {}))
            for sub in ("logs", "containers", "volumes"):
                (running.directory / sub).mkdir(parents=True, exist_ok=True)
            network.prepare_pod_network(running.network_dir, self._shim, self._nss_wrapper)
            self._pods[uid] = running
        self.refresh_hosts()  # the new pod's hosts file, and its names in the others'
        running.start()
        return running

    def get(self, uid: str) -> RunningPod | None:
        with self._lock:
            return self._pods.get(uid)

    def pods(self) -> list[RunningPod]:
        with self._lock:
            return list(self._pods.values())

    def stop_pod(self, uid: str, grace_s: float = DEFAULT_GRACE_S) -> None:
        """Stop a pod's processes gracefully (blocks up to ``grace_s`` and a little more)."""
        pod = self.get(uid)
        if pod is not None:
            pod.stop(grace_s)

    def forget(self, uid: str) -> None:
        """Stop a pod at once and give its address back (its files stay for inspection)."""
        with self._lock:
            pod = self._pods.pop(uid, None)
        if pod is not None:
            pod.stop(0)
            self._addresses.release(pod.ip)

    def stop(self, grace_s: float = 2.0) -> None:
        """Stop every pod (SIGTERM, then SIGKILL after ``grace_s``), all at once."""
        threads = [threading.Thread(target=p.stop, args=(grace_s,)) for p in self.pods()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self._addresses.close()

    def refresh_tokens(self) -> None:
        """Renews the pods' projected service-account tokens that are due, as the kubelet does
        (call it every few seconds); a token that cannot be had now is retried on the next call."""
        for pod in self.pods():
            try:
                pod.volumes.refresh_tokens()
            except PodConfigError as error:
                log.warning("renewing the tokens of pod %s/%s: %s", pod.namespace, pod.name, error)

    def notify(self, pod: RunningPod) -> None:
        """A pod's status changed: tell ``on_change``, and republish names (readiness gates them)."""
        if self.on_change is not None:
            self.on_change(pod)
        self.refresh_hosts()

    def add_service(self, service: Mapping) -> None:
        """Publish a Service's name for the pods it selects (when the runner keeps names itself)."""
        service = as_pod_dict(service)
        meta = service["metadata"]
        with self._lock:
            self._services[(meta.get("namespace", "default"), meta["name"])] = service
        self.refresh_hosts()

    def _own_records(self, pod: RunningPod) -> list[tuple[str, list[str]]]:
        with self._lock:
            pods, services = list(self._pods.values()), list(self._services.values())
        views = [p.pod | {"status": p.status()} for p in pods]
        return network.dns_records(pod.namespace, views, services)

    def hosts_file(self, pod: RunningPod) -> Path:
        return pod.network_dir / network.HOSTS

    def refresh_hosts(self) -> None:
        """Rewrite the hosts files whose names changed (after pods, readiness or Services changed)."""
        pods = self.pods()  # the runner lock is never held while waiting for the hosts lock
        with self._hosts_lock:
            for pod in pods:
                text = network.render_hosts(pod.pod, pod.ip, self.cluster_records(pod))
                if pod.hosts_text != text:
                    network.write_atomically(self.hosts_file(pod), text)
                    pod.hosts_text = text

    def network_env(self, pod: RunningPod) -> dict[str, str]:
        return network.pod_network_env(pod.ip, network.pod_hostname(pod.pod), self._shim, self._nss_wrapper)
