"""kopf wiring: watch runs and their children, call `plan`, apply its actions, patch status.

Nothing here decides anything: observations come from kopf's in-memory indexes of the runs' Jobs
and Pods (so a reconcile makes no list calls), decisions from `plan.plan`, objects from `render`.
Run it with `medmo operator` (see `medmo_operator.cli`).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
import kubernetes
from aiohttp import web
from kubernetes.client.rest import ApiException

from medmo_operator import api, observe, plan, render, telemetry
from medmo_operator.progress import ProgressEndpoint, ProgressStore

log = logging.getLogger(__name__)

TOKEN_KEY_SECRET = "medmo-operator-token-key"


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


SETTINGS = OperatorSettings()
STORE = ProgressStore()
_state: dict[str, Any] = {}


# -- start-up ---------------------------------------------------------------------------------


@kopf.on.startup()
async def on_operator_startup(settings: kopf.OperatorSettings, **_: Any) -> None:
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
    token_key = await asyncio.to_thread(_token_key)
    endpoint = ProgressEndpoint(store=STORE, token_key=token_key, run_uid=_run_uid)
    runner = web.AppRunner(endpoint.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, SETTINGS.progress_bind_host, SETTINGS.progress_port).start()
    _state.update(runner=runner, endpoints=render.OperatorEndpoints(SETTINGS.progress_advertise_url, token_key))
    log.info("progress endpoint on %s:%d", SETTINGS.progress_bind_host, SETTINGS.progress_port)


@kopf.on.cleanup()
async def on_operator_cleanup(**_: Any) -> None:
    if "runner" in _state:
        await _state["runner"].cleanup()


def _token_key() -> bytes:
    """The key progress tokens are derived from: kept in a Secret so a restarted operator still
    accepts the tokens its predecessor handed out."""
    if os.environ.get("MEDMO_TOKEN_KEY"):
        return os.environ["MEDMO_TOKEN_KEY"].encode()
    core = kubernetes.client.CoreV1Api()
    try:
        secret = core.read_namespaced_secret(TOKEN_KEY_SECRET, SETTINGS.namespace)
    except ApiException as error:
        if error.status != 404:
            raise
        body = {"metadata": {"name": TOKEN_KEY_SECRET}, "stringData": {"key": secrets.token_hex(32)}}
        try:
            core.create_namespaced_secret(SETTINGS.namespace, body)
        except ApiException as race:
            if race.status != 409:
                raise
        secret = core.read_namespaced_secret(TOKEN_KEY_SECRET, SETTINGS.namespace)
    import base64

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


@kopf.index("", "v1", "pods", labels={render.LABEL_RUN: kopf.PRESENT, render.LABEL_ROLE: "learner"})
def learner_pods_by_run(namespace: str, labels: dict, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[render.LABEL_RUN]): _snapshot(body, "metadata", "status")}


def _run_uid(namespace: str, name: str) -> str | None:
    index = _state.get("run_uids")
    if index is None or (namespace, name) not in index:
        return None
    return next(iter(index[(namespace, name)]), None)


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
    run_uids: kopf.Index,
    jobs_by_run: kopf.Index,
    learner_pods_by_run: kopf.Index,
    **_: Any,
) -> None:
    """One reconcile of one run (kopf calls it every reconcileInterval seconds per run)."""
    _state["run_uids"] = run_uids
    if meta.get("deletionTimestamp"):
        return  # the garbage collector removes the children; writing status now is wasted work
    started = time.monotonic()
    run = render.RunRef(name=name, namespace=namespace, uid=uid)
    training_spec = api.MedMOTrainingSpec.model_validate(copy.deepcopy(dict(spec)))
    current = {k: v for k, v in dict(status).items() if k != "kopf"}
    current_status = api.MedMOTrainingStatus.model_validate(copy.deepcopy(current)) if current else None
    observed = plan.Observed(
        jobs=observe.latest_jobs(list(jobs_by_run.get((namespace, name), [])), list(learner_pods_by_run.get((namespace, name), []))),
        progress=STORE.latest(namespace, name),
    )
    result = plan.plan(training_spec, current_status, observed, datetime.now(UTC), generation=meta.get("generation"))
    for action in result.actions:
        _carry_out(action, run, training_spec, body)
    new_status = plan.status_patch(result.status)
    if new_status != {k: v for k, v in current.items()}:
        patch.status.update(new_status)
    telemetry.record_actions(result.actions, _finished_stage_durations(result, training_spec))
    telemetry.record_reconcile(time.monotonic() - started)
    if any(isinstance(a, plan.DeleteRun) for a in result.actions):
        STORE.forget(namespace, name)


def _finished_stage_durations(result: plan.Plan, spec: api.MedMOTrainingSpec) -> dict[str, float]:
    finished = {a.message.split()[1] for a in result.actions if isinstance(a, plan.Event) and a.reason == "StageSucceeded"}
    types = {s.name: s.type for s in spec.stages}
    return {
        types[r.name]: (r.completion_time - r.start_time).total_seconds()
        for r in result.status.stages
        if r.name in finished and r.start_time and r.completion_time
    }


def _carry_out(action: plan.Action, run: render.RunRef, spec: api.MedMOTrainingSpec, body: kopf.Body) -> None:
    stages = {s.name: s for s in spec.stages}
    match action:
        case plan.EnsureStage(stage=stage_name, attempt=attempt):
            for child in render.build_stage_children(run, spec, stages[stage_name], attempt, _state["endpoints"]):
                _create_if_absent(child)
        case plan.DeleteJob(name=job_name):
            _delete("Job", run.namespace, job_name)
        case plan.SuspendJob(name=job_name, suspend=suspend):
            _call(lambda: kubernetes.client.BatchV1Api().patch_namespaced_job(job_name, run.namespace, {"spec": {"suspend": suspend}}))
        case plan.DeleteWorkers(stage=stage_name):
            for role in ("rollout", "reward"):
                worker = render.worker_name(run, stages[stage_name], role)
                _delete("Deployment", run.namespace, worker)
                _delete("Service", run.namespace, worker)
        case plan.DeleteRun():
            _call(
                lambda: kubernetes.client.CustomObjectsApi().delete_namespaced_custom_object(
                    api.GROUP, api.VERSION, run.namespace, api.PLURAL, run.name
                )
            )
        case plan.Event(reason=reason, message=message, warning=warning):
            kopf.event(body, type="Warning" if warning else "Normal", reason=reason, message=message)


_CREATE = {
    "ConfigMap": lambda ns, b: kubernetes.client.CoreV1Api().create_namespaced_config_map(ns, b),
    "Secret": lambda ns, b: kubernetes.client.CoreV1Api().create_namespaced_secret(ns, b),
    "Service": lambda ns, b: kubernetes.client.CoreV1Api().create_namespaced_service(ns, b),
    "Job": lambda ns, b: kubernetes.client.BatchV1Api().create_namespaced_job(ns, b),
    "Deployment": lambda ns, b: kubernetes.client.AppsV1Api().create_namespaced_deployment(ns, b),
}
_DELETE = {
    "Job": lambda n, ns, o: kubernetes.client.BatchV1Api().delete_namespaced_job(n, ns, body=o),
    "Deployment": lambda n, ns, o: kubernetes.client.AppsV1Api().delete_namespaced_deployment(n, ns, body=o),
    "Service": lambda n, ns, o: kubernetes.client.CoreV1Api().delete_namespaced_service(n, ns, body=o),
}


def _create_if_absent(obj: dict) -> None:
    """Deterministic names make creation idempotent: an existing child is left as it is."""
    namespace = obj["metadata"]["namespace"]
    try:
        _call(lambda: _CREATE[obj["kind"]](namespace, obj))
    except _AlreadyExists:
        pass


def _delete(kind: str, namespace: str, name: str) -> None:
    options = kubernetes.client.V1DeleteOptions(propagation_policy="Background")
    try:
        _call(lambda: _DELETE[kind](name, namespace, options))
    except _NotFound:
        pass


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
