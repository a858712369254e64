"""Pure builders of a run's child objects: plain dicts, as the Kubernetes API takes them.

Nothing here talks to a cluster: the kopf handlers apply what these return, and `medmo run` hands
the same objects to the local pod runner. Names are deterministic so applying twice creates nothing
new, and every child carries an ownerReference to the run so deleting the run removes it.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import yaml

from medmo_operator import api
from medmo_trainer.config import (
    BenchmarkSpec,
    CompareModel,
    EvalSettings,
    ModelSource,
    RLStageConfig,
    StageConfig,
    StorageConfig,
)
from medmo_trainer.exit_codes import NON_RETRYABLE

LABEL_RUN = "medmo.io/run"
LABEL_STAGE = "medmo.io/stage"
LABEL_ROLE = "medmo.io/role"
LABEL_ATTEMPT = "medmo.io/attempt"
LABEL_TOKEN = "medmo.io/progress-token"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
POD_GROUP_LABEL = "scheduling.x-k8s.io/pod-group"
"""scheduler-plugins' Coscheduling: the PodGroup (scheduling.x-k8s.io/v1alpha1) a pod belongs to."""
WORKLOAD_API_VERSION = "scheduling.k8s.io/v1alpha2"
"""Kubernetes' Workload API (1.36, feature gate GenericWorkload): Workloads and PodGroups."""
COSCHEDULING_API_VERSION = "scheduling.x-k8s.io/v1alpha1"
GANG_TEMPLATE = "learner"
"""The one PodGroupTemplate of a learner attempt's Workload."""
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

CONFIG_DIR = "/etc/medmo"
CONFIG_FILE = "stage.yaml"
TOKEN_DIR = "/var/run/medmo/progress"
CACHE_DIR = "/var/cache/medmo"
CACHE_ENV = {
    # Pods have a read-only root filesystem: everything that writes a cache writes it here.
    "HOME": f"{CACHE_DIR}/home",
    "XDG_CACHE_HOME": CACHE_DIR,
    "MEDMO_CACHE": f"{CACHE_DIR}/medmo",
    "HF_HOME": f"{CACHE_DIR}/huggingface",
    "TORCH_HOME": f"{CACHE_DIR}/torch",
    "TORCH_EXTENSIONS_DIR": f"{CACHE_DIR}/torch-extensions",
    "TRITON_CACHE_DIR": f"{CACHE_DIR}/triton",
    "MPLCONFIGDIR": f"{CACHE_DIR}/matplotlib",
}
"""Where each library that writes caches is told to write them: under the cache volume."""
TOKEN_KEY = "token"
RENDEZVOUS_PORT = 29500
RENDEZVOUS_TIMEOUT_S = 300
"""How long torchrun waits for rank 0's name to resolve and for every node to join (torchrun's own
default is 600 s, per connection try): long enough for a slow node's image pull, short enough that a
rendezvous that cannot complete fails the attempt with a message naming the host, not a silent wait."""
WORKER_PORT = 8000
TRAINER_UID = 1000
TRAINER_ENTRYPOINT = ["python", "-m", "medmo_trainer.launch"]
"""The trainer image's ENTRYPOINT (images/trainer/Dockerfile); learner pods set only args."""
WORKER_ROLES = ("rollout", "reward")
"""The worker groups of an rl stage, each a Deployment behind a Service."""
MODEL_INITIALIZER = "model-initializer"
"""Role (and name suffix) of the Job that downloads a hub model before the first stage."""
BASE_MODEL_DIR = "base_model"
"""Where under the run's storage the model initializer puts the base model (no stage is named so:
stage names are DNS labels, without `_`)."""


@dataclass(frozen=True)
class RunRef:
    """What every child needs to know about its run: identity for names and ownerReferences."""

    name: str
    namespace: str
    uid: str

    def owner_reference(self) -> dict:
        return {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


@dataclass(frozen=True)
class OperatorEndpoints:
    """Where pods reach the operator, and the key their progress tokens are derived from."""

    progress_url: str
    """Base URL of the operator's progress endpoint as pods see it, e.g. `http://medmo-operator.medmo-system:8080`."""
    token_key: bytes
    """Secret key of the operator; a run's token is an HMAC of its identity under this key."""


# -- names ------------------------------------------------------------------------------------


def stage_service_name(run: RunRef, stage: api.Stage) -> str:
    """Headless Service of a stage's learner pods (the pods' DNS subdomain)."""
    return f"{run.name}-{stage.name}"


def learner_job_name(run: RunRef, stage: api.Stage, attempt: int) -> str:
    """The Indexed Job of one attempt; a gang restart creates the next attempt's Job."""
    return f"{run.name}-{stage.name}-{attempt}"


def gang_name(run: RunRef, stage: api.Stage, attempt: int) -> str:
    """The Workload and PodGroup of one learner attempt (scheduling.gang): the attempt's Job's name,
    so each attempt's pods form a new gang."""
    return learner_job_name(run, stage, attempt)


def config_map_name(run: RunRef, stage: api.Stage) -> str:
    return f"{run.name}-{stage.name}-config"


def worker_name(run: RunRef, stage: api.Stage, role: str) -> str:
    """Deployment and Service of an RL worker group (one of `WORKER_ROLES`)."""
    return f"{run.name}-{stage.name}-{role}"


def worker_network_policy_name(run: RunRef, stage: api.Stage) -> str:
    """The NetworkPolicy letting only the run's own pods reach an rl stage's workers."""
    return f"{run.name}-{stage.name}-workers"


def model_initializer_job_name(run: RunRef) -> str:
    return f"{run.name}-{MODEL_INITIALIZER}"


def token_secret_name(run: RunRef) -> str:
    return f"{run.name}-progress-token"


def progress_token(run: RunRef, key: bytes) -> str:
    """The bearer token of a run: an HMAC of its identity, so the operator can check a progress report
    without storing or reading any Secret. The run's RL workers require the same token."""
    message = f"{run.namespace}/{run.name}/{run.uid}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def progress_url(run: RunRef, endpoints: OperatorEndpoints) -> str:
    return f"{endpoints.progress_url.rstrip('/')}/v1/namespaces/{run.namespace}/medmotrainings/{run.name}/progress"


# -- where models and checkpoints live -------------------------------------------------------


def stage_uri(spec: api.MedMOTrainingSpec, stage: api.Stage) -> str:
    return f"{spec.storage.uri.rstrip('/')}/{stage.name}"


def stage_output_uri(spec: api.MedMOTrainingSpec, stage: api.Stage) -> str:
    """Where a training stage exports its model in Hugging Face format."""
    return f"{stage_uri(spec, stage)}/model"


def stage_checkpoint_uri(spec: api.MedMOTrainingSpec, stage: api.Stage) -> str:
    return f"{stage_uri(spec, stage)}/checkpoints"


def base_model_uri(spec: api.MedMOTrainingSpec) -> str:
    """Where pods load the run's base model: the initializer's copy of a hub model in the run's
    storage, else `model.base` itself."""
    return f"{spec.storage.uri.rstrip('/')}/{BASE_MODEL_DIR}" if spec.model.from_hub else spec.model.base


def stage_input_model(spec: api.MedMOTrainingSpec, stage: api.Stage) -> str:
    """The model a stage starts from: `initFrom`, else the previous training stage's export,
    else the run's base model."""
    by_name = {s.name: s for s in spec.stages}
    if stage.init_from:
        named = by_name.get(stage.init_from)
        return stage_output_uri(spec, named) if named else stage.init_from
    index = spec.stages.index(stage)
    earlier = [s for s in spec.stages[:index] if s.trains]
    return stage_output_uri(spec, earlier[-1]) if earlier else base_model_uri(spec)


def final_output_model(spec: api.MedMOTrainingSpec) -> str | None:
    """The run's final model: the last training stage's export."""
    trained = [s for s in spec.stages if s.trains]
    return stage_output_uri(spec, trained[-1]) if trained else None


def evaluation_settings(spec: api.MedMOTrainingSpec, stage: api.Stage) -> EvalSettings:
    """What an eval stage compares: its input model, named after the stage that made it, and, after
    RL, the model from before the last RL stage, so the report can show what RL changed."""
    index = spec.stages.index(stage)
    earlier = [s for s in spec.stages[:index] if s.trains]
    if not earlier or stage.init_from:
        return EvalSettings()
    compare = []
    rl_positions = [i for i, s in enumerate(earlier) if s.type == "rl"]
    if rl_positions and rl_positions[-1] > 0:
        before_rl = earlier[rl_positions[-1] - 1]
        if before_rl is not earlier[-1]:
            compare.append(CompareModel(name=before_rl.name, uri=stage_output_uri(spec, before_rl)))
    return EvalSettings(model_name=earlier[-1].name, compare_models=compare)


# -- the stage config pods receive -----------------------------------------------------------


def build_stage_config(run: RunRef, spec: api.MedMOTrainingSpec, stage: api.Stage) -> StageConfig:
    """The config of one stage, as its pods read it from their ConfigMap."""
    rl = None
    if stage.rl is not None:
        rl = RLStageConfig(
            algorithm=stage.rl.algorithm,
            rewards=stage.rl.rewards,
            rollout_urls=[f"http://{worker_name(run, stage, 'rollout')}:{WORKER_PORT}"],
            reward_urls=[f"http://{worker_name(run, stage, 'reward')}:{WORKER_PORT}"],
            # One Service URL per group: split each step into as many requests as there are replicas.
            rollout_requests_per_step=stage.rl.rollout.replicas,
            rollout_backend=stage.rl.rollout.backend,
            reward_requests_per_step=stage.rl.reward.replicas,
        )
    extra = {"evaluation": evaluation_settings(spec, stage)} if stage.type == "eval" else {}
    return StageConfig(
        run=run.name,
        run_uid=run.uid,
        stage=stage.name,
        type=stage.type,
        model=ModelSource(base=stage_input_model(spec, stage), trainable=stage.effective_trainable(),
                          vision_encoders=spec.model.vision_encoders),
        storage=StorageConfig(uri=spec.storage.uri, endpoint=spec.storage.endpoint, region=spec.storage.region),
        output_uri=stage_output_uri(spec, stage),
        checkpoint_uri=stage_checkpoint_uri(spec, stage),
        datasets=stage.datasets,
        hyperparameters=stage.hyperparameters,
        strategy=stage.strategy,
        checkpoint=stage.checkpoint,
        rl=rl,
        benchmarks=[BenchmarkSpec.model_validate(b.model_dump()) for b in stage.benchmarks],
        **extra,
    )


def _meta(run: RunRef, name: str, stage: api.Stage | None = None, role: str | None = None, **extra_labels) -> dict:
    labels = {LABEL_RUN: run.name}
    if stage is not None:
        labels[LABEL_STAGE] = stage.name
    if role is not None:
        labels[LABEL_ROLE] = role
    labels.update({k: str(v) for k, v in extra_labels.items()})
    return {"name": name, "namespace": run.namespace, "labels": labels, "ownerReferences": [run.owner_reference()]}


def build_config_map(run: RunRef, spec: api.MedMOTrainingSpec, stage: api.Stage) -> dict:
    config = build_stage_config(run, spec, stage)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(run, config_map_name(run, stage), stage),
        "data": {CONFIG_FILE: yaml.safe_dump(config.to_wire(), sort_keys=False)},
    }


def build_token_secret(run: RunRef, endpoints: OperatorEndpoints) -> dict:
    """The run's progress token, mounted into its pods (never written to status or logs)."""
    meta = _meta(run, token_secret_name(run))
    meta["labels"][LABEL_TOKEN] = "true"
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": "Opaque",
        "stringData": {TOKEN_KEY: progress_token(run, endpoints.token_key)},
    }


def build_stage_service(run: RunRef, stage: api.Stage) -> dict:
    """Headless Service giving learner pods stable names `<job>-<index>.<service>`."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(run, stage_service_name(run, stage), stage, "learner"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_RUN: run.name, LABEL_STAGE: stage.name, LABEL_ROLE: "learner"},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }


# -- pods ---------------------------------------------------------------------------------------


def _pod_spec(spec: api.MedMOTrainingSpec, container: dict, volumes: list[dict], pool: api.NodePool, gpus: int, **extra) -> dict:
    """A pod of the run: its one container with the pool's resources, as the non-root trainer user,
    no API token, placed on the pool's nodes."""
    resources = _resources(pool, gpus)
    return {
        **extra,
        "containers": [{**container, "resources": resources} if resources else container],
        "volumes": volumes,
        "securityContext": {"runAsNonRoot": True, "runAsUser": TRAINER_UID, "fsGroup": TRAINER_UID},
        "automountServiceAccountToken": False,
        **_placement(pool, spec),
    }


def _container_security_context() -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": TRAINER_UID,
        "runAsGroup": TRAINER_UID,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _storage_env(spec: api.MedMOTrainingSpec) -> list[dict]:
    """Credentials by secretKeyRef only: their values never appear in the spec, a ConfigMap or status."""
    env = []
    ref = spec.storage.secret_ref
    if ref is not None:
        for variable, key in (("AWS_ACCESS_KEY_ID", ref.access_key_id_key), ("AWS_SECRET_ACCESS_KEY", ref.secret_access_key_key)):
            env.append({"name": variable, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": key}}})
    if spec.storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": spec.storage.endpoint})
    if spec.storage.region:
        env.append({"name": "AWS_DEFAULT_REGION", "value": spec.storage.region})
    return env


def kueue_labels(spec: api.MedMOTrainingSpec) -> dict[str, str]:
    """Kueue's labels for what the run's queue admits: learner Jobs and rl worker Deployments."""
    scheduling = spec.scheduling
    if not scheduling.queue_name:
        return {}
    labels = {KUEUE_QUEUE_LABEL: scheduling.queue_name}
    if scheduling.workload_priority_class_name:
        labels[KUEUE_PRIORITY_LABEL] = scheduling.workload_priority_class_name
    return labels


def _resources(pool: api.NodePool, gpus: int) -> dict:
    resources = pool.resources or api.Resources()
    requests = {k: str(v) for k, v in resources.requests.items()}
    limits = {k: str(v) for k, v in resources.limits.items()}
    if gpus > 0:
        limits.setdefault("nvidia.com/gpu", str(gpus))
        requests.setdefault("nvidia.com/gpu", limits["nvidia.com/gpu"])
    out = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _placement(pool: api.NodePool, spec: api.MedMOTrainingSpec) -> dict:
    out: dict = {}
    if pool.node_selector:
        out["nodeSelector"] = dict(pool.node_selector)
    if pool.tolerations:
        out["tolerations"] = [t.to_wire() for t in pool.tolerations]
    if spec.scheduling.priority_class_name:
        out["priorityClassName"] = spec.scheduling.priority_class_name
    if spec.scheduling.scheduler_name:
        out["schedulerName"] = spec.scheduling.scheduler_name
    return out


def _common_volumes(run: RunRef, spec: api.MedMOTrainingSpec, stage: api.Stage) -> tuple[list[dict], list[dict]]:
    volumes, mounts = _scratch_and_storage_volumes(spec)
    volumes[:0] = [
        {"name": "config", "configMap": {"name": config_map_name(run, stage)}},
        {"name": "progress-token", "secret": {"secretName": token_secret_name(run)}},
    ]
    mounts[:0] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "progress-token", "mountPath": TOKEN_DIR, "readOnly": True},
    ]
    return volumes, mounts


def _scratch_and_storage_volumes(spec: api.MedMOTrainingSpec) -> tuple[list[dict], list[dict]]:
    """/tmp, the cache volume and file:// storage: what every pod of the run mounts."""
    cache = spec.cache.volume_source() if spec.cache else {"emptyDir": {}}
    volumes = [{"name": "tmp", "emptyDir": {}}, {"name": "cache", **cache}]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "cache", "mountPath": CACHE_DIR}]
    directory = file_storage_path(spec)
    if directory is not None:
        # file:// storage is a directory on the nodes (shared between them by the cluster's admin,
        # writable by TRAINER_UID); listed after /tmp, so a path under /tmp is mounted onto it.
        volumes.append({"name": "storage", "hostPath": {"path": directory, "type": "DirectoryOrCreate"}})
        mounts.append({"name": "storage", "mountPath": directory})
    return volumes, mounts


def file_storage_path(spec: api.MedMOTrainingSpec) -> str | None:
    """The node directory behind `file://` storage; None for object storage."""
    uri = spec.storage.uri
    return uri.removeprefix("file://").rstrip("/") or "/" if uri.startswith("file://") else None


def _cache_env() -> list[dict]:
    return [{"name": name, "value": value} for name, value in CACHE_ENV.items()]


def _hub_env(spec: api.MedMOTrainingSpec) -> list[dict]:
    """The run's hub (a mirror), for every pod: none should need it once the initializer has run,
    but any that does asks the run's hub, never huggingface.co behind the user's back."""
    return [{"name": "HF_ENDPOINT", "value": spec.model.hub_endpoint}] if spec.model.hub_endpoint else []


def _pod_failure_policy(container: str) -> dict:
    """A non-retryable exit code fails the Job at once; a pod evicted or preempted does not count."""
    return {
        "rules": [
            {"action": "FailJob", "onExitCodes": {"containerName": container, "operator": "In", "values": sorted(NON_RETRYABLE)}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]
    }


def _telemetry_env(run: RunRef, spec: api.MedMOTrainingSpec, stage: api.Stage) -> list[dict]:
    """The standard OTEL_* variables the trainer's OpenTelemetry SDK reads (medmo_trainer.telemetry):
    OTLP/HTTP to the run's endpoint, the run and stage as resource attributes, headers by secretKeyRef."""
    telemetry = spec.telemetry
    if telemetry is None:
        return []
    attributes = {"medmo.run": run.name, "medmo.namespace": run.namespace, "medmo.stage": stage.name, "medmo.stage.type": stage.type}
    env = [
        {"name": "OTEL_SERVICE_NAME", "value": "medmo-trainer"},
        {"name": "OTEL_RESOURCE_ATTRIBUTES", "value": ",".join(f"{k}={v}" for k, v in attributes.items())},
        {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": telemetry.endpoint},
        {"name": "OTEL_EXPORTER_OTLP_PROTOCOL", "value": "http/protobuf"},
        {"name": "OTEL_TRACES_EXPORTER", "value": "otlp"},
        {"name": "OTEL_METRICS_EXPORTER", "value": "otlp"},
        {"name": "OTEL_LOGS_EXPORTER", "value": "none"},
        {"name": "OTEL_TRACES_SAMPLER", "value": "parentbased_traceidratio"},
        {"name": "OTEL_TRACES_SAMPLER_ARG", "value": str(telemetry.sampling_ratio)},
    ]
    ref = telemetry.headers_secret_ref
    if ref is not None:
        env.append({"name": "OTEL_EXPORTER_OTLP_HEADERS", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return env


def _progress_env(run: RunRef, endpoints: OperatorEndpoints) -> list[dict]:
    return [
        {"name": "MEDMO_PROGRESS_URL", "value": progress_url(run, endpoints)},
        {"name": "MEDMO_PROGRESS_TOKEN_FILE", "value": f"{TOKEN_DIR}/{TOKEN_KEY}"},
    ]


def build_learner_job(
    run: RunRef, spec: api.MedMOTrainingSpec, stage: api.Stage, attempt: int, endpoints: OperatorEndpoints
) -> dict:
    """The Indexed Job of a stage's learner: one pod per node, torchrun in each, rank = index."""
    pool = spec.stage_node_pool(stage)
    gpus = pool.gpus_per_node or 0
    job_name = learner_job_name(run, stage, attempt)
    service = stage_service_name(run, stage)
    volumes, mounts = _common_volumes(run, spec, stage)
    volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    env = [
        # torchrun reads its options from PET_* variables: the node rank is the completion index.
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}},
        {"name": "PET_NNODES", "value": str(stage.nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(max(gpus, 1))},
        {"name": "PET_MASTER_ADDR", "value": f"{job_name}-0.{service}"},
        {"name": "PET_MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        {"name": "PET_RDZV_CONF", "value": f"timeout={RENDEZVOUS_TIMEOUT_S}"},
        {"name": "MEDMO_ATTEMPT", "value": str(attempt)},
        {"name": "MEDMO_TERMINATION_LOG", "value": "/dev/termination-log"},
        *_progress_env(run, endpoints),
        *_storage_env(spec),
        *_cache_env(),
        *_hub_env(spec),
        *_telemetry_env(run, spec, stage),
    ]
    labels = {LABEL_RUN: run.name, LABEL_STAGE: stage.name, LABEL_ROLE: "learner", LABEL_ATTEMPT: str(attempt)}
    gang: dict = {}
    if spec.scheduling.gang and spec.scheduling.gang_scheduler == "coscheduling":
        labels[POD_GROUP_LABEL] = gang_name(run, stage, attempt)
    elif spec.scheduling.gang:
        gang["schedulingGroup"] = {"podGroupName": gang_name(run, stage, attempt)}
    container = {
        "name": "trainer",
        "image": spec.image,
        # No command: the trainer image's entrypoint is `python -m medmo_trainer.launch` (torchrun).
        "args": ["-m", "medmo_trainer", "--config", f"{CONFIG_DIR}/{CONFIG_FILE}"],
        "env": env,
        "ports": [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}],
        "volumeMounts": mounts,
        "securityContext": _container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec = _pod_spec(spec, container, volumes, pool, gpus, restartPolicy="Never", subdomain=service, **gang)
    job_meta = _meta(run, job_name, stage, "learner", **{LABEL_ATTEMPT: attempt})
    job_meta["labels"].update(kueue_labels(spec))
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": job_meta,
        "spec": {
            "completionMode": "Indexed",
            "completions": stage.nodes,
            "parallelism": stage.nodes,
            # The operator restarts the whole stage (gang restart from the last checkpoint), so the
            # Job itself never retries a pod: one failed rank fails the attempt.
            "backoffLimit": 0,
            "podFailurePolicy": _pod_failure_policy("trainer"),
            # Kueue admits a queued Job by unsuspending it (the operator then never does).
            "suspend": bool(spec.scheduling.queue_name) or spec.run_policy.suspend,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def build_gang(run: RunRef, spec: api.MedMOTrainingSpec, stage: api.Stage, attempt: int) -> list[dict]:
    """What makes one learner attempt's pods a gang (scheduling.gang), to create before its Job.

    `workload-api`: a Workload with one gang PodGroupTemplate of minCount = nodes, and its PodGroup,
    which the attempt's pods name in `spec.schedulingGroup` (the API server admits a PodGroup only
    once its Workload exists). kube-scheduler binds none of them until all of them fit.
    `coscheduling`: scheduler-plugins' PodGroup of minMember = nodes, which the pods name by label.
    """
    if not spec.scheduling.gang:
        return []
    name = gang_name(run, stage, attempt)
    meta = lambda: _meta(run, name, stage, "learner", **{LABEL_ATTEMPT: attempt})  # noqa: E731
    if spec.scheduling.gang_scheduler == "coscheduling":
        return [{"apiVersion": COSCHEDULING_API_VERSION, "kind": "PodGroup", "metadata": meta(),
                 "spec": {"minMember": stage.nodes}}]
    policy = {"gang": {"minCount": stage.nodes}}
    workload = {
        "apiVersion": WORKLOAD_API_VERSION,
        "kind": "Workload",
        "metadata": meta(),
        "spec": {
            "controllerRef": {"apiGroup": "batch", "kind": "Job", "name": learner_job_name(run, stage, attempt)},
            "podGroupTemplates": [{"name": GANG_TEMPLATE, "schedulingPolicy": policy}],
        },
    }
    pod_group = {
        "apiVersion": WORKLOAD_API_VERSION,
        "kind": "PodGroup",
        "metadata": meta(),
        "spec": {
            "podGroupTemplateRef": {"workload": {"workloadName": name, "podGroupTemplateName": GANG_TEMPLATE}},
            "schedulingPolicy": policy,
        },
    }
    return [workload, pod_group]


def gang_kinds(spec: api.MedMOTrainingSpec) -> list[tuple[str, str]]:
    """(apiVersion, kind) of the objects `build_gang` makes per learner attempt, each named `gang_name`."""
    if not spec.scheduling.gang:
        return []
    if spec.scheduling.gang_scheduler == "coscheduling":
        return [(COSCHEDULING_API_VERSION, "PodGroup")]
    return [(WORKLOAD_API_VERSION, "PodGroup"), (WORKLOAD_API_VERSION, "Workload")]


def build_worker_deployment(run: RunRef, spec: api.MedMOTrainingSpec, stage: api.Stage, role: str) -> dict:
    """A Deployment of RL workers: `rollout` (generates with the policy) or `reward` (scores)."""
    assert stage.rl is not None, "worker groups belong to rl stages"
    group = stage.rl.rollout if role == "rollout" else stage.rl.reward
    pool = spec.stage_node_pool(stage)
    name = worker_name(run, stage, role)
    volumes, mounts = _common_volumes(run, spec, stage)
    command = ["python", "-m", f"medmo_trainer.rl.{role}_server"]
    # The run's token from its mounted Secret: a worker serves only requests carrying it.
    args = ["--config", f"{CONFIG_DIR}/{CONFIG_FILE}", "--token-file", f"{TOKEN_DIR}/{TOKEN_KEY}",
            "--host", "0.0.0.0", "--port", str(WORKER_PORT)]
    env = _storage_env(spec) if role == "rollout" else []
    env = [*env, *_cache_env(), *_hub_env(spec)]
    worker_pool = api.NodePool(
        node_selector=group.node_selector if group.node_selector is not None else (pool.node_selector if group.gpus else None),
        tolerations=group.tolerations if group.tolerations is not None else (pool.tolerations if group.gpus else None),
        resources=group.resources,
    )
    container = {
        "name": role,
        "image": (stage.rl.rollout.image if role == "rollout" else None) or spec.image,  # e.g. the vLLM image
        "command": command,
        "args": args,
        "env": env,
        "ports": [{"name": "http", "containerPort": WORKER_PORT}],
        "volumeMounts": mounts,
        "securityContext": _container_security_context(),
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": WORKER_PORT}, "periodSeconds": 2},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": WORKER_PORT}, "periodSeconds": 10, "failureThreshold": 6},
    }
    labels = {LABEL_RUN: run.name, LABEL_STAGE: stage.name, LABEL_ROLE: role}
    meta = _meta(run, name, stage, role)
    # Kueue's deployment integration admits each worker pod against the queue's quota.
    meta["labels"].update(kueue_labels(spec))
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": group.replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": _pod_spec(spec, container, volumes, worker_pool, group.gpus),
            },
        },
    }


def build_model_initializer_job(run: RunRef, spec: api.MedMOTrainingSpec) -> dict:
    """The Job that downloads a hub model into the run's storage before the first stage (Kubeflow
    Trainer's model initializer). Its token, if any, comes by secretKeyRef and reaches no other pod.
    Retryable failures (the hub or storage unreachable) are retried by the Job controller, with its
    backoff, up to the run's backoffLimit; a model refused (401/403) or missing (404) fails it at once."""
    model = spec.model
    args = ["--model", model.base, "--to", base_model_uri(spec)]
    if model.revision:
        args += ["--revision", model.revision]
    env = [
        {"name": "MEDMO_TERMINATION_LOG", "value": "/dev/termination-log"},
        *_storage_env(spec),
        *_cache_env(),
        *_hub_env(spec),
    ]
    if model.token_secret_ref is not None:
        ref = model.token_secret_ref
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    volumes, mounts = _scratch_and_storage_volumes(spec)
    container = {
        "name": "initializer",
        "image": spec.image,
        "command": ["python", "-m", "medmo_trainer.fetch"],
        "args": args,
        "env": env,
        "volumeMounts": mounts,
        "securityContext": _container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    # Where the run's pods go (file:// storage is a directory on those nodes), without their GPUs.
    pool = api.NodePool(node_selector=spec.node_pool.node_selector, tolerations=spec.node_pool.tolerations)
    labels = {LABEL_RUN: run.name, LABEL_ROLE: MODEL_INITIALIZER}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(run, model_initializer_job_name(run), role=MODEL_INITIALIZER),
        "spec": {
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": spec.run_policy.backoff_limit,
            "podFailurePolicy": _pod_failure_policy("initializer"),
            "suspend": spec.run_policy.suspend,
            "template": {"metadata": {"labels": labels}, "spec": _pod_spec(spec, container, volumes, pool, 0, restartPolicy="Never")},
        },
    }


def build_worker_service(run: RunRef, stage: api.Stage, role: str) -> dict:
    """Headless, so the learner resolves every replica and retries on another when one fails."""
    name = worker_name(run, stage, role)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(run, name, stage, role),
        "spec": {
            "clusterIP": "None",
            "selector": {LABEL_RUN: run.name, LABEL_STAGE: stage.name, LABEL_ROLE: role},
            "ports": [{"name": "http", "port": WORKER_PORT, "targetPort": WORKER_PORT}],
        },
    }


def build_worker_network_policy(run: RunRef, stage: api.Stage) -> dict:
    """Only pods of the run (its learner, its other workers) reach an rl stage's workers' port.

    The pods' own kubelet still reaches them for probes (network plugins let a node's traffic in);
    the workers also check the run's token, so the policy is a second wall, not the only one. The
    test control plane's kubelet does not enforce NetworkPolicies: its tests check that the API server
    accepts this object and what it selects, not the traffic it stops.
    """
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(run, worker_network_policy_name(run, stage), stage),
        "spec": {
            "podSelector": {
                "matchLabels": {LABEL_RUN: run.name, LABEL_STAGE: stage.name},
                "matchExpressions": [{"key": LABEL_ROLE, "operator": "In", "values": list(WORKER_ROLES)}],
            },
            "policyTypes": ["Ingress"],
            # A podSelector without a namespaceSelector means pods of the policy's (the run's) namespace.
            "ingress": [{"from": [{"podSelector": {"matchLabels": {LABEL_RUN: run.name}}}],
                         "ports": [{"protocol": "TCP", "port": WORKER_PORT}]}],
        },
    }


def build_stage_children(
    run: RunRef, spec: api.MedMOTrainingSpec, stage: api.Stage, attempt: int, endpoints: OperatorEndpoints
) -> list[dict]:
    """Every object one attempt of a stage needs, in the order to create them."""
    children = [build_token_secret(run, endpoints), build_config_map(run, spec, stage), build_stage_service(run, stage)]
    if stage.type == "rl":
        children.append(build_worker_network_policy(run, stage))
        for role in WORKER_ROLES:
            children += [build_worker_service(run, stage, role), build_worker_deployment(run, spec, stage, role)]
    children += build_gang(run, spec, stage, attempt)
    children.append(build_learner_job(run, spec, stage, attempt, endpoints))
    return children
