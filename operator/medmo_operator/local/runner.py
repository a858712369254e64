"""Runs pods as local processes, without an API server: the part of a kubelet this project needs.

    runner = PodRunner(workdir, objects=StaticObjects())
    pod = runner.start(pod_dict)          # or a kubernetes.client.V1Pod
    pod.wait_finished(timeout_s=60)       # "Succeeded" / "Failed"
    pod.status()                          # the pod's status as the API would hold it
    pod.log_path("main")                  # the container's stdout and stderr
    runner.stop()                         # every process it started is killed, by process group

Images are not run: containers run ``command`` (or the image's entrypoint given to the runner) + ``args`` in this Python environment (its ``bin``
first on PATH). Each container is the leader of its own process group, which is signalled as a
whole, as a container runtime kills a container's cgroup. Volumes are directories under the pod's
directory; the container paths they are mounted at are rewritten in command, args, env and
workingDir (see :class:`PathMap`) rather than mounted, so nothing needs root and no empty mount
points are left on the host.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import network, probes
from .podspec import (DEFAULT_TERMINATION_MESSAGE_PATH, ObjectSource, PathMap, PodConfigError, container_command,
                      expand_references, resolve_env, unsupported_features, volume_files)

log = logging.getLogger(__name__)

TERMINATION_MESSAGE_LIMIT = 4096
FALLBACK_LOG_LINES = 80
DEFAULT_GRACE_S = 30.0
# Variables passed through from the runner's environment (a container image would set its own).
PASSED_THROUGH_ENV = ("HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "MEDMO_CACHE")
CONFIG_RETRY_S = 1.0


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def as_pod_dict(pod: Any) -> dict:
    """An object as the API's camelCase dict, from a dict or a ``kubernetes.client`` model (V1Pod...)."""
    if isinstance(pod, Mapping):
        return dict(pod)
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(pod)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


class ContainerRun:
    """One container of a pod: its process, its state as the API shows it, and its restarts."""

    def __init__(self, spec: dict, pod: RunningPod, init: bool):
        self.spec = spec
        self.name: str = spec["name"]
        self.init = init
        self.pod = pod
        self.state: dict = {"waiting": {"reason": "PodInitializing" if not init else "ContainerCreating"}}
        self.last_state: dict = {}
        self.restart_count = 0
        self.process: subprocess.Popen | None = None
        self.env: dict[str, str] = {}
        self.probe_passed = False  # the readiness probe's verdict on the current process
        self.directory = pod.directory / "containers" / _safe_name(self.name)
        self.log_path = pod.directory / "logs" / f"{_safe_name(self.name)}.log"
        self.termination_log = self.directory / "termination-log"

    @property
    def running(self) -> bool:
        return "running" in self.state

    @property
    def ready(self) -> bool:
        """Running, and passing its readiness probe if it has one."""
        return self.running and (self.probe_passed or "readinessProbe" not in self.spec)

    @property
    def terminated(self) -> dict | None:
        return self.state.get("terminated")

    def status(self) -> dict:
        status = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": self.ready,
            "started": self.running,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.process is not None:
            # The pid, so a test (or a person) can find and signal the container's process.
            status["containerID"] = f"local://{self.process.pid}"
        return status

    def paths(self) -> PathMap:
        mounts = {m["mountPath"]: str(self.pod.volume_dir(m["name"]) / m.get("subPath", ""))
                  for m in self.spec.get("volumeMounts") or []}
        mounts[self.spec.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH] = str(self.termination_log)
        return PathMap.of(mounts)

    def launch(self, env: dict[str, str]) -> None:
        """Start the process (the leader of a new process group) with output to the log file."""
        paths = self.paths()
        command = [paths.rewrite(expand_references(a, env))
                   for a in container_command(self.spec, self.pod.runner.entrypoints)]
        workdir = Path(paths.rewrite(self.spec["workingDir"])) if self.spec.get("workingDir") else self.directory
        self.directory.mkdir(parents=True, exist_ok=True)
        workdir.mkdir(parents=True, exist_ok=True)
        self.termination_log.write_bytes(b"")
        self.env = env
        self.probe_passed = False
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(command, env=env, cwd=workdir, stdin=subprocess.DEVNULL,
                                            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        self.state = {"running": {"startedAt": now()}}

    def finish(self, returncode: int) -> dict:
        """Record the exit as a terminated state; kill what the process left in its group."""
        self.kill_group(signal.SIGKILL)
        exit_code = returncode if returncode >= 0 else 128 - returncode
        terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                      "startedAt": self.state.get("running", {}).get("startedAt", now()), "finishedAt": now(),
                      "containerID": f"local://{self.process.pid}"}
        if returncode < 0:
            terminated["signal"] = -returncode
        message = self._termination_message(exit_code)
        if message:
            terminated["message"] = message
        self.state = {"terminated": terminated}
        return terminated

    def _termination_message(self, exit_code: int) -> str:
        try:
            message = self.termination_log.read_bytes()[:TERMINATION_MESSAGE_LIMIT]
        except FileNotFoundError:
            message = b""
        if not message.strip() and exit_code != 0 and self.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            lines = self.log_path.read_bytes().splitlines()[-FALLBACK_LOG_LINES:]
            message = b"\n".join(lines)[-TERMINATION_MESSAGE_LIMIT // 2:]
        return message.decode(errors="replace")

    def kill_group(self, sig: int) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


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
        self.directory = runner.workdir / "pods" / _safe_name(f"{self.namespace}_{self.name}_{self.uid}")
        spec = pod.get("spec") or {}
        self.restart_policy: str = spec.get("restartPolicy", "Always")
        self.init_containers = [ContainerRun(c, self, init=True) for c in spec.get("initContainers") or []]
        self.containers = [ContainerRun(c, self, init=False) for c in spec.get("containers") or []]
        self.started_at = now()
        self.conditions: dict[str, dict] = {}
        self._ready_conditions: dict[str, dict] = {}  # ContainersReady/Ready as last reported
        self.failure: tuple[str, str] | None = None  # (reason, message) that ends the pod as Failed
        self.hosts_text = ""  # what the pod's hosts file holds
        self.stopping = threading.Event()
        self.finished = threading.Event()
        self._lock = threading.RLock()
        self._thread = threading.Thread(target=self._run, name=f"pod-{self.namespace}/{self.name}", daemon=True)

    # --- what callers read -------------------------------------------------------------------
    def log_path(self, container: str) -> Path:
        return next(c.log_path for c in self.init_containers + self.containers if c.name == container)

    def pids(self) -> dict[str, int]:
        """Current process id of each container that has been started."""
        with self._lock:
            return {c.name: c.process.pid for c in self.init_containers + self.containers if c.process}

    def volume_dir(self, volume: str) -> Path:
        return self.directory / "volumes" / _safe_name(volume)

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
                "startTime": self.started_at,
                "conditions": self._conditions(phase),
                "initContainerStatuses": [c.status() for c in self.init_containers],
                "containerStatuses": [c.status() for c in self.containers],
            }
            if self.failure:
                status["reason"], status["message"] = self.failure
            return status

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, grace_s: float) -> None:
        """Graceful stop: SIGTERM to every container's process group, SIGKILL after ``grace_s``."""
        self.stopping.set()
        with self._lock:
            runs = [c for c in self.init_containers + self.containers if c.process and c.process.poll() is None]
        for run in runs:
            run.kill_group(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for run in runs:
            try:
                run.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for run in runs:
            run.kill_group(signal.SIGKILL)
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
            self._fail("UnsupportedPodSpec", "the local node runs pods as processes and cannot honour: "
                       + ", ".join(unsupported))
            return
        if not self._prepare_volumes():
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

    def _prepare_volumes(self) -> bool:
        """Write each volume's files; retry while a ConfigMap or Secret is missing, as the kubelet does."""
        while not self.stopping.is_set():
            try:
                for volume in (self.pod.get("spec") or {}).get("volumes") or []:
                    files = volume_files(self.pod, volume, self.runner.objects, self.ip)
                    self._write_volume(self.volume_dir(volume["name"]), files)
                return True
            except PodConfigError as error:
                self._set_waiting("ContainerCreating", str(error))
                self.stopping.wait(CONFIG_RETRY_S)
        return False

    @staticmethod
    def _write_volume(directory: Path, files: Mapping[str, bytes]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for relative, content in files.items():
            path = directory / relative
            if not path.resolve().is_relative_to(directory.resolve()):
                raise PodConfigError(f"volume item path {relative!r} leaves the volume")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)

    def _container_env(self, run: ContainerRun) -> dict[str, str] | None:
        """The full environment of a container, or None (after reporting why) while config is missing."""
        while not self.stopping.is_set():
            try:
                pod_env = resolve_env(self.pod, run.spec, self.runner.objects, self.ip)
                break
            except PodConfigError as error:
                self._set_waiting("CreateContainerConfigError", str(error), only=run)
                self.stopping.wait(CONFIG_RETRY_S)
        else:
            return None
        paths = run.paths()
        env = dict(self.runner.base_env) | self.extra_env
        env.update({k: paths.rewrite(v) for k, v in pod_env.items()})
        net = self.runner.network_env(self)
        if env.get("LD_PRELOAD"):
            net["LD_PRELOAD"] = f"{net['LD_PRELOAD']} {env['LD_PRELOAD']}"
        env.update(net)
        return env

    def _execute(self, run: ContainerRun) -> dict | None:
        """Run the container once to its end; None when the pod is stopping before it starts."""
        env = self._container_env(run)
        if env is None:
            return None
        with self._lock:
            if self.stopping.is_set():
                return None
            try:
                run.launch(env)
            except OSError as error:
                run.state = {"terminated": {"exitCode": 128, "reason": "StartError", "message": str(error),
                                            "startedAt": now(), "finishedAt": now()}}
                terminated = run.state["terminated"]
            else:
                terminated = None
        self._changed()
        if terminated is None:
            if "readinessProbe" in run.spec and not run.init:
                threading.Thread(target=self._probe_readiness, args=(run, run.process), daemon=True,
                                 name=f"probe-{self.name}/{run.name}").start()
            returncode = run.process.wait()
            with self._lock:
                terminated = run.finish(returncode)
            self._changed()
        return terminated

    def _probe_readiness(self, run: ContainerRun, process: subprocess.Popen) -> None:
        """Probe ``process`` until it ends; its readiness flips after the probe's thresholds."""
        probe = run.spec["readinessProbe"]
        period = float(probe.get("periodSeconds", 10))
        needed = {True: int(probe.get("successThreshold", 1)), False: int(probe.get("failureThreshold", 3))}
        command = [run.paths().rewrite(a) for a in (probe.get("exec") or {}).get("command") or []]
        streak, last = 0, None
        if self.stopping.wait(float(probe.get("initialDelaySeconds", 0))):
            return
        while process.poll() is None and not self.stopping.is_set():
            passed = probes.check(probe, self.ip, run.spec, command, run.env)
            streak = streak + 1 if passed == last else 1
            last = passed
            if streak >= needed[passed] and run.probe_passed != passed and run.process is process:
                with self._lock:
                    run.probe_passed = passed
                self._changed()
            self.stopping.wait(period)

    def _restart_wanted(self, exit_code: int) -> bool:
        if self.stopping.is_set():
            return False
        return self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and exit_code != 0)

    def _back_off(self, run: ContainerRun, attempt: int) -> bool:
        """Wait before restarting ``run``; False when the pod is stopped meanwhile."""
        delay = min(self.runner.backoff_base_s * 2 ** attempt, self.runner.backoff_max_s)
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
            # Init containers are retried under both Always and OnFailure.
            if self.restart_policy == "Never" or self.stopping.is_set():
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
            attempt = 0 if time.monotonic() - started > 60 else attempt
            if not self._back_off(run, attempt):
                return
            attempt += 1

    # --- status pieces -------------------------------------------------------------------------
    def _fail(self, reason: str, message: str) -> None:
        with self._lock:
            self.failure = (reason, message)
        self._changed()

    def _set_waiting(self, reason: str, message: str, only: ContainerRun | None = None) -> None:
        with self._lock:
            for run in [only] if only else self.init_containers + self.containers:
                if not run.terminated and not run.running:
                    run.state = {"waiting": {"reason": reason, "message": message}}
        self._changed()

    def _set_condition(self, kind: str, value: bool) -> None:
        with self._lock:
            self.conditions[kind] = {"type": kind, "status": str(value), "lastTransitionTime": now()}
        self._changed()

    def _conditions(self, phase: str) -> list[dict]:
        ready = phase == "Running" and all(c.ready for c in self.containers)
        conditions = dict(self.conditions)
        for kind in ("ContainersReady", "Ready"):
            previous = self._ready_conditions.get(kind)
            if previous is None or previous["status"] != str(ready):
                previous = {"type": kind, "status": str(ready), "lastTransitionTime": now()}
            self._ready_conditions[kind] = previous
            conditions[kind] = previous
        conditions.setdefault("Initialized", {"type": "Initialized", "status": "False", "lastTransitionTime": self.started_at})
        conditions["PodScheduled"] = {"type": "PodScheduled", "status": "True", "lastTransitionTime": self.started_at}
        return list(conditions.values())

    def _phase(self) -> str:
        if self.failure:
            return "Failed"
        if "Initialized" not in self.conditions:
            return "Pending"
        states = [c.state for c in self.containers]
        if any("running" in s for s in states):
            return "Running"
        if all("terminated" in s for s in states) and not self._any_restart_pending():
            return "Succeeded" if all(s["terminated"]["exitCode"] == 0 for s in states) else "Failed"
        return "Running" if any(c.restart_count or c.terminated for c in self.containers) else "Pending"

    def _any_restart_pending(self) -> bool:
        return any(self._restart_wanted(c.terminated["exitCode"]) for c in self.containers if c.terminated)


class PodRunner:
    """Runs pods as process groups on loopback addresses; usable with or without an API server.

    ``objects`` supplies ConfigMaps, Secrets and tokens; ``on_change(pod)`` is called (from runner
    threads) whenever a pod's status may have changed; ``cluster_records(pod)`` gives the cluster
    names a pod's hosts file holds beyond its own (default: this runner's pods and the Services
    given to :meth:`add_service`); ``entrypoints`` maps images to the command they would run, for
    containers that set only ``args``.
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
        self._shim = network.build_shim()
        self._nss_wrapper = network.find_nss_wrapper()
        self._addresses = network.AddressPool()
        self._pods: dict[str, RunningPod] = {}
        self._lock = threading.Lock()
        self._hosts_lock = threading.Lock()  # one writer of hosts files at a time
        bin_dir = Path(sys.executable).parent
        self.base_env = {k: os.environ[k] for k in PASSED_THROUGH_ENV if k in os.environ}
        self.base_env["PATH"] = f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        if sys.prefix != sys.base_prefix:
            self.base_env["VIRTUAL_ENV"] = sys.prefix
        self.base_env.update(extra_env or {})

    def start(self, pod: Any, extra_env: Mapping[str, str] | None = None) -> RunningPod:
        """Start running ``pod`` (a dict in the API's form or a V1Pod); returns at once.

        ``extra_env`` is added to every container's environment before the pod's own variables.
        """
        pod = as_pod_dict(pod)
        uid = pod["metadata"].get("uid") or f"local-{pod['metadata']['name']}"
        with self._lock:
            if uid in self._pods:
                return self._pods[uid]
            running = RunningPod(self, pod, self._addresses.acquire(), extra_env)
            for sub in ("logs", "containers", "volumes", "ports"):
                (running.directory / sub).mkdir(parents=True, exist_ok=True)
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
        return pod.directory / "hosts"

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
        return network.pod_network_env(pod.ip, network.pod_hostname(pod.pod), self.hosts_file(pod),
                                       pod.directory / "ports", self._shim, self._nss_wrapper)
