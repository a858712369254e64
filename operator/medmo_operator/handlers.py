"""kopf wiring: watch runs and their children, call `plan`, apply its actions, patch status.

Nothing here decides anything: observations come from kopf's in-memory indexes of the runs' Jobs
and Pods (so a reconcile makes no list calls), decisions from `plan.plan`, objects from `render`.
Run it with `medmo operator` (see `medmo_operator.cli`).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import logging
import os
import secrets
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
import kubernetes
from aiohttp import web
from kubernetes.client.rest import ApiException

from medmo_operator import api, execute, observe, plan, render, telemetry
from medmo_operator.peering import Peering
from medmo_operator.progress import ProgressEndpoint, ProgressStore

log = logging.getLogger(__name__)

TOKEN_KEY_SECRET = "medmo-operator-token-key"
KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta2"


@dataclass
class OperatorSettings:
    """Settings from the environment (the operator Deployment sets them)."""

    progress_bind_host: str = field(default_factory=lambda: os.environ.get("MEDMO_PROGRESS_BIND_HOST", "0.0.0.0"))
    progress_port: int = field(default_factory=lambda: int(os.environ.get("MEDMO_PROGRESS_PORT", "8080")))
    progress_advertise_url: str = field(
        default_factory=lambda: os.environ.get("MEDMO_PROGRESS_ADVERTISE_URL", "http://medmo-operator.medmo-system:8080")
    )
    """The progress endpoint's URL as pods see it (the operator's Service)."""
    reconcile_interval: float = field(default_factory=lambda: float(os.environ.get("MEDMO_RECONCILE_INTERVAL", "5")))
    """Seconds between reconciles of a run; also the bound on its status writes."""
    metrics_port: int | None = field(
        default_factory=lambda: int(os.environ["MEDMO_METRICS_PORT"]) if os.environ.get("MEDMO_METRICS_PORT") else None
    )
    namespace: str = field(default_factory=lambda: os.environ.get("MEDMO_OPERATOR_NAMESPACE", "medmo-system"))
    """The operator's own namespace, holding the Secret its progress tokens are derived from."""
    peering: Peering | None = None
    """Set by `medmo operator --peering`: one of several replicas."""


SETTINGS = OperatorSettings()


@dataclass
class OperatorState:
    """What the handlers share. The startup handler builds it, before any watch starts and before
    the progress endpoint takes a request, and hands it to every handler as `memo.operator`."""

    endpoints: render.OperatorEndpoints
    run_uids: Mapping[tuple[str, str], Collection[str]]
    """kopf's index of runs, (namespace, name) -> uids; filled by the watch after startup."""
    store: ProgressStore = field(default_factory=ProgressStore)
    server: web.AppRunner | None = None
    acting_label: asyncio.Task | None = None

    @classmethod
    async def start(cls, settings: OperatorSettings, run_uids: Mapping[tuple[str, str], Collection[str]]) -> OperatorState:
        """Reads the token key and starts serving progress reports."""
        token_key = await asyncio.to_thread(_token_key, settings.namespace)
        state = cls(render.OperatorEndpoints(settings.progress_advertise_url, token_key), run_uids)
        endpoint = ProgressEndpoint(store=state.store, token_key=token_key, run_uid=state.run_uid)
        state.server = await endpoint.serve(settings.progress_bind_host, settings.progress_port)
        log.info("progress endpoint on %s:%d", settings.progress_bind_host, settings.progress_port)
        if settings.peering is not None:
            await asyncio.to_thread(settings.peering.ensure_object)
            state.acting_label = asyncio.create_task(settings.peering.label_while_acting(settings.namespace))
        return state

    async def stop(self) -> None:
        if self.acting_label is not None:
            self.acting_label.cancel()
        if self.server is not None:
            await self.server.cleanup()

    def run_uid(self, namespace: str, name: str) -> str | None:
        """A run's uid from the index; until the watch has listed the run (just after a start, when
        trainers that outlived the previous operator report at once), from the API server."""
        uids = self.run_uids.get((namespace, name))
        if uids:
            return next(iter(uids))
        return _read_run_uid(namespace, name)


def _read_run_uid(namespace: str, name: str) -> str | None:
    try:
        run = kubernetes.client.CustomObjectsApi().get_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, api.PLURAL, name, _request_timeout=5
        )
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return run["metadata"]["uid"]


# -- start-up ---------------------------------------------------------------------------------


@kopf.on.startup()
async def on_operator_startup(settings: kopf.OperatorSettings, memo: kopf.Memo, run_uids: kopf.Index, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="medmo.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="medmo.io", key="last-handled-configuration")
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 16
    if os.environ.get("KUBECONFIG"):
        kubernetes.config.load_kube_config()
    else:
        kubernetes.config.load_incluster_config()
    telemetry.setup(SETTINGS.metrics_port)
    memo.operator = await OperatorState.start(SETTINGS, run_uids)


@kopf.on.cleanup()
async def on_operator_cleanup(memo: kopf.Memo, **_: Any) -> None:
    if "operator" in memo:
        await memo.operator.stop()
    telemetry.shutdown()


def _token_key(namespace: str) -> bytes:
    """The key progress tokens are derived from: kept in a Secret so a restarted operator still
    accepts the tokens its predecessor handed out."""
    if os.environ.get("MEDMO_TOKEN_KEY"):
        return os.environ["MEDMO_TOKEN_KEY"].encode()
    core = kubernetes.client.CoreV1Api()
    try:
        secret = core.read_namespaced_secret(TOKEN_KEY_SECRET, namespace)
    except ApiException as error:
        if error.status != 404:
            raise
        body = {"metadata": {"name": TOKEN_KEY_SECRET}, "stringData": {"key": secrets.token_hex(32)}}
        try:
            core.create_namespaced_secret(namespace, body)
        except ApiException as race:
            if race.status != 409:
                raise
        secret = core.read_namespaced_secret(TOKEN_KEY_SECRET, namespace)
    return base64.b64decode(secret.data["key"])


# -- indexes: what the reconcile observes, kept current by watches ---------------------------


def _snapshot(body: kopf.Body, *sections: str) -> dict:
    return {section: copy.deepcopy(dict(body.get(section) or {})) for section in sections}


@kopf.index(api.GROUP, api.VERSION, api.PLURAL)
def run_uids(namespace: str, name: str, uid: str, **_: Any) -> dict:
    return {(namespace, name): uid}


@kopf.index("batch", "v1", "jobs", labels={render.LABEL_RUN: kopf.PRESENT})
def jobs_by_run(namespace: str, labels: dict, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[render.LABEL_RUN]): _snapshot(body, "metadata", "spec", "status")}


def _pod_snapshot(body: kopf.Body) -> dict:
    """A pod's metadata and status, and of its spec only its containers' requests (for the
    WaitingForResources condition)."""
    snapshot = _snapshot(body, "metadata", "status")
    containers = body.get("spec", {}).get("containers") or []
    snapshot["spec"] = {"containers": [{"resources": {"requests": copy.deepcopy(dict((c.get("resources") or {}).get("requests") or {}))}}
                                       for c in containers]}
    return snapshot


@kopf.index("", "v1", "pods", labels={render.LABEL_RUN: kopf.PRESENT, render.LABEL_ROLE: "learner"})
def learner_pods_by_run(namespace: str, labels: dict, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[render.LABEL_RUN]): _pod_snapshot(body)}


@kopf.index("", "v1", "pods", labels={render.LABEL_RUN: kopf.PRESENT,
                                      render.LABEL_ROLE: lambda value, **_: value in render.WORKER_ROLES})
def worker_pods_by_run(namespace: str, labels: dict, body: kopf.Body, **_: Any) -> dict:
    """rl stages' rollout and reward pods: observed only for the WaitingForResources condition."""
    return {(namespace, labels[render.LABEL_RUN]): _pod_snapshot(body)}


@kopf.index("", "v1", "pods", labels={render.LABEL_RUN: kopf.PRESENT, render.LABEL_ROLE: render.MODEL_INITIALIZER})
def initializer_pods_by_run(namespace: str, labels: dict, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[render.LABEL_RUN]): _snapshot(body, "metadata", "status")}


# -- the reconcile ----------------------------------------------------------------------------


@kopf.timer(api.GROUP, api.VERSION, api.PLURAL, interval=SETTINGS.reconcile_interval)
def reconcile_training(
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    body: kopf.Body,
    name: str,
    namespace: str,
    uid: str,
    patch: kopf.Patch,
    memo: kopf.Memo,
    jobs_by_run: kopf.Index,
    learner_pods_by_run: kopf.Index,
    worker_pods_by_run: kopf.Index,
    initializer_pods_by_run: kopf.Index,
    **_: Any,
) -> None:
    """One reconcile of one run (kopf calls it every reconcileInterval seconds per run)."""
    if meta.get("deletionTimestamp"):
        return  # the garbage collector removes the children; writing status now is wasted work
    state: OperatorState = memo.operator
    with telemetry.reconcile_span(namespace, name):
        started = time.monotonic()
        run = render.RunRef(name=name, namespace=namespace, uid=uid)
        training_spec = api.MedMOTrainingSpec.model_validate(copy.deepcopy(dict(spec)))
        current = {k: v for k, v in dict(status).items() if k != "kopf"}
        current_status = api.MedMOTrainingStatus.model_validate(copy.deepcopy(current)) if current else None
        jobs = list(jobs_by_run.get((namespace, name), []))
        workloads = _kueue_workloads(namespace, jobs) if training_spec.scheduling.queue_name else []
        learner_pods = list(learner_pods_by_run.get((namespace, name), []))
        observed = plan.Observed(
            jobs=observe.latest_jobs(jobs, learner_pods, workloads),
            progress=state.store.latest(namespace, name),
            initializer=observe.model_initializer_job(jobs, list(initializer_pods_by_run.get((namespace, name), []))),
            unschedulable=observe.unschedulable_by_stage([*learner_pods, *worker_pods_by_run.get((namespace, name), [])]),
        )
        result = plan.plan(training_spec, current_status, observed, datetime.now(UTC), generation=meta.get("generation"))
        execute.carry_out(result.actions, run, training_spec, state.endpoints, KubernetesExecutor(run, body))
        new_status = plan.status_patch(result.status)
        if new_status != current:
            patch.status.update(new_status)
        telemetry.record_actions(result.actions, _finished_stage_durations(result, training_spec))
        telemetry.record_reconcile(time.monotonic() - started)
        if any(isinstance(a, plan.DeleteRun) for a in result.actions):
            state.store.forget(namespace, name)


def _kueue_workloads(namespace: str, jobs: list[dict]) -> list[dict]:
    """Kueue's Workloads of a queued run's namespace (one list call per reconcile, only for runs with
    scheduling.queueName, once the run has a learner Job): the run's own, found by their Jobs' uids,
    and the others waiting in the same LocalQueue, for its queue position. Without Kueue's CRD there
    are none: the Admitted condition then says the stage waits for Kueue."""
    if not any(job["metadata"].get("labels", {}).get(render.LABEL_ROLE) == "learner" for job in jobs):
        return []
    try:
        listed = _call(lambda: kubernetes.client.CustomObjectsApi().list_namespaced_custom_object(
            KUEUE_GROUP, KUEUE_VERSION, namespace, "workloads"))
    except _NotFound:
        return []
    return listed.get("items", [])


def _finished_stage_durations(result: plan.Plan, spec: api.MedMOTrainingSpec) -> dict[str, float]:
    finished = {a.stage for a in result.actions if isinstance(a, plan.Event) and a.reason == "StageSucceeded"}
    types = {s.name: s.type for s in spec.stages}
    return {
        types[r.name]: (r.completion_time - r.start_time).total_seconds()
        for r in result.status.stages
        if r.name in finished and r.start_time and r.completion_time
    }


# -- carrying out the plan in the cluster -------------------------------------------------------


_CREATE = {
    "ConfigMap": lambda ns, b: kubernetes.client.CoreV1Api().create_namespaced_config_map(ns, b),
    "Secret": lambda ns, b: kubernetes.client.CoreV1Api().create_namespaced_secret(ns, b),
    "Service": lambda ns, b: kubernetes.client.CoreV1Api().create_namespaced_service(ns, b),
    "Job": lambda ns, b: kubernetes.client.BatchV1Api().create_namespaced_job(ns, b),
    "Deployment": lambda ns, b: kubernetes.client.AppsV1Api().create_namespaced_deployment(ns, b),
    "NetworkPolicy": lambda ns, b: kubernetes.client.NetworkingV1Api().create_namespaced_network_policy(ns, b),
    # A gang (scheduling.gang): the Workload API's Workload and PodGroup, or scheduler-plugins' PodGroup.
    "Workload": lambda ns, b: _create_custom(ns, b, "workloads"),
    "PodGroup": lambda ns, b: _create_custom(ns, b, "podgroups"),
}
_DELETE = {
    "Job": lambda n, ns, o: kubernetes.client.BatchV1Api().delete_namespaced_job(n, ns, body=o),
    "Deployment": lambda n, ns, o: kubernetes.client.AppsV1Api().delete_namespaced_deployment(n, ns, body=o),
    "Service": lambda n, ns, o: kubernetes.client.CoreV1Api().delete_namespaced_service(n, ns, body=o),
    "NetworkPolicy": lambda n, ns, o: kubernetes.client.NetworkingV1Api().delete_namespaced_network_policy(
        n, ns, body=o),
}


_GANG_API_NEEDS = {
    "scheduling.k8s.io": "gangScheduler workload-api needs Kubernetes 1.36+ with the feature gates GenericWorkload and "
                         "GangScheduling and the API scheduling.k8s.io/v1alpha2 enabled",
    "scheduling.x-k8s.io": "gangScheduler coscheduling needs scheduler-plugins' Coscheduling (its PodGroup CRD)",
}


def _create_custom(namespace: str, body: dict, plural: str) -> Any:
    """Creates a gang's object; an API the cluster does not serve is an error no retry fixes."""
    group, version = body["apiVersion"].split("/")
    try:
        return kubernetes.client.CustomObjectsApi().create_namespaced_custom_object(group, version, namespace, plural, body)
    except ApiException as error:
        if error.status == 404 and group in _GANG_API_NEEDS:
            raise kopf.PermanentError(f"the cluster does not serve {body['apiVersion']} {plural}: {_GANG_API_NEEDS[group]}") from error
        raise


@dataclass
class KubernetesExecutor:
    """`execute.Executor` against the API server, for one run."""

    run: render.RunRef
    body: kopf.Body

    def create(self, obj: dict) -> None:
        """Deterministic names make creation idempotent: an existing child is left as it is."""
        try:
            _call(lambda: _CREATE[obj["kind"]](self.run.namespace, obj))
        except _AlreadyExists:
            pass

    def delete(self, kind: str, name: str, api_version: str | None = None) -> None:
        options = kubernetes.client.V1DeleteOptions(propagation_policy="Background")
        if api_version is not None:  # a gang's Workload or PodGroup
            group, version = api_version.split("/")
            plural = {"Workload": "workloads", "PodGroup": "podgroups"}[kind]
            request = lambda: kubernetes.client.CustomObjectsApi().delete_namespaced_custom_object(  # noqa: E731
                group, version, self.run.namespace, plural, name, body=options)
        else:
            request = lambda: _DELETE[kind](name, self.run.namespace, options)  # noqa: E731
        try:
            _call(request)
        except _NotFound:
            pass

    def suspend_job(self, name: str, suspend: bool) -> None:
        _call(lambda: kubernetes.client.BatchV1Api().patch_namespaced_job(name, self.run.namespace, {"spec": {"suspend": suspend}}))

    def set_workload_active(self, name: str, active: bool) -> None:
        _call(lambda: kubernetes.client.CustomObjectsApi().patch_namespaced_custom_object(
            KUEUE_GROUP, KUEUE_VERSION, self.run.namespace, "workloads", name, {"spec": {"active": active}}))

    def delete_run(self) -> None:
        _call(
            lambda: kubernetes.client.CustomObjectsApi().delete_namespaced_custom_object(
                api.GROUP, api.VERSION, self.run.namespace, api.PLURAL, self.run.name
            )
        )

    def emit(self, event: plan.Event) -> None:
        kopf.event(self.body, type="Warning" if event.warning else "Normal", reason=event.reason, message=event.message)


class _AlreadyExists(Exception):
    pass


class _NotFound(Exception):
    pass


def _call(request) -> Any:
    """Runs an API request, classifying errors: conflicts and absences are answers, server and
    network trouble is temporary, anything else (a forbidden verb, an invalid object) is permanent."""
    try:
        return request()
    except ApiException as error:
        if error.status == 409:
            raise _AlreadyExists() from error
        if error.status == 404:
            raise _NotFound() from error
        if error.status in (429, 500, 502, 503, 504):
            raise kopf.TemporaryError(f"API server answered {error.status}: {error.reason}", delay=5) from error
        raise kopf.PermanentError(f"API request refused ({error.status} {error.reason}): {error.body}") from error
    except (OSError, kubernetes.client.exceptions.OpenApiException) as error:
        raise kopf.TemporaryError(f"API request failed: {error}", delay=5) from error
