"""The MedMOTraining custom resource: pydantic models of its spec and status.

These models are the one source of truth: `medmo_operator.crd` generates the CRD's OpenAPI schema
and CEL rules from them, the operator and `medmo run` parse resources with them, and the stage
configs that pods receive are rendered from them. Every rule the API server enforces through CEL
is mirrored by a validator here, so a resource is rejected the same way with or without a cluster.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from medmo_trainer.config import (
    ALL_MODULE_GROUPS,
    DNS_LABEL,
    BenchmarkSpec,
    CheckpointPolicy,
    ConfigModel,
    DatasetSpec,
    Hyperparameters,
    RewardWeights,
    RLAlgorithm,
    RolloutBackendName,
    StageType,
    Strategy,
    TrainableGroup,
    VisionEncoderSpec,
    is_hub_model,
)

GROUP = "medmo.io"
VERSION = "v1alpha1"
KIND = "MedMOTraining"
PLURAL = "medmotrainings"
SINGULAR = "medmotraining"
SHORT_NAMES = ["mmt"]
CATEGORIES = ["medmo"]
API_VERSION = f"{GROUP}/{VERSION}"

MAX_RUN_NAME = 36
"""Child names are `<run>-<stage>-<attempt>-<index>` and must stay within 63 characters."""
MAX_STAGES = 16
MAX_STAGE_NAME = 20
MAX_VISION_ENCODERS = 8
STORAGE_SCHEMES = ("s3://", "gs://", "az://", "file://")
HUB_ID = r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?"
"""A Hugging Face Hub repository id: `name` or `org/name`."""

Quantity = Annotated[int | str, Field(json_schema_extra={"x-kubernetes-int-or-string": True})]
"""A Kubernetes resource quantity: `4`, `500m`, `64Gi`."""


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One `x-kubernetes-validations` entry."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    """Pydantic `json_schema_extra` carrying CEL rules into the generated CRD."""
    return {"x-kubernetes-validations": list(rules)}


class Resources(ConfigModel):
    """Container resource requests and limits, as in a Pod spec."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    """Minimum resources, e.g. `{cpu: 16, memory: 200Gi}`."""
    limits: dict[str, Quantity] = Field(default_factory=dict)
    """Maximum resources; `nvidia.com/gpu` is set from gpusPerNode when absent."""


class Toleration(ConfigModel):
    """A Pod toleration, so stages can run on tainted GPU nodes."""

    key: str | None = None
    """Taint key to tolerate; empty with operator Exists tolerates everything."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """`Equal` matches key and value, `Exists` matches the key alone."""
    value: str | None = None
    """Taint value, with operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches all effects."""
    toleration_seconds: Annotated[int, Field(ge=0)] | None = None
    """How long a NoExecute taint is tolerated before eviction."""


class NodePool(ConfigModel):
    """Where and how big the pods of a stage are. Stage values override the run's defaults."""

    node_selector: dict[str, str] | None = None
    """Labels a node must have, e.g. `{cloud.google.com/gke-accelerator: nvidia-h100-80gb}`."""
    tolerations: list[Toleration] | None = None
    """Taints the pods tolerate."""
    gpus_per_node: Annotated[int, Field(ge=0, le=16)] | None = None
    """GPUs each pod requests (`nvidia.com/gpu`) and torchrun processes per pod; 0 runs on CPU."""
    resources: Resources | None = None
    """Requests and limits of each pod's trainer container."""

    def merged_over(self, base: NodePool) -> NodePool:
        """This pool's set fields over `base`'s."""
        data = base.model_dump(exclude_none=True)
        data.update(self.model_dump(exclude_none=True))
        return NodePool.model_validate(data)


DEFAULT_GPUS_PER_NODE = 8


class SecretReference(ConfigModel):
    """A Secret in the run's namespace holding object-storage credentials."""

    name: Annotated[str, Field(min_length=1, max_length=253)]
    """Name of the Secret."""
    access_key_id_key: Annotated[str, Field(min_length=1)] = "AWS_ACCESS_KEY_ID"
    """Key of the access key id in the Secret."""
    secret_access_key_key: Annotated[str, Field(min_length=1)] = "AWS_SECRET_ACCESS_KEY"
    """Key of the secret access key in the Secret."""


class StorageSpec(ConfigModel):
    """Where checkpoints and exported models go."""

    model_config = ConfigModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "self.uri.startsWith('s3://') || self.uri.startsWith('gs://') || "
                "self.uri.startsWith('az://') || self.uri.startsWith('file://')",
                "storage.uri must start with s3://, gs://, az:// or file://",
                ".uri",
            ),
            cel(
                "!self.uri.startsWith('s3://') || has(self.secretRef)",
                "storage.secretRef is required for s3:// storage (credentials are read from a Secret)",
                ".secretRef",
            ),
        )
    }

    uri: Annotated[str, Field(min_length=6, max_length=1024)]
    """Root URI of the run, e.g. `s3://medmo/runs/medmo-8b`; stages write under `<uri>/<stage>/`."""
    secret_ref: SecretReference | None = None
    """Secret with the storage credentials; never put credentials in the resource itself."""
    endpoint: Annotated[str, Field(pattern=r"^https?://")] | None = None
    """S3 endpoint URL for S3-compatible servers (MinIO, SeaweedFS); unset for AWS."""
    region: str | None = None
    """S3 region, when the server needs one."""

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, uri: str) -> str:
        if not uri.startswith(STORAGE_SCHEMES):
            raise ValueError(f"storage.uri must start with one of {', '.join(STORAGE_SCHEMES)}, got {uri!r}")
        return uri

    @model_validator(mode="after")
    def _s3_needs_secret(self) -> StorageSpec:
        if self.uri.startswith("s3://") and self.secret_ref is None:
            raise ValueError("storage.secretRef is required for s3:// storage (credentials are read from a Secret)")
        return self


class PersistentVolumeClaimCache(ConfigModel):
    """A PersistentVolumeClaim in the run's namespace (ReadWriteMany when stages span nodes)."""

    claim_name: Annotated[str, Field(min_length=1, max_length=253)]
    """Name of the claim."""


class HostPathCache(ConfigModel):
    """A directory on each node (writable by the trainer's uid, 1000)."""

    path: Annotated[str, Field(min_length=2, max_length=1024, pattern=r"^/")]
    """Absolute path on the node."""


class EmptyDirCache(ConfigModel):
    """A fresh directory per pod, gone with the pod."""

    size_limit: Quantity | None = None
    """Most the pod may write to it, e.g. `50Gi`."""


class CacheSpec(ConfigModel):
    """The volume each pod keeps its caches on: hub downloads, tokenizers, synthetic data, compiled
    kernels (DeepSpeed, Triton), matplotlib and XDG caches. Pods have a read-only root filesystem,
    so everything they write outside storage goes here. Set exactly one source."""

    model_config = ConfigModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "(has(self.persistentVolumeClaim) ? 1 : 0) + (has(self.hostPath) ? 1 : 0) + (has(self.emptyDir) ? 1 : 0) == 1",
                "cache: set exactly one of persistentVolumeClaim, hostPath, emptyDir",
            ),
        )
    }

    persistent_volume_claim: PersistentVolumeClaimCache | None = None
    """A claim shared by the run's pods, so downloads and compiled kernels are made once."""
    host_path: HostPathCache | None = None
    """A directory on the node, kept between runs."""
    empty_dir: EmptyDirCache | None = None
    """A fresh directory per pod (the default when `cache` is unset)."""

    @model_validator(mode="after")
    def _one_source(self) -> CacheSpec:
        sources = [self.persistent_volume_claim, self.host_path, self.empty_dir]
        if sum(source is not None for source in sources) != 1:
            raise ValueError("cache: set exactly one of persistentVolumeClaim, hostPath, emptyDir")
        return self

    def volume_source(self) -> dict:
        """The pod volume source, as the Kubernetes API takes it."""
        return self.to_wire()


class SecretKeyReference(ConfigModel):
    """One key of a Secret in the run's namespace (as a container's `secretKeyRef`)."""

    name: Annotated[str, Field(min_length=1, max_length=253)]
    """Name of the Secret."""
    key: Annotated[str, Field(min_length=1, max_length=253)] = "HF_TOKEN"
    """Key of the value in the Secret."""


HUB_ONLY_FIELDS = ("revision", "tokenSecretRef", "hubEndpoint")
"""ModelSpec fields that only a Hugging Face Hub id in `base` uses."""
CEL_NOT_HUB_ID = ("self.base.startsWith('preset:') || self.base.startsWith('/') || self.base.startsWith('.') "
                  "|| self.base.contains('://')")
"""`medmo_trainer.config.is_hub_model`, negated, in CEL."""


class HeadersSecretReference(ConfigModel):
    """A key of a Secret in the run's namespace holding the OTLP exporter's headers."""

    name: Annotated[str, Field(min_length=1, max_length=253)]
    """Name of the Secret."""
    key: Annotated[str, Field(min_length=1, max_length=253)] = "headers"
    """Key whose value is the headers in OTLP's `name=value,name2=value2` form (values
    percent-encoded), e.g. `authorization=Bearer%20<token>`."""


class TelemetrySpec(ConfigModel):
    """Where the learner pods send OpenTelemetry traces (one per stage) and metrics, over OTLP/HTTP."""

    endpoint: Annotated[str, Field(min_length=8, max_length=1024, pattern=r"^https?://")]
    """Base URL of an OTLP/HTTP receiver (an OpenTelemetry Collector), e.g.
    `http://otel-collector.observability:4318`; pods post to `/v1/traces` and `/v1/metrics` under it."""
    headers_secret_ref: HeadersSecretReference | None = None
    """Headers the exporter sends (a collector's credentials), passed to the pods by secretKeyRef:
    their values never appear in the resource, its status or the operator's logs."""
    sampling_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    """Fraction of stage traces kept (a parent-based trace-id ratio sampler); 1 keeps all."""


class ModelSpec(ConfigModel):
    """The base model the first stage starts from. A Hugging Face Hub id is downloaded once, by the
    run's model initializer Job, into `<storage.uri>/base_model/`, and every pod loads it from there."""

    model_config = ConfigModel.model_config | {
        "json_schema_extra": validations(
            cel(
                f"{CEL_NOT_HUB_ID} || self.base.matches('^{HUB_ID}$')",
                "model.base must be a Hugging Face Hub id (org/name), an s3:// or file:// URI, a path, or preset:<name>",
                ".base",
            ),
            cel(
                f"!({CEL_NOT_HUB_ID}) || (!has(self.revision) && !has(self.tokenSecretRef) && !has(self.hubEndpoint))",
                "model.revision, tokenSecretRef and hubEndpoint apply only to a Hugging Face Hub id in model.base",
            ),
            cel(
                "!has(self.visionEncoders) || self.visionEncoders.all(e, self.visionEncoders.exists_one(f, f.name == e.name))",
                "model.visionEncoders names must be unique",
                ".visionEncoders",
            ),
        )
    }

    base: Annotated[str, Field(min_length=1, max_length=1024)]
    """Hugging Face Hub id (`Qwen/Qwen3-VL-8B-Instruct`), `s3://` or `file://` URI of a Hugging Face
    model folder, or a built-in tiny preset (`preset:tiny-qwen3-vl`)."""
    revision: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    """Hub branch, tag or commit to download; default `main`."""
    token_secret_ref: SecretKeyReference | None = None
    """Secret key holding a Hugging Face token, for gated or private models; only the initializer
    pod receives it (as HF_TOKEN), and it never appears in status, events or logs."""
    hub_endpoint: Annotated[str, Field(max_length=1024, pattern=r"^https?://")] | None = None
    """Hub endpoint (a mirror or a private hub); pods get it as HF_ENDPOINT. Unset: huggingface.co."""
    vision_encoders: Annotated[list[VisionEncoderSpec], Field(max_length=MAX_VISION_ENCODERS)] = Field(default_factory=list)
    """Extra vision encoders beside the base model's own tower (a Qwen3-VL base), each with its own MLP
    projector into the language model; each image's tokens are the base tower's, then each extra encoder's
    in this order. Their groups in `trainable` are `encoder:<name>` and `projector:<name>`."""

    @field_validator("base")
    @classmethod
    def _known_form(cls, base: str) -> str:
        if is_hub_model(base) and not re.fullmatch(HUB_ID, base):
            raise ValueError(
                f"model.base {base!r} must be a Hugging Face Hub id (org/name), an s3:// or file:// URI, a path, or preset:<name>"
            )
        return base

    @model_validator(mode="after")
    def _encoders_named_once(self) -> ModelSpec:
        names = [encoder.name for encoder in self.vision_encoders]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"model.visionEncoders names must be unique, repeated: {', '.join(repeated)}")
        return self

    @model_validator(mode="after")
    def _hub_fields_need_a_hub_id(self) -> ModelSpec:
        if not is_hub_model(self.base):
            given = [name for name, value in zip(HUB_ONLY_FIELDS, (self.revision, self.token_secret_ref, self.hub_endpoint),
                                                 strict=True) if value is not None]
            if given:
                raise ValueError(f"model.{', '.join(given)}: apply only to a Hugging Face Hub id in model.base, not {self.base!r}")
        return self

    @property
    def from_hub(self) -> bool:
        """Whether the base model is downloaded from the hub by the run's model initializer."""
        return is_hub_model(self.base)


class WorkerGroup(ConfigModel):
    """A separately scaled group of RL workers (a Deployment behind a Service)."""

    replicas: Annotated[int, Field(ge=1, le=256)] = 1
    """Number of worker pods."""
    gpus: Annotated[int, Field(ge=0, le=16)] = 0
    """GPUs per worker pod."""
    resources: Resources | None = None
    """Requests and limits of each worker pod."""
    node_selector: dict[str, str] | None = None
    """Labels a worker's node must have; defaults to the run's nodePool for GPU workers."""
    tolerations: list[Toleration] | None = None
    """Taints the worker pods tolerate."""


VLLM_NEEDS_IMAGE = ("rl.rollout.backend vllm needs rl.rollout.image: an image built from images/rollout-vllm/ "
                    "(vLLM is not in the trainer image)")


VLLM_NEEDS_ONE_TOWER = ("stages[].rl.rollout.backend vllm cannot serve a model with model.visionEncoders "
                        "(vLLM knows no such architecture); use the transformers backend")


class RolloutWorkerGroup(WorkerGroup):
    """The rollout workers: a worker group that also chooses how it generates."""

    model_config = WorkerGroup.model_config | {
        "json_schema_extra": validations(
            cel(
                "!has(self.backend) || self.backend != 'vllm' || has(self.image)",
                VLLM_NEEDS_IMAGE,
                ".image",
            ),
        )
    }

    backend: RolloutBackendName = "transformers"
    """`transformers` (`model.generate` in the trainer image, bf16 on GPU) or `vllm` (a vLLM engine over
    the worker's GPUs, with in-place updates of the trained weights; needs `image`)."""
    image: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    """Image of the rollout pods; default `spec.image`."""

    @model_validator(mode="after")
    def _vllm_needs_its_image(self) -> RolloutWorkerGroup:
        if self.backend == "vllm" and self.image is None:
            raise ValueError(VLLM_NEEDS_IMAGE)
        return self


class RLSpec(ConfigModel):
    """What an `rl` stage adds: its worker groups, algorithm and reward weights."""

    model_config = ConfigModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "!has(self.algorithm) || !has(self.algorithm.epsilonLow) || !has(self.algorithm.epsilonHigh) "
                "|| self.algorithm.epsilonHigh >= self.algorithm.epsilonLow",
                "rl.algorithm.epsilonHigh must be at least epsilonLow (clip-higher)",
                ".algorithm",
            ),
        )
    }

    rollout: RolloutWorkerGroup
    """Workers that generate completions with the current policy (GPU by default in real runs)."""
    reward: WorkerGroup
    """Workers that score completions with the verifiable rewards (CPU)."""
    algorithm: RLAlgorithm = Field(default_factory=RLAlgorithm)
    """GRPO settings (group size, clip range, KL weight, lengths)."""
    rewards: RewardWeights = Field(default_factory=RewardWeights)
    """Weights of the reward components."""

    @model_validator(mode="after")
    def _clip_higher(self) -> RLSpec:
        if self.algorithm.epsilon_high < self.algorithm.epsilon_low:
            raise ValueError("rl.algorithm.epsilonHigh must be at least epsilonLow (clip-higher)")
        return self


class Stage(ConfigModel):
    """One step of the recipe. Stages run in order; each starts from the previous one's model."""

    model_config = ConfigModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "self.type == 'eval' || (has(self.datasets) && size(self.datasets) > 0)",
                "stages of type pretrain, sft and rl need at least one dataset in `datasets`",
                ".datasets",
            ),
            cel("self.type != 'rl' || has(self.rl)", "a stage of type rl needs an `rl` section with rollout and reward worker groups", ".rl"),
            cel("self.type == 'rl' || !has(self.rl)", "only stages of type rl may have an `rl` section", ".rl"),
            cel(
                "self.type != 'eval' || (has(self.benchmarks) && size(self.benchmarks) > 0)",
                "a stage of type eval needs at least one entry in `benchmarks`",
                ".benchmarks",
            ),
            cel(
                "!has(self.strategy) || !has(self.strategy.offload) || self.strategy.offload == 'none' "
                "|| !has(self.strategy.name) || self.strategy.name == 'deepspeed'",
                "strategy.offload is only supported with strategy.name deepspeed",
                ".strategy",
            ),
        )
    }

    name: Annotated[str, Field(min_length=1, max_length=MAX_STAGE_NAME, pattern=DNS_LABEL)]
    """Unique name of the stage (a DNS label); children and storage paths are named after it."""
    type: StageType
    """`pretrain` (cross-modal alignment), `sft`, `rl` (verifiable rewards) or `eval`."""
    datasets: Annotated[list[DatasetSpec], Field(max_length=32)] = Field(default_factory=list)
    """Weighted mixture of training datasets (RL: prompts with verifiable answers)."""
    trainable: Annotated[list[TrainableGroup], Field(max_length=3 + 2 * MAX_VISION_ENCODERS)] | None = None
    """Module groups that train: `vision` (every vision encoder), `projector` (every projector),
    `language`, and for each of `model.visionEncoders` `encoder:<name>` and `projector:<name>`.
    Default: projector for pretrain, all for sft and rl."""
    init_from: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    """Model to start from: the name of an earlier stage or a model URI. Default: the previous
    training stage's exported model (the run's base model for the first stage)."""
    nodes: Annotated[int, Field(ge=1, le=1024)] = 1
    """Pods (one per node) of the learner; each runs gpusPerNode torchrun processes."""
    node_pool: NodePool | None = None
    """Overrides of the run's nodePool for this stage."""
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    """Optimisation settings."""
    strategy: Strategy = Field(default_factory=Strategy)
    """Parallelism: ddp, fsdp or deepspeed (ZeRO stage, offload)."""
    checkpoint: CheckpointPolicy = Field(default_factory=CheckpointPolicy)
    """Checkpoint cadence and retention."""
    rl: RLSpec | None = None
    """Worker groups, algorithm and rewards of an `rl` stage."""
    benchmarks: Annotated[list[BenchmarkSpec], Field(max_length=32)] = Field(default_factory=list)
    """Held-out benchmarks an `eval` stage scores."""

    @model_validator(mode="after")
    def _check_type_sections(self) -> Stage:
        where = f"stages[{self.name}]"
        if self.type != "eval" and not self.datasets:
            raise ValueError(f"{where}.datasets: stages of type {self.type} need at least one dataset")
        if self.type == "rl" and self.rl is None:
            raise ValueError(f"{where}.rl: a stage of type rl needs an `rl` section with rollout and reward worker groups")
        if self.type != "rl" and self.rl is not None:
            raise ValueError(f"{where}.rl: only stages of type rl may have an `rl` section")
        if self.type == "eval" and not self.benchmarks:
            raise ValueError(f"{where}.benchmarks: a stage of type eval needs at least one benchmark")
        if self.strategy.offload != "none" and self.strategy.name != "deepspeed":
            raise ValueError(f"{where}.strategy.offload: offload is only supported with strategy.name deepspeed")
        return self

    def effective_trainable(self) -> list[str]:
        """The module groups that train, with the per-type default applied."""
        if self.trainable is not None:
            return list(self.trainable)
        if self.type == "pretrain":
            return ["projector"]
        if self.type == "eval":
            return []
        return list(ALL_MODULE_GROUPS)

    @property
    def trains(self) -> bool:
        """Whether the stage produces a new model (every type but eval)."""
        return self.type != "eval"


class RunPolicy(ConfigModel):
    """Failure, time and clean-up policy of the whole run (as in Kubeflow Trainer)."""

    model_config = ConfigModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "!has(self.restartBackoffSeconds) || !has(self.maxRestartBackoffSeconds) "
                "|| self.maxRestartBackoffSeconds >= self.restartBackoffSeconds",
                "runPolicy.maxRestartBackoffSeconds must be at least restartBackoffSeconds",
                ".maxRestartBackoffSeconds",
            ),
        )
    }

    backoff_limit: Annotated[int, Field(ge=0, le=100)] = 3
    """Restarts of a stage (from its last checkpoint) before the run fails."""
    restart_backoff_seconds: Annotated[int, Field(ge=0, le=3600)] = 10
    """Wait before a stage's first restart; each further restart waits twice as long as the one
    before (as the Job controller backs off), up to maxRestartBackoffSeconds. 0 restarts at once."""
    max_restart_backoff_seconds: Annotated[int, Field(ge=0, le=86400)] = 300
    """The longest wait before a restart."""
    active_deadline_seconds: Annotated[int, Field(ge=1)] | None = None
    """Wall-clock limit of the run from its start; past it the run fails with DeadlineExceeded."""
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] | None = None
    """Delete the resource this long after it succeeds or fails; unset keeps it."""
    clean_pod_policy: Literal["None", "Running", "All"] = "Running"
    """Pods deleted when a stage finishes: `Running` ones (default), `All`, or `None`."""
    suspend: bool = False
    """Stop the pods and keep the checkpoints; setting it back to false resumes from them."""

    @model_validator(mode="after")
    def _backoff_cap_above_base(self) -> RunPolicy:
        if self.max_restart_backoff_seconds < self.restart_backoff_seconds:
            raise ValueError(
                f"runPolicy.maxRestartBackoffSeconds ({self.max_restart_backoff_seconds}) must be at least "
                f"restartBackoffSeconds ({self.restart_backoff_seconds})"
            )
        return self


GangScheduler = Literal["workload-api", "coscheduling"]
"""The gang schedulers a run can ask for (`scheduling.gangScheduler`)."""


class Scheduling(ConfigModel):
    """How the run's pods are queued and placed."""

    model_config = ConfigModel.model_config | {
        "json_schema_extra": validations(
            cel("!has(self.workloadPriorityClassName) || has(self.queueName)",
                "scheduling.workloadPriorityClassName is a Kueue priority: it needs scheduling.queueName",
                ".workloadPriorityClassName"),
        )
    }

    queue_name: Annotated[str, Field(min_length=1, max_length=63)] | None = None
    """Kueue LocalQueue in the run's namespace. Learner Jobs are created suspended with its label and
    Kueue admits them (the operator never unsuspends them itself); an rl stage's rollout and reward
    Deployments carry it too, so their pods count against the same quota (Kueue's deployment
    integration)."""
    priority_class_name: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    """PriorityClass of every pod. Kueue also orders and preempts queued stages by it, unless
    workloadPriorityClassName is set."""
    workload_priority_class_name: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    """Kueue WorkloadPriorityClass of the run's queued stages and workers: their priority in the
    queue and for preemption, without changing the pods' priority (needs queueName)."""
    gang: bool = False
    """Schedule each learner attempt's pods all or none (a multi-node stage never holds some nodes'
    GPUs while waiting for the rest), with the gang scheduler that gangScheduler names."""
    gang_scheduler: GangScheduler = "workload-api"
    """Which gang scheduler places a gang: `workload-api`, kube-scheduler's own (Kubernetes 1.36+,
    feature gates GenericWorkload and GangScheduling, API scheduling.k8s.io/v1alpha2: a Workload and a
    PodGroup per attempt, minCount = nodes), or `coscheduling`, the scheduler-plugins Coscheduling
    plugin (a scheduling.x-k8s.io/v1alpha1 PodGroup, minMember = nodes, pods labelled with it)."""
    scheduler_name: Annotated[str, Field(min_length=1, max_length=63)] | None = None
    """The scheduler of every pod of the run, e.g. scheduler-plugins' second scheduler for
    `coscheduling`; unset: the cluster's default scheduler."""

    @model_validator(mode="after")
    def _workload_priority_needs_a_queue(self) -> Scheduling:
        if self.workload_priority_class_name and not self.queue_name:
            raise ValueError("scheduling.workloadPriorityClassName is a Kueue priority: it needs scheduling.queueName")
        return self


class MedMOTrainingSpec(ConfigModel):
    """What to train and how: the recipe's stages, the node pool, storage and policies."""

    model_config = ConfigModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "self.stages.all(s, self.stages.exists_one(t, t.name == s.name))",
                "stage names must be unique",
                ".stages",
            ),
            cel("size(self.stages) == 0 || self.stages[0].type != 'eval'", "the first stage cannot be of type eval: nothing has been trained yet", ".stages"),
            cel(
                "self.stages.all(s, !has(s.trainable) || s.trainable.all(g, !g.contains(':') || "
                "(has(self.model.visionEncoders) && self.model.visionEncoders.exists(e, g.endsWith(':' + e.name)))))",
                "stages[].trainable: encoder:<name> and projector:<name> must name one of model.visionEncoders",
                ".stages",
            ),
            cel(
                "!has(self.model.visionEncoders) || size(self.model.visionEncoders) == 0 || self.stages.all(s, "
                "!has(s.rl) || !has(s.rl.rollout.backend) || s.rl.rollout.backend != 'vllm')",
                VLLM_NEEDS_ONE_TOWER,
                ".stages",
            ),
        )
    }

    image: Annotated[str, Field(min_length=1, max_length=512)] = "ghcr.io/medmo/trainer:0.1.0"
    """Trainer container image run by every pod."""
    model: ModelSpec
    """Base model of the first stage."""
    storage: StorageSpec
    """Object storage for checkpoints and exported models."""
    node_pool: NodePool = Field(default_factory=NodePool)
    """Defaults for where stages run; each stage may override any field."""
    stages: Annotated[list[Stage], Field(min_length=1, max_length=MAX_STAGES)]
    """The recipe, in order."""
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    """Restarts, deadline, clean-up and suspension."""
    scheduling: Scheduling = Field(default_factory=Scheduling)
    """Queueing, priority and gang scheduling."""
    cache: CacheSpec | None = None
    """The volume pods keep caches on (mounted at /var/cache/medmo); unset: an emptyDir per pod."""
    telemetry: TelemetrySpec | None = None
    """OpenTelemetry export of the learners' traces and metrics; unset: nothing is exported."""

    @model_validator(mode="after")
    def _check_recipe(self) -> MedMOTrainingSpec:
        names = [stage.name for stage in self.stages]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"stages: stage names must be unique, repeated: {', '.join(duplicates)}")
        if self.stages[0].type == "eval":
            raise ValueError("stages[0].type: the first stage cannot be of type eval: nothing has been trained yet")
        encoders = {encoder.name for encoder in self.model.vision_encoders}
        for stage in self.stages:
            unknown = [g for g in stage.trainable or [] if ":" in g and g.split(":", 1)[1] not in encoders]
            if unknown:
                raise ValueError(f"stages[{stage.name}].trainable: {', '.join(unknown)} name no encoder of "
                                 f"model.visionEncoders ({', '.join(sorted(encoders)) or 'none'})")
            if encoders and stage.rl is not None and stage.rl.rollout.backend == "vllm":
                raise ValueError(VLLM_NEEDS_ONE_TOWER)
        for index, stage in enumerate(self.stages):
            if stage.init_from and "://" not in stage.init_from and ":" not in stage.init_from:
                earlier = [s.name for s in self.stages[:index] if s.trains]
                if stage.init_from not in earlier:
                    raise ValueError(
                        f"stages[{index}].initFrom: {stage.init_from!r} is not an earlier training stage "
                        f"(earlier: {', '.join(earlier) or 'none'}) nor a model URI"
                    )
        return self

    def stage_node_pool(self, stage: Stage) -> NodePool:
        """The run's node pool with the stage's overrides applied and defaults filled in."""
        pool = stage.node_pool.merged_over(self.node_pool) if stage.node_pool else self.node_pool
        if pool.gpus_per_node is None:
            pool = pool.model_copy(update={"gpus_per_node": DEFAULT_GPUS_PER_NODE})
        return pool


class Phase(str, Enum):
    """Lifecycle phase of a run and of each stage."""

    PENDING = "Pending"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def finished(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)


class ConditionType(str, Enum):
    """Condition types on the resource; `kubectl wait --for=condition=<type>` works on each."""

    CREATED = "Created"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    WAITING_FOR_RESOURCES = "WaitingForResources"
    ADMITTED = "Admitted"
    """With scheduling.queueName: whether Kueue admits the current stage (reason Queued, Preempted or Admitted)."""


class Condition(BaseModel):
    """A Kubernetes-style condition (field names are already camelCase)."""

    model_config = {"extra": "forbid", "use_attribute_docstrings": True}

    type: Annotated[str, Field(min_length=1, max_length=64)]
    """Condition type, one of ConditionType."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: Annotated[str, Field(max_length=128)] = ""
    """CamelCase machine-readable reason of the last transition."""
    message: Annotated[str, Field(max_length=4096)] = ""
    """Human-readable explanation."""
    lastTransitionTime: datetime | None = None  # noqa: N815 (Kubernetes field name)
    """When the status last changed."""
    observedGeneration: int | None = None  # noqa: N815
    """The spec generation the condition was computed from."""


class StageStatus(ConfigModel):
    """The record of one stage."""

    name: str
    """Stage name."""
    phase: Phase = Phase.PENDING
    """Lifecycle phase of the stage."""
    step: Annotated[int, Field(ge=0)] = 0
    """Last optimizer step the trainer reported."""
    total_steps: Annotated[int, Field(ge=0)] | None = None
    """Steps the stage will run, once known."""
    restarts: Annotated[int, Field(ge=0)] = 0
    """Gang restarts of the stage so far."""
    next_attempt_time: datetime | None = None
    """While a restart waits out its backoff: when the stage's next attempt starts."""
    last_checkpoint: str | None = None
    """URI of the last committed checkpoint."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Latest metrics the trainer reported (`medmo_trainer.progress.Progress.metrics`): loss,
    learningRate, gradNorm, tokensPerSecond, reward/<component>, eval scores."""
    counters: dict[str, int] = Field(default_factory=dict)
    """Running totals the trainer reported (`Progress.counters`): recordsRead, skippedRecords,
    skipped/<reason>, eval sample counts."""
    message: Annotated[str, Field(max_length=4096)] | None = None
    """Why the stage is in its phase (e.g. the trainer's termination message)."""
    start_time: datetime | None = None
    """When the stage first started."""
    completion_time: datetime | None = None
    """When the stage succeeded or failed."""
    output_model: str | None = None
    """URI of the model the stage exported (Hugging Face format)."""


class InitializerStatus(ConfigModel):
    """The record of an initializer Job that runs before the first stage (as a Kubeflow Trainer
    TrainJob's `jobsStatus` lists its `model-initializer`)."""

    name: str
    """`model-initializer`: downloads a Hugging Face Hub model into the run's storage."""
    phase: Phase = Phase.PENDING
    """Pending, Running, Succeeded or Failed."""
    output: str | None = None
    """Where it puts what it fetched (the model every stage then loads)."""
    message: Annotated[str, Field(max_length=4096)] | None = None
    """What it reported: what was copied, or why it failed."""
    start_time: datetime | None = None
    """When its Job was created."""
    completion_time: datetime | None = None
    """When it succeeded or failed."""


class MedMOTrainingStatus(ConfigModel):
    """What the operator observed; written only by the operator."""

    model_config = ConfigModel.model_config | {"extra": "allow"}

    phase: Phase = Phase.PENDING
    """Lifecycle phase of the run."""
    current_stage: str | None = None
    """Name of the stage running now (or last run)."""
    current_step: Annotated[int, Field(ge=0)] | None = None
    """Step of the current stage."""
    observed_generation: int | None = None
    """The spec generation this status reflects."""
    start_time: datetime | None = None
    """When the run started."""
    completion_time: datetime | None = None
    """When the run succeeded or failed."""
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Conditions of the run, one per type."""
    initializers: Annotated[list[InitializerStatus], Field(max_length=4)] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    """Steps before the first stage: the model initializer, when `model.base` is a hub id."""
    stages: Annotated[list[StageStatus], Field(max_length=MAX_STAGES)] = Field(default_factory=list)
    """One record per stage, in spec order."""
    output_model: str | None = None
    """URI of the final model, in Hugging Face format."""


class Metadata(BaseModel):
    """The part of ObjectMeta the models check (the API server owns the rest)."""

    model_config = {"extra": "allow"}

    name: Annotated[str, Field(min_length=1, max_length=MAX_RUN_NAME, pattern=DNS_LABEL)]
    namespace: str | None = None

    @field_validator("name")
    @classmethod
    def _name_starts_with_a_letter(cls, name: str) -> str:
        # The run's Services are named `<run>-<stage>`, and Kubernetes wants Service names to be
        # RFC 1035 labels: an RFC 1123 label that starts with a letter.
        if not name[0].isalpha():
            raise ValueError(f"metadata.name {name!r} must start with a letter: the run's Services are named after it")
        return name


class MedMOTraining(BaseModel):
    """A whole resource as `kubectl apply` sends it."""

    model_config = {"extra": "forbid"}

    apiVersion: Literal["medmo.io/v1alpha1"]  # noqa: N815
    kind: Literal["MedMOTraining"]
    metadata: Metadata
    spec: MedMOTrainingSpec
    status: MedMOTrainingStatus | None = None


def parse_training(obj: dict[str, Any]) -> MedMOTraining:
    """Validates a resource dict; raises pydantic.ValidationError naming the offending fields."""
    return MedMOTraining.model_validate(obj)


def format_validation_error(error: Exception) -> str:
    """A ValidationError as lines of `field.path: message`, in the wire's camelCase names."""
    from pydantic import ValidationError

    if not isinstance(error, ValidationError):
        return str(error)
    lines = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"] if not re.fullmatch(r"function-after\[.*\]", str(part)))
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {message}" if path else message)
    return "\n".join(lines)
