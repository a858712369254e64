"""The stage config a training pod receives, and the section models the operator's API reuses.

Pydantic only: the operator imports this module to render what pods receive, so nothing here may
import torch or transformers. Field names are snake_case in Python and camelCase on the wire (the
custom resource and the rendered config files), so one model serves both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

ModuleGroup = Literal["vision", "projector", "language"]
"""Trainable module groups of a vision-language model: vision tower, projector/merger, language model."""

TaskType = Literal["caption", "vqa", "report", "retrieval", "grounding"]
"""The five task types of the MedMO data schema."""

StageType = Literal["pretrain", "sft", "rl", "eval"]
StrategyName = Literal["ddp", "fsdp", "deepspeed"]
RolloutBackendName = Literal["transformers", "vllm"]
"""How rollout workers generate: `transformers` (`model.generate`, any image) or `vllm` (a vLLM engine,
the image built from images/rollout-vllm/)."""

ALL_TASKS: tuple[TaskType, ...] = ("caption", "vqa", "report", "retrieval", "grounding")
ALL_MODULE_GROUPS: tuple[ModuleGroup, ...] = ("vision", "projector", "language")

ENCODER_NAME = r"[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?"
"""Name of an extra vision encoder (`model.visionEncoders[].name`): a short DNS label."""
TRAINABLE_GROUP = rf"^(vision|projector|language|(encoder|projector):{ENCODER_NAME})$"
"""A trainable group: a module group, or one extra vision encoder (`encoder:<name>`) or its projector
(`projector:<name>`). `vision` covers every vision encoder, `projector` every projector."""
TrainableGroup = Annotated[str, Field(max_length=48, pattern=TRAINABLE_GROUP)]

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
"""An RFC 1123 label, Kubernetes' rule for most object names: lowercase letters, digits and `-`,
a letter or digit at both ends, at most 63 characters. The operator's API uses it too."""
DnsLabel = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)]


class ConfigModel(BaseModel):
    """Base of every config section: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
    )

    def to_wire(self) -> dict:
        """The camelCase dict a YAML or JSON file holds (defaults included, None dropped)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


RECORD_FIELDS = ("id", "task", "image", "images", "prompt", "answer", "answerType", "options", "findings", "boxes", "meta")
"""Keys of a JSONL record (`medmo_trainer.data.schema.Record`): what a tabular dataset's columns can fill."""


class DatasetSpec(ConfigModel):
    """One dataset of a stage's weighted mixture."""

    name: DnsLabel
    """Short name, used in progress reports and record counts."""
    uri: Annotated[str, Field(min_length=1)]
    """fsspec URI (`s3://`, `file://`, a local path) of a shard or a folder of shards: JSONL records,
    or Parquet / Arrow tables (see `columns`); read shard by shard (`medmo_trainer.data.shards`)."""
    weight: Annotated[float, Field(gt=0)] = 1.0
    """Relative sampling weight in the stage's mixture."""
    tasks: list[TaskType] = Field(default_factory=list)
    """Task types to keep from this dataset; empty keeps all five."""
    columns: dict[str, str] = Field(default_factory=dict)
    """For Parquet and Arrow datasets (as Hugging Face `datasets` saves them): record field -> column
    name, e.g. `{prompt: question, image: image}`; a column named like its field needs no entry. Without
    a task column, `tasks` names the one task of all records."""

    @model_validator(mode="after")
    def _check_columns(self) -> DatasetSpec:
        unknown = sorted(set(self.columns) - set(RECORD_FIELDS))
        if unknown:
            raise ValueError(f"columns maps {unknown}, which are not record fields; record fields are {list(RECORD_FIELDS)}")
        return self


class Hyperparameters(ConfigModel):
    """Optimisation settings of one stage. Defaults follow the MedMO paper's alignment stage."""

    learning_rate: Annotated[float, Field(gt=0, le=1)] = 1e-5
    """Peak learning rate (paper: 1e-5 pretraining, 8e-6 grounding SFT, 5e-6 instruction SFT)."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.03
    """Fraction of the stage's steps spent warming the learning rate up from zero."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    """AdamW weight decay."""
    max_steps: Annotated[int, Field(ge=1)] | None = None
    """Optimizer steps to run; when unset, `epochs` passes over the mixture decide."""
    epochs: Annotated[float, Field(gt=0)] = 1.0
    """Passes over the data when `maxSteps` is unset."""
    per_device_batch_size: Annotated[int, Field(ge=1)] = 1
    """Samples per rank per micro-step."""
    gradient_accumulation_steps: Annotated[int, Field(ge=1)] = 1
    """Micro-steps per optimizer step."""
    loss_averaging: Literal["token", "sample"] = "token"
    """How `pretrain` and `sft` average the cross-entropy of a micro-batch: `token` over all its answer
    tokens (transformers' default, and the paper's), so a record weighs as much as its answer is long;
    `sample` over each record's answer tokens first, then over records, so a one-word VQA answer
    counts as much as a 60-token list of boxes. `rl` stages have `rl.algorithm.lossAggregation`."""
    max_grad_norm: Annotated[float, Field(ge=0)] = 1.0
    """Gradient clipping threshold; 0 disables clipping."""
    image_size: Annotated[int, Field(ge=28, le=4096)] = 768
    """Images are resized, aspect ratio kept, to at most imageSize x imageSize pixels: the Qwen-VL
    processor's max_pixels, recorded in the exported model. Paper: 768 alignment, 1280 grounding."""
    max_seq_length: Annotated[int, Field(ge=16)] = 2048
    """Longest sample (prompt and answer) in tokens; a longer answer is cut and counted as truncated, a
    prompt that alone is longer is skipped. A packed row holds up to perDeviceBatchSize such samples."""
    packing: bool = True
    """Pack several samples into one padding-free sequence."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """`auto` is bf16 on GPU and fp32 on CPU."""
    seed: int = 42
    """Seed of sampling, shuffling and initialisation."""


class Strategy(ConfigModel):
    """How a stage is parallelised across ranks."""

    name: StrategyName = "deepspeed"
    """`ddp`, `fsdp` (FSDP2 fully_shard) or `deepspeed` (the paper trained with ZeRO-2)."""
    zero_stage: Annotated[int, Field(ge=1, le=3)] = 2
    """DeepSpeed ZeRO stage (1, 2 or 3); ignored by the other strategies."""
    offload: Literal["none", "cpu"] = "none"
    """Offload optimizer state (and parameters at ZeRO-3) to CPU memory; DeepSpeed only."""


class CheckpointPolicy(ConfigModel):
    """When a stage saves checkpoints and how many it keeps."""

    every_steps: Annotated[int, Field(ge=1)] = 500
    """Save every N optimizer steps (and always at the end of the stage)."""
    keep_last: Annotated[int, Field(ge=1)] = 3
    """Committed checkpoints kept; older ones are deleted after a newer one commits."""
    asynchronous: bool = Field(default=False, alias="async")
    """Copy the state to CPU memory at each save and upload it in the background while training goes
    on (torch.distributed.checkpoint.async_save); a checkpoint is committed once its upload has
    finished, one upload at a time. DDP and FSDP only: DeepSpeed saves synchronously either way."""


class RLAlgorithm(ConfigModel):
    """GRPO with DAPO's clip-higher and token-level loss, as in the MedMO paper."""

    group_size: Annotated[int, Field(ge=2, le=64)] = 8
    """Completions sampled per prompt (paper: 4 to 8)."""
    epsilon_low: Annotated[float, Field(gt=0, lt=1)] = 0.15
    """Lower clip range of the probability ratio."""
    epsilon_high: Annotated[float, Field(gt=0, lt=1)] = 0.25
    """Upper clip range (clip-higher: larger than epsilonLow)."""
    kl_beta: Annotated[float, Field(ge=0)] = 0.0
    """Weight of the KL penalty to the reference policy; 0 keeps no reference model."""
    loss_aggregation: Literal["token", "sequence"] = "token"
    """`token` averages over all completion tokens of the batch (DAPO); `sequence` per completion first."""
    mask_truncated: bool = True
    """Completions cut at maxCompletionLength contribute no loss."""
    max_prompt_length: Annotated[int, Field(ge=8)] = 1024
    """Prompt tokens kept (image tokens included)."""
    max_completion_length: Annotated[int, Field(ge=1)] = 512
    """Tokens generated per completion."""
    temperature: Annotated[float, Field(gt=0)] = 1.0
    """Sampling temperature of rollouts."""
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Nucleus sampling threshold of rollouts."""
    prompts_per_step: Annotated[int, Field(ge=1)] = 16
    """Prompts sampled per learner step (each yields groupSize completions)."""
    max_staleness: Annotated[int, Field(ge=0, le=1)] = 0
    """0 is on-policy; 1 overlaps generation of step t+1 with the update of step t."""


class RewardWeights(ConfigModel):
    """Weights of the verifiable reward components, summed into one scalar per completion."""

    accuracy: Annotated[float, Field(ge=0)] = 1.0
    """Label accuracy: VQA answers, finding sets of reports."""
    bbox: Annotated[float, Field(ge=0)] = 1.0
    """The paper's box reward (Hungarian matching on L1 and GIoU)."""
    format: Annotated[float, Field(ge=0)] = 0.5
    """Tag-count format reward for `<think>...</think><answer>...</answer>`."""
    overlong: Annotated[float, Field(ge=0)] = 1.0
    """DAPO's soft over-length penalty."""
    lambda_fn: Annotated[float, Field(ge=0)] = 0.0
    """Box reward penalty per missed ground-truth box."""
    lambda_fp: Annotated[float, Field(ge=0)] = 0.0
    """Box reward penalty per spurious predicted box."""
    overlong_buffer: Annotated[int, Field(ge=0)] = 64
    """Tokens before maxCompletionLength where the over-length penalty starts to grow."""


class BenchmarkSpec(ConfigModel):
    """One held-out benchmark of an eval stage."""

    name: DnsLabel
    """Short name; metrics are reported as `<name>/<metric>`."""
    uri: Annotated[str, Field(min_length=1)]
    """fsspec URI of the benchmark's JSONL records."""
    tasks: list[TaskType] = Field(default_factory=list)
    """Task types to score; empty scores all present."""
    max_samples: Annotated[int, Field(ge=1)] | None = None
    """Cap on records scored (all when unset)."""


class CompareModel(ConfigModel):
    """A model an `eval` stage scores besides its own, for comparison (e.g. the model before RL)."""

    name: DnsLabel
    """Label of the model; its metrics are reported as `<name>/<benchmark>/<metric>`."""
    uri: Annotated[str, Field(min_length=1)]
    """Model source, as `model.base` takes it (an earlier stage's export URI, a path, a preset)."""


class EvalSettings(ConfigModel):
    """How an `eval` stage generates answers, and which models it compares."""

    model_name: DnsLabel = "final"
    """Label of the stage's own model (`model.base`) in metrics.json and the report; its metric keys
    carry no prefix (`<benchmark>/<metric>`)."""
    compare_models: list[CompareModel] = Field(default_factory=list)
    """Extra models scored on the same benchmarks."""
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 96
    """Greedy generation budget per answer; a longer answer is cut (and usually scores 0)."""
    batch_size: Annotated[int, Field(ge=1)] = 8
    """Records generated together on each rank."""

    @model_validator(mode="after")
    def _check_unique_names(self) -> EvalSettings:
        names = [self.model_name, *(m.name for m in self.compare_models)]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"evaluation model names must be unique (modelName and compareModels[].name): {duplicates}")
        return self


PRESET_PREFIX = "preset:"


def is_hub_model(base: str) -> bool:
    """Whether a model source names a Hugging Face Hub repository (`org/name`): not a preset, a
    `file://`/`s3://`/other URI, nor an absolute or relative path."""
    return not base.startswith((PRESET_PREFIX, "/", ".")) and "://" not in base


class ProjectorSpec(ConfigModel):
    """The projector of an extra vision encoder into the language model's hidden size."""

    type: Literal["mlp"] = "mlp"
    """`mlp`: LayerNorm, then linear layers with GELU between them."""
    layers: Annotated[int, Field(ge=1, le=4)] = 2
    """Linear layers of the MLP."""


class VisionEncoderSpec(ConfigModel):
    """An extra vision encoder beside the base model's own tower (`medmo_trainer.model.encoders`)."""

    name: Annotated[str, Field(min_length=1, max_length=32, pattern=f"^{ENCODER_NAME}$")]
    """Unique name; its trainable groups are `encoder:<name>` and `projector:<name>`."""
    base: Annotated[str, Field(min_length=1, max_length=1024)]
    """Hugging Face Hub id, local path, `file://` or `s3://` URI of a transformers vision model (SigLIP,
    CLIP, DINOv2...), or a tiny random preset: `preset:tiny-siglip`, `preset:tiny-clip-vision`,
    `preset:tiny-dinov2`."""
    image_size: Annotated[int, Field(ge=16, le=4096)] = 224
    """Side, in pixels, of the square each image is resized to for this encoder."""
    pool_size: Annotated[int, Field(ge=1, le=32)] = 4
    """Its patch features are average-pooled to a poolSize x poolSize grid: poolSize**2 tokens per image,
    placed after the base tower's tokens of that image."""
    projector: ProjectorSpec = Field(default_factory=ProjectorSpec)
    """Its projector into the language model."""


class ModelSource(ConfigModel):
    """Where a stage's starting weights come from and what trains."""

    base: Annotated[str, Field(min_length=1)]
    """Hugging Face id, local path, `file://` or `s3://` URI of a Hugging Face model folder, or a
    built-in tiny preset written `preset:<name>`."""
    trainable: list[TrainableGroup] = Field(default_factory=lambda: list(ALL_MODULE_GROUPS))
    """Module groups that receive gradients; the rest are frozen and get no optimizer state."""
    vision_encoders: list[VisionEncoderSpec] = Field(default_factory=list)
    """Extra vision encoders, added to `base` when it does not have them yet (a model exported by an
    earlier stage already holds them, trained)."""

    @model_validator(mode="after")
    def _encoders_named_once(self) -> ModelSource:
        names = [encoder.name for encoder in self.vision_encoders]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"visionEncoders names must be unique, repeated: {', '.join(repeated)}")
        return self


class StorageConfig(ConfigModel):
    """Object storage of the run. Credentials come from the environment, never from here."""

    uri: Annotated[str, Field(min_length=1)]
    """Root URI of the run (`s3://bucket/prefix`, `file:///path`, or a local path)."""
    endpoint: str | None = None
    """S3 endpoint URL for S3-compatible servers (SeaweedFS, MinIO); unset for AWS."""
    region: str | None = None
    """S3 region, when the server needs one."""


class RLStageConfig(ConfigModel):
    """What an `rl` stage's learner needs beyond a training stage."""

    algorithm: RLAlgorithm = Field(default_factory=RLAlgorithm)
    rewards: RewardWeights = Field(default_factory=RewardWeights)
    rollout_urls: list[str] = Field(default_factory=list)
    """Base URLs of rollout workers (each replica, or one Service)."""
    reward_urls: list[str] = Field(default_factory=list)
    """Base URLs of reward-scoring workers."""
    rollout_backend: RolloutBackendName = "transformers"
    """The rollout workers' backend (they read it from this config)."""
    request_timeout_seconds: Annotated[float, Field(gt=0)] = 300.0
    """A worker that takes longer is abandoned and the request retried on another replica."""
    worker_startup_timeout_seconds: Annotated[float, Field(gt=0)] = 900.0
    """How long the first step waits for a ready replica of each worker group: workers start with the
    learner and load the policy meanwhile, which takes minutes for a real model."""
    rollout_requests_per_step: Annotated[int, Field(ge=1)] | None = None
    """Concurrent generate requests a step's prompts are split into; unset: one per rollout URL. Set it to
    the replica count when `rolloutUrls` is one Service, so the Service spreads them over its replicas."""
    reward_requests_per_step: Annotated[int, Field(ge=1)] | None = None
    """Concurrent score requests per step; unset: one per reward URL (same reasoning as for rollouts)."""


class StageConfig(ConfigModel):
    """Everything one stage's pods need, rendered by the operator into a ConfigMap (or a file)."""

    run: Annotated[str, Field(min_length=1)]
    """Name of the MedMOTraining this stage belongs to."""
    run_uid: str | None = None
    """The MedMOTraining's uid (`medmo run` keeps one per work directory). Checkpoints record it, and a
    stage resumes only from checkpoints of its own run: a resource deleted and applied again under the
    same name and storage is a new run. Unset when a stage is run by hand."""
    stage: Annotated[str, Field(min_length=1)]
    """Name of the stage."""
    type: StageType
    model: ModelSource
    storage: StorageConfig
    output_uri: Annotated[str, Field(min_length=1)]
    """Where the stage exports its final model in Hugging Face format."""
    checkpoint_uri: Annotated[str, Field(min_length=1)]
    """Folder of this stage's checkpoints (`step-N/` folders and the `latest` pointer)."""
    datasets: list[DatasetSpec] = Field(default_factory=list)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    strategy: Strategy = Field(default_factory=Strategy)
    checkpoint: CheckpointPolicy = Field(default_factory=CheckpointPolicy)
    rl: RLStageConfig | None = None
    """Set for `rl` stages."""
    benchmarks: list[BenchmarkSpec] = Field(default_factory=list)
    """Set for `eval` stages."""
    evaluation: EvalSettings = Field(default_factory=EvalSettings)
    """Generation and comparison settings of an `eval` stage."""

    @model_validator(mode="after")
    def _check_stage_shape(self) -> StageConfig:
        if self.type in ("pretrain", "sft") and not self.datasets:
            raise ValueError(f"stage {self.stage!r} of type {self.type} needs at least one dataset in `datasets`")
        if self.type == "rl" and self.rl is None:
            raise ValueError(f"stage {self.stage!r} of type rl needs an `rl` section")
        if self.type == "eval" and not self.benchmarks:
            raise ValueError(f"stage {self.stage!r} of type eval needs at least one entry in `benchmarks`")
        return self


def load_stage_config(source: str | Path) -> StageConfig:
    """Reads a stage config from a local path or an fsspec URI (YAML or JSON)."""
    text = _read_text(str(source))
    data = json.loads(text) if str(source).endswith(".json") else yaml.safe_load(text)
    return StageConfig.model_validate(data)


def _read_text(source: str) -> str:
    if "://" not in source or source.startswith("file://"):
        return Path(source.removeprefix("file://")).read_text()
    import fsspec  # only for remote configs; keeps this module light for the operator

    with fsspec.open(source, "r") as handle:
        return handle.read()
