"""Operator latency and load: N single-stage runs applied at once, against the same pods' Jobs applied
directly, with the operator's API requests, CPU time and memory.

    $VENV/bin/python tests/benchmarks/bench_operator.py [--runs 20] [--repeats 5] [--reconcile-interval 5] [--hold 5]

Starts a control plane of its own (kube-apiserver writing an audit log of the operator's requests
and of every run's and Job's creation), the node agent with 4 nodes (cpu 64, 200 pods each) and, for each N:

1. baseline, no operator running: what the operator would create for N runs
   (`medmo_operator.render`, without owner references: token Secret, stage ConfigMap, headless
   Service and Indexed Job per run) applied by one `kubectl apply`, all inside the timed window,
   as the operator creates them inside its own; latency = apply to pod Running;
2. operator: a fresh `medmo operator` process as its ServiceAccount (manifests/base RBAC), then N
   MedMOTrainings applied by one `kubectl apply`; latency = apply to the run's learner pod Running.
   The operator's API requests are counted from the audit log (distinct requests received in the
   window, watches included), its CPU time from /proc/<pid>/stat; it stays up for --hold seconds
   with every pod Running (steady-state requests per second), then every trainer is told to finish
   (a file the stand-ins look for at each step): the time from a trainer's exit to its Job seen
   Complete is the control plane's part, from Job Complete to the run seen Succeeded the operator's
   ("time to notice a finished Job"). Then the runs are deleted, their children garbage-collected,
   and the process stopped; its peak RSS is its VmHWM then.

kubectl applies a list one object after another, so apply->Running includes the wait for kubectl to
reach an object; created->Running starts at that object's creation (from the audit log), and
"run->Job created" is the operator's own part: from a run's creation to its Job's.

Every pod runs the stand-in trainer (tests/integration/operator/standin_trainer.py), which keeps
stepping (and reporting progress) until deleted. "Running" is the first watch event in which the
pod's status.phase is Running, as the node agent reports it once the process has started.

For each N the baseline and the operator run interleaved through the benchmark harness (baseline,
operator, baseline, ...; `--repeats`), each in a fresh namespace, the operator a fresh process each
time; the table gives medians and min-max of each repeat's p50 and p95.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))  # tests/ holds the shared test modules

import yaml  # noqa: E402
from controlplane.harness import ControlPlane  # noqa: E402
from integration.operator.conftest import ENTRYPOINTS, OperatorProcess, _service_account_kubeconfig  # noqa: E402
from kubernetes import client, config, watch  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402
from medmo_cases import REPO, STANDIN_IMAGE  # noqa: E402

import harness  # noqa: E402
from medmo_operator import api, crd, render  # noqa: E402
from controlplane.node_agent import NodeAgent, NodeSpec  # noqa: E402

OPERATOR_USER = "system:serviceaccount:medmo-system:medmo-operator"
NODES = [NodeSpec(name=f"bench-node-{i}", cpu="64", memory="256Gi", pods=200) for i in range(4)]
RUNNING_TIMEOUT_S = 300.0
CLEANUP_TIMEOUT_S = 240.0
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    # One event per request (at ResponseComplete; a watch's at ResponseStarted too, deduplicated by auditID).
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "Metadata", "users": [OPERATOR_USER]},
        # When each run and Job was created, whoever created it: kubectl applies a list one by one.
        {"level": "Metadata", "verbs": ["create"],
         "resources": [{"group": api.GROUP, "resources": [api.PLURAL]}, {"group": "batch", "resources": ["jobs"]}]},
        {"level": "None"},
    ],
}


# -- what is applied ----------------------------------------------------------------------------


def training(name: str, storage: Path, step_seconds: float) -> dict:
    """One single-stage run of the stand-in trainer with tiny requests that steps until deleted, or until
    told to finish (SIGUSR1: it ends its stage and says in its termination message when it exited)."""
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name},
        "spec": {
            "image": STANDIN_IMAGE,
            "model": {"base": "preset:tiny-qwen3-vl"},
            "storage": {"uri": f"file://{storage / name}"},
            "nodePool": {"gpusPerNode": 0, "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}}},
            "stages": [{
                "name": "train",
                "type": "sft",
                "nodes": 1,
                "datasets": [{"name": "d", "uri": f"standin://x?stepSeconds={step_seconds}"}],
                "hyperparameters": {"maxSteps": 1_000_000},
                "strategy": {"name": "ddp"},
                "checkpoint": {"everySteps": 1000},
            }],
        },
    }


def baseline_children(obj: dict, namespace: str) -> list[dict]:
    """What the operator would create for ``obj``, with no owner: the same pod, applied directly."""
    spec = api.parse_training(obj).spec
    run = render.RunRef(name=obj["metadata"]["name"], namespace=namespace, uid="00000000-0000-0000-0000-000000000000")
    # Nothing listens there: the stand-in's progress reports fail fast and it carries on.
    endpoints = render.OperatorEndpoints(progress_url="http://127.0.0.1:9", token_key=b"baseline")
    children = render.build_stage_children(run, spec, spec.stages[0], 0, endpoints)
    for child in children:
        child["metadata"].pop("ownerReferences", None)
    return children


def learner_job(obj: dict, namespace: str) -> str:
    """The name of the run's first learner Job."""
    spec = api.parse_training(obj).spec
    run = render.RunRef(name=obj["metadata"]["name"], namespace=namespace, uid="")
    return render.learner_job_name(run, spec.stages[0], 0)


def kubectl_apply(cp: ControlPlane, namespace: str, items: list[dict]) -> float:
    """One `kubectl apply` of all items; returns the (wall-clock) time it was started."""
    started = time.time()
    cp.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
               timeout_s=RUNNING_TIMEOUT_S)
    return started


# -- observing ----------------------------------------------------------------------------------


class RunningTimes:
    """When each run's learner pod in ``namespace`` was first seen Running (wall-clock seconds).

    A pod watch restarted every few seconds (a restart without resourceVersion begins with the
    current state, so nothing is missed), so the thread notices ``stop()`` promptly.
    """

    def __init__(self, core: client.CoreV1Api, namespace: str):
        self.core = core
        self.namespace = namespace
        self.first_running: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"watch-{namespace}", daemon=True)

    def __enter__(self) -> RunningTimes:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _loop(self) -> None:
        selector = f"{render.LABEL_ROLE}=learner"
        while not self._stop.is_set():
            try:
                for event in watch.Watch().stream(self.core.list_namespaced_pod, self.namespace,
                                                  label_selector=selector, timeout_seconds=3):
                    pod = event["object"]
                    run = pod.metadata.labels[render.LABEL_RUN]
                    if pod.status.phase == "Running" and run not in self.first_running:
                        self.first_running[run] = time.time()
                    if self._stop.is_set():
                        break
            except (ApiException, OSError) as error:  # a broken stream: start another
                print(f"  (pod watch restarted: {error})", flush=True)
                self._stop.wait(0.2)

    def wait_all(self, runs: int, timeout_s: float) -> float | None:
        """When the last of ``runs`` pods was seen Running; None if not all were in time."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(self.first_running) >= runs:
                return max(self.first_running.values())
            time.sleep(0.1)
        return None


class FinishTimes:
    """When each run's learner Job was first seen Complete and when the run was first seen Succeeded
    (two watches, restarted every few seconds as RunningTimes' is)."""

    def __init__(self, api_client, namespace: str):
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.namespace = namespace
        self.job_complete: dict[str, float] = {}
        self.run_succeeded: dict[str, float] = {}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(watch_jobs,), daemon=True)
                         for watch_jobs in (True, False)]

    def __enter__(self) -> FinishTimes:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)

    def _loop(self, watch_jobs: bool) -> None:
        while not self._stop.is_set():
            try:
                if watch_jobs:
                    stream = watch.Watch().stream(self.batch.list_namespaced_job, self.namespace,
                                                  label_selector=f"{render.LABEL_ROLE}=learner", timeout_seconds=3)
                else:
                    stream = watch.Watch().stream(self.custom.list_namespaced_custom_object, api.GROUP, api.VERSION,
                                                  self.namespace, api.PLURAL, timeout_seconds=3)
                for event in stream:
                    obj, now = event["object"], time.time()
                    if watch_jobs:
                        complete = any(c.type == "Complete" and c.status == "True" for c in obj.status.conditions or [])
                        if complete:
                            self.job_complete.setdefault(obj.metadata.labels[render.LABEL_RUN], now)
                    elif (obj.get("status") or {}).get("phase") == "Succeeded":
                        self.run_succeeded.setdefault(obj["metadata"]["name"], now)
                    if self._stop.is_set():
                        break
            except (ApiException, OSError) as error:
                print(f"  (finish watch restarted: {error})", flush=True)
                self._stop.wait(0.2)

    def wait_all(self, runs: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(self.run_succeeded) >= runs:
                return True
            time.sleep(0.2)
        return False


def tell_trainers_to_finish() -> None:
    """SIGUSR1 to every stand-in trainer process below this one (only one batch's pods run at a time)."""
    for pid in harness.descendants(os.getpid()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if len(argv) > 1 and argv[1].endswith(b"standin_trainer.py"):  # python itself, not a wrapper
                os.kill(pid, signal.SIGUSR1)
        except OSError:
            pass  # it ended meanwhile


_EXITED_AT = re.compile(r"exited at ([0-9.]+)")


def trainer_exit_times(core: client.CoreV1Api, namespace: str) -> dict[str, float]:
    """When each run's trainer exited, from its learner pod's termination message."""
    exited = {}
    for pod in core.list_namespaced_pod(namespace, label_selector=f"{render.LABEL_ROLE}=learner").items:
        for status in pod.status.container_statuses or []:
            terminated = status.state.terminated if status.state else None
            match = _EXITED_AT.search(terminated.message or "") if terminated else None
            if match:
                exited[pod.metadata.labels[render.LABEL_RUN]] = float(match.group(1))
    return exited


def audit_events(log: Path):
    """(time received, event) of each complete line of the audit log."""
    with log.open() as lines:
        for line in lines:
            if not line.endswith("\n"):
                return  # the event being written now
            event = json.loads(line)
            yield datetime.fromisoformat(event["requestReceivedTimestamp"]).timestamp(), event


def audited_requests(log: Path, since: float, until: float) -> Counter:
    """The operator's API requests received between two wall-clock times, by "verb resource"."""
    seen: dict[str, str] = {}
    for received, event in audit_events(log):
        if since <= received < until and event["user"]["username"] == OPERATOR_USER:
            ref = event.get("objectRef") or {}
            resource = ref.get("resource", event.get("requestURI", "?"))
            if ref.get("subresource"):
                resource += "/" + ref["subresource"]
            seen[event["auditID"]] = f"{event['verb']} {resource}"
    return Counter(seen.values())


def audited_creations(log: Path, resource: str, namespace: str) -> dict[str, float]:
    """When each object of ``resource`` in ``namespace`` was created (the successful create's receipt)."""
    created = {}
    for received, event in audit_events(log):
        ref = event.get("objectRef") or {}
        if (event["verb"] == "create" and ref.get("resource") == resource and ref.get("namespace") == namespace
                and (event.get("responseStatus") or {}).get("code") == 201):
            created[ref["name"]] = received
    return created


@dataclass
class ProcessSample:
    """CPU seconds and memory of a process, from /proc (psutil is not a dependency)."""

    cpu_s: float
    rss_mib: float
    peak_rss_mib: float

    @classmethod
    def of(cls, pid: int) -> ProcessSample:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        ticks = os.sysconf("SC_CLK_TCK")
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        kib = lambda key: int(status[key].split()[0])  # noqa: E731
        return cls(cpu_s=(int(fields[11]) + int(fields[12])) / ticks,  # utime + stime
                   rss_mib=kib("VmRSS") / 1024, peak_rss_mib=kib("VmHWM") / 1024)


# -- one measurement ----------------------------------------------------------------------------


@dataclass
class Batch:
    """One measurement of N runs: wall-clock times by run name, and the operator's figures."""

    runs: int
    applied: float
    running: dict[str, float]
    created: dict[str, float]
    """When the object kubectl applied was created: the run (operator) or its Job (baseline)."""
    job_created: dict[str, float]
    apply_s: float
    cleanup_s: float = 0.0
    requests_to_running: Counter = field(default_factory=Counter)
    requests_in_cleanup: Counter = field(default_factory=Counter)
    requests_per_s_steady: float = 0.0
    cpu_s_to_running: float = 0.0
    idle_rss_mib: float = 0.0
    peak_rss_mib: float = 0.0
    exited: dict[str, float] = field(default_factory=dict)
    """When each run's trainer exited once told to finish (operator side)."""
    job_complete: dict[str, float] = field(default_factory=dict)
    run_succeeded: dict[str, float] = field(default_factory=dict)

    def apply_to_running(self) -> list[float]:
        return sorted(t - self.applied for t in self.running.values())

    def created_to_running(self) -> list[float]:
        return sorted(t - self.created[run] for run, t in self.running.items() if run in self.created)

    def created_to_job(self) -> list[float]:
        return sorted(t - self.created[run] for run, t in self.job_created.items() if run in self.created)

    def exit_to_job_complete(self) -> list[float]:
        """The control plane's part of a finish: trainer exited -> Job seen Complete."""
        return sorted(t - self.exited[run] for run, t in self.job_complete.items() if run in self.exited)

    def job_complete_to_succeeded(self) -> list[float]:
        """The operator's part: Job seen Complete -> run seen Succeeded."""
        return sorted(t - self.job_complete[run] for run, t in self.run_succeeded.items() if run in self.job_complete)


class Bench:
    def __init__(self, workdir: Path, reconcile_interval_s: float, hold_s: float, step_seconds: float):
        self.workdir = workdir
        self.reconcile_interval_s = reconcile_interval_s
        self.hold_s = hold_s
        self.step_seconds = step_seconds
        self.audit_log = workdir / "audit.log"
        self.cp: ControlPlane | None = None
        self.agent: NodeAgent | None = None
        self.operator: OperatorProcess | None = None
        self.api_client = None

    def start(self, bin_dir: Path) -> None:
        policy = self.workdir / "audit-policy.yaml"
        policy.write_text(yaml.safe_dump(AUDIT_POLICY))
        self.cp = ControlPlane(self.workdir / "controlplane", bin_dir, extra_apiserver_args=[
            f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}", "--audit-log-maxsize=0"]).start()
        self.api_client = config.new_client_from_config(config_file=str(self.cp.kubeconfig))
        self.core = client.CoreV1Api(self.api_client)
        self.cp.kubectl("apply", "-f", str(crd.CRD_PATH))
        self.cp.wait_established("medmotrainings.medmo.io")
        for manifest in ("namespace.yaml", "rbac.yaml"):
            self.cp.kubectl("apply", "-f", str(REPO / "manifests" / "base" / manifest))
        self.agent = NodeAgent(self.cp.kubeconfig, self.workdir / "node-agent", NODES, entrypoints=ENTRYPOINTS).start()

    def stop(self) -> None:
        if self.operator is not None:
            self.operator.stop()
        if self.agent is not None:
            self.agent.stop()
        if self.api_client is not None:
            self.api_client.close()
        if self.cp is not None:
            self.cp.stop()

    def _namespace(self, name: str) -> str:
        self.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        deadline = time.monotonic() + 60
        while True:  # pods are refused until the namespace's default ServiceAccount exists
            try:
                self.core.read_namespaced_service_account("default", name)
                return name
            except ApiException as error:
                if error.status != 404 or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _clean_up(self, namespace: str, kind: str) -> float:
        """Delete the runs (or Jobs), wait until their pods are gone, then remove the namespace."""
        started = time.monotonic()
        self.cp.kubectl("delete", kind, "--all", "-n", namespace, "--wait=false")
        deadline = started + CLEANUP_TIMEOUT_S
        while self.core.list_namespaced_pod(namespace).items:
            if time.monotonic() > deadline:
                raise TimeoutError(f"pods of {namespace} still there {CLEANUP_TIMEOUT_S:.0f} s after deleting its {kind}")
            time.sleep(0.5)
        seconds = time.monotonic() - started
        self.core.delete_namespace(namespace)
        while any(ns.metadata.name == namespace for ns in self.core.list_namespace().items):
            if time.monotonic() > deadline:
                raise TimeoutError(f"namespace {namespace} not removed")
            time.sleep(0.5)
        return seconds

    def _apply_and_wait(self, namespace: str, items: list[dict], runs: int) -> tuple[float, float, dict[str, float]]:
        """Applies ``items``; returns when, how long kubectl took, and when each run's pod was Running."""
        with RunningTimes(self.core, namespace) as times:
            applied = kubectl_apply(self.cp, namespace, items)
            apply_s = time.time() - applied
            if times.wait_all(runs, RUNNING_TIMEOUT_S) is None:
                print(f"  only {len(times.first_running)}/{runs} pods Running after {RUNNING_TIMEOUT_S:.0f} s", flush=True)
            return applied, apply_s, dict(times.first_running)

    def baseline(self, runs: int, repeat: int = 0) -> Batch:
        namespace = self._namespace(f"baseline-{runs}-{repeat}")
        storage = self.workdir / "storage" / namespace
        objs = [training(f"run-{i:03d}", storage, self.step_seconds) for i in range(runs)]
        # Every child in one apply inside the timed window (the operator creates them all inside its own);
        # Secrets, ConfigMaps and Services first, so a Job's pod never waits for what it mounts.
        children = sorted((child for obj in objs for child in baseline_children(obj, namespace)),
                          key=lambda child: child["kind"] == "Job")
        applied, apply_s, running = self._apply_and_wait(namespace, children, runs)
        time.sleep(1)  # the audit log is written as responses complete
        jobs = audited_creations(self.audit_log, "jobs", namespace)
        created = {obj["metadata"]["name"]: jobs[learner_job(obj, namespace)] for obj in objs
                   if learner_job(obj, namespace) in jobs}
        batch = Batch(runs, applied, running, created, job_created=created, apply_s=apply_s)
        batch.cleanup_s = self._clean_up(namespace, "jobs")
        return batch

    def with_operator(self, runs: int, repeat: int = 0) -> Batch:
        namespace = self._namespace(f"operator-{runs}-{repeat}")
        storage = self.workdir / "storage" / namespace
        for index in range(runs):  # file:// storage is a node directory the pods' non-root user writes in
            (storage / f"run-{index:03d}").mkdir(parents=True)
            os.chown(storage / f"run-{index:03d}", render.TRAINER_UID, render.TRAINER_UID)
        workdir = self.workdir / f"operator-{runs}-{repeat}"
        workdir.mkdir()
        self.operator = OperatorProcess(_service_account_kubeconfig(self.cp, workdir / "kubeconfig"), workdir,
                                        reconcile_interval_s=self.reconcile_interval_s)
        self.operator.start()
        time.sleep(3)  # let its watches list what exists: start-up is not part of the measurement
        pid = self.operator.process.pid
        idle = ProcessSample.of(pid)
        objs = [training(f"run-{i:03d}", storage, self.step_seconds) for i in range(runs)]
        applied, apply_s, running = self._apply_and_wait(namespace, objs, runs)
        all_running = max(running.values(), default=time.time())
        cpu_s = ProcessSample.of(pid).cpu_s - idle.cpu_s
        time.sleep(max(0.0, all_running + 1 - time.time()))
        hold_from = time.time()
        time.sleep(self.hold_s)
        hold_until = time.time()
        with FinishTimes(self.api_client, namespace) as finished:
            tell_trainers_to_finish()
            if not finished.wait_all(runs, RUNNING_TIMEOUT_S):
                print(f"  only {len(finished.run_succeeded)}/{runs} runs Succeeded after {RUNNING_TIMEOUT_S:.0f} s",
                      flush=True)
            time.sleep(0.5)
        exited = trainer_exit_times(self.core, namespace)
        cleanup_from = time.time()
        cleanup_s = self._clean_up(namespace, "medmotrainings")
        cleanup_until = time.time()
        peak = ProcessSample.of(pid).peak_rss_mib
        self.operator.stop()
        self.operator = None
        time.sleep(1)  # the audit log is written as responses complete
        jobs = audited_creations(self.audit_log, "jobs", namespace)
        steady = audited_requests(self.audit_log, hold_from, hold_until)
        return Batch(
            runs, applied, running,
            created=audited_creations(self.audit_log, api.PLURAL, namespace),
            job_created={obj["metadata"]["name"]: jobs[learner_job(obj, namespace)] for obj in objs
                         if learner_job(obj, namespace) in jobs},
            apply_s=apply_s, cleanup_s=cleanup_s,
            requests_to_running=audited_requests(self.audit_log, applied, all_running),
            requests_in_cleanup=audited_requests(self.audit_log, cleanup_from, cleanup_until),
            requests_per_s_steady=sum(steady.values()) / (hold_until - hold_from),
            cpu_s_to_running=cpu_s, idle_rss_mib=idle.rss_mib, peak_rss_mib=peak,
            exited=exited, job_complete=dict(finished.job_complete), run_succeeded=dict(finished.run_succeeded),
        )


# -- report -------------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (p95 of one value is that value)."""
    if not sorted_values:
        return math.nan
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def p50_p95(values: list[float]) -> str:
    return f"{percentile(values, 0.5):.2f} / {percentile(values, 0.95):.2f}"


def print_table(results: list[tuple[Batch, Batch]], interval_s: float, hold_s: float) -> None:
    header = ("N", "apply->Running operator", "apply->Running baseline", "ratio", "created->Running operator",
              "created->Running baseline", "operator: run->Job created", "op API req to all Running",
              "op API req/s steady", "op CPU s to all Running", "op RSS idle/peak MiB")
    rows = []
    for base, op in results:
        op_lat, base_lat = op.apply_to_running(), base.apply_to_running()
        ratios = [percentile(op_lat, q) / percentile(base_lat, q) for q in (0.5, 0.95)]
        missing = "" if len(op_lat) == op.runs and len(base_lat) == base.runs else \
            f" ({len(op_lat)}/{len(base_lat)} Running)"
        rows.append((f"{op.runs}{missing}", p50_p95(op_lat), p50_p95(base_lat), f"{ratios[0]:.2f} / {ratios[1]:.2f}",
                     p50_p95(op.created_to_running()), p50_p95(base.created_to_running()), p50_p95(op.created_to_job()),
                     str(sum(op.requests_to_running.values())), f"{op.requests_per_s_steady:.1f}",
                     f"{op.cpu_s_to_running:.1f}", f"{op.idle_rss_mib:.0f} / {op.peak_rss_mib:.0f}"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\nseconds as p50 / p95; ratio = operator / baseline (apply->Running); reconcile interval {interval_s:g} s; "
          f"steady state over {hold_s:g} s with every pod Running")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |")
    print()
    for base, op in results:
        print(f"N={op.runs}: kubectl apply took {op.apply_s:.1f} s (runs) / {base.apply_s:.1f} s (Jobs); "
              f"delete to pods gone {op.cleanup_s:.1f} s / {base.cleanup_s:.1f} s")
        print(f"  operator requests to all Running: {_top(op.requests_to_running)}")
        print(f"  operator requests while cleaning up: {_top(op.requests_in_cleanup)}")


def _top(requests: Counter) -> str:
    return ", ".join(f"{key} {count}" for key, count in requests.most_common(8)) or "none"


def figures(batch: Batch) -> dict[str, float]:
    """One repeat's figures for the harness's table."""
    latency = batch.apply_to_running()
    out = {"apply->Running p50 s": percentile(latency, 0.5), "apply->Running p95 s": percentile(latency, 0.95),
           "created->Running p50 s": percentile(batch.created_to_running(), 0.5),
           "pods Running": float(len(latency))}
    if batch.peak_rss_mib:  # the operator's own figures
        out |= {"op run->Job created p50 s": percentile(batch.created_to_job(), 0.5),
                "op API requests to all Running": float(sum(batch.requests_to_running.values())),
                "op API requests/s steady": batch.requests_per_s_steady,
                "op CPU s to all Running": batch.cpu_s_to_running, "op peak RSS MiB": batch.peak_rss_mib,
                "trainer exit->Job Complete p50 s": percentile(batch.exit_to_job_complete(), 0.5),
                "op Job Complete->run Succeeded p50 s": percentile(batch.job_complete_to_succeeded(), 0.5),
                "op Job Complete->run Succeeded p95 s": percentile(batch.job_complete_to_succeeded(), 0.95),
                "runs Succeeded": float(len(batch.run_succeeded))}
    return out


def main() -> None:
    global RUNNING_TIMEOUT_S
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="20", help="comma-separated numbers of runs applied at once")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of baseline and operator per N")
    parser.add_argument("--reconcile-interval", type=float, default=5.0,
                        help="MEDMO_RECONCILE_INTERVAL of the operator (default 5, as manifests/base deploys it)")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds of steady state measured with every pod Running")
    parser.add_argument("--step-seconds", type=float, default=2.0, help="the stand-in's seconds per step (one progress report each)")
    parser.add_argument("--running-timeout", type=float, default=RUNNING_TIMEOUT_S,
                        help="seconds to wait for every pod to be Running (and, later, every run to succeed)")
    parser.add_argument("--bin-dir", type=Path, default=None, help="Kubernetes binaries (default: what tests/controlplane/build.sh prints)")
    parser.add_argument("--results", type=Path, default=harness.RESULTS)
    parser.add_argument("--table", action="store_true", help="also print the detailed table of the last repeat per N")
    args = parser.parse_args()
    counts = [int(n) for n in args.runs.split(",")]
    RUNNING_TIMEOUT_S = args.running_timeout
    bin_dir = args.bin_dir or Path(os.environ.get("MEDMO_K8S_BIN") or _build_bin_dir())
    last: list[tuple[Batch, Batch]] = []
    with tempfile.TemporaryDirectory(prefix="bench-operator-") as folder:
        bench = Bench(Path(folder), args.reconcile_interval, args.hold, args.step_seconds)
        try:
            bench.start(bin_dir)
            for runs in counts:
                repeats = {"baseline": iter(range(args.repeats)), "operator": iter(range(args.repeats))}
                batches: dict[str, Batch] = {}

                def side(name: str, runs: int = runs):
                    def measure() -> dict[str, float]:
                        repeat = next(repeats[name])
                        batch = bench.baseline(runs, repeat) if name == "baseline" else bench.with_operator(runs, repeat)
                        batches[name] = batch
                        return figures(batch)
                    return measure

                cp_processes = [harness.Process("control plane (etcd, apiserver, controller-manager, scheduler)", 0, 4),
                                harness.Process("node agent", 0)]
                result = harness.Benchmark(f"Operator: {runs} runs applied at once", [
                    harness.Side("plain Jobs and their objects (kubectl)", side("baseline"), cp_processes),
                    harness.Side("MedMOTrainings (operator)", side("operator"),
                                 [*cp_processes, harness.Process("operator", 1)]),
                ], repeats=args.repeats, higher_is_better={k: False for k in (
                    "apply->Running p50 s", "apply->Running p95 s", "created->Running p50 s",
                    "trainer exit->Job Complete p50 s", "op Job Complete->run Succeeded p50 s",
                    "op Job Complete->run Succeeded p95 s")}, notes=[
                    f"Test control plane with the node agent ({len(NODES)} nodes), stand-in trainer pods; reconcile "
                    f"interval {args.reconcile_interval:g} s; steady state over {args.hold:g} s. The baseline applies "
                    "every object the operator would create (Secret, ConfigMap, Service, Job per run) in one kubectl "
                    "apply inside its timed window. The control plane and node agent are shared by both sides and not "
                    "thread-limited; each side's pods are stand-in processes (started); the operator is one Python "
                    "process. op: the operator's own figures."],
                ).run()
                result.report(args.results)
                last.append((batches["baseline"], batches["operator"]))
        finally:
            bench.stop()
    if args.table:
        print_table(last, args.reconcile_interval, args.hold)


def _build_bin_dir() -> str:
    import subprocess

    # stdout is only the bin dir; the build's progress goes to stderr.
    return subprocess.run([str(TESTS / "controlplane" / "build.sh")], stdout=subprocess.PIPE, text=True, check=True).stdout.strip()


if __name__ == "__main__":
    main()
