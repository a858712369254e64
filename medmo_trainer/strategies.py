"""Parallelism strategies: how a model is wrapped, stepped, checkpointed and gathered for export.

One small interface, one class per strategy, looked up by the config's `strategy.name`. The
trainer calls only the interface, so it never branches on the strategy.

Every loop (the supervised trainer and the RL learner) steps through the same contract:

    for each micro-batch of the step:  strategy.backward(loss, last_micro_step=...)
    strategy.optimizer_step()

`backward` only accumulates gradients (reduced across ranks with the last micro-batch) of the loss
as given, so the caller scales its micro-batch losses to sum to the step's loss; `optimizer_step`
is the one place where the optimizer and the learning-rate schedule step, once per call.
"""

from __future__ import annotations

import contextlib
import math
from concurrent.futures import Future
import os
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from medmo_trainer.config import Hyperparameters, StageConfig
from medmo_trainer.dist import DistContext
from medmo_trainer.optim import build_optimizer, build_scheduler, lr_multiplier


def compute_dtype(hp: Hyperparameters, device: torch.device) -> torch.dtype:
    """bf16 on GPU and fp32 on CPU for `auto`; otherwise what the config says."""
    if hp.precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if hp.precision == "bf16" else torch.float32


class TrainingStrategy(ABC):
    """Wraps a model for data-parallel training and owns its optimizer and schedule."""

    def __init__(self, config: StageConfig, context: DistContext) -> None:
        self.config = config
        self.hp = config.hyperparameters
        self.context = context
        self.dtype = compute_dtype(self.hp, context.device)

    @abstractmethod
    def prepare(self, model: torch.nn.Module, total_steps: int, micro_batches_per_step: int) -> None:
        """Moves and wraps the model, then builds optimizer and schedule over its trainable parameters;
        `micro_batches_per_step` is how many `backward` calls an optimizer step usually has."""

    @property
    @abstractmethod
    def model(self) -> torch.nn.Module:
        """The module to call forward on."""

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context of the forward pass (mixed precision where the strategy needs it)."""
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor, last_micro_step: bool) -> None:
        """Accumulates the gradient of one micro-batch's `loss`, unscaled (the caller's micro-batch losses
        sum to the step's loss); gradients are reduced across ranks with the step's last micro-batch."""

    @abstractmethod
    def optimizer_step(self) -> float:
        """Clips, steps optimizer and schedule once, zeroes gradients; returns the gradient norm. Called
        once per step, after the `backward` of its last micro-batch."""

    @abstractmethod
    def learning_rate(self) -> float:
        """The learning rate the next optimizer step uses."""

    @abstractmethod
    def save_state(self, uri: str, storage_options: dict, staging: Path) -> None:
        """Writes model, optimizer and schedule state under `uri` (a collective)."""

    saves_asynchronously = False
    """Whether `save_state_async` works: the strategy's state goes through torch.distributed.checkpoint."""

    def save_state_async(self, storage_writer: Any, process_group: Any) -> Future:
        """Copies the state of `save_state` to CPU memory now and writes it with `storage_writer` (a DCP
        StorageWriter) in a background thread, its collectives on `process_group` (a gloo group of its own,
        so they never interleave with training's); the future completes when every file is written."""
        raise NotImplementedError(f"{type(self).__name__} saves only synchronously")

    @abstractmethod
    def load_state(self, uri: str, storage_options: dict, staging: Path) -> None:
        """Restores what `save_state` wrote (a collective)."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on rank 0 (on CPU, names of the unwrapped model); {} elsewhere."""

    @abstractmethod
    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights that train, whole, on rank 0 (on CPU, names of the unwrapped model); {} elsewhere.
        A collective: what the RL learner publishes each step, without gathering the frozen rest."""

    @property
    @abstractmethod
    def unwrapped_model(self) -> torch.nn.Module:
        """The model as loaded, without the strategy's wrapper (its own parameter names)."""

    def trained_shapes(self) -> dict[str, list[int]]:
        """Name and full shape of every parameter that trains: the part of the model a checkpoint holds
        (frozen weights are left out of checkpoints and come from the stage's input model on resume)."""
        return {
            # ZeRO-3 keeps a partition in `shape` and the full shape in `ds_shape`; FSDP's DTensors the global one.
            name: list(getattr(param, "ds_shape", param.shape))
            for name, param in self.unwrapped_model.named_parameters()
            if param.requires_grad
        }


class _DistributedCheckpointStrategy(TrainingStrategy):
    """Common part of the strategies that checkpoint with torch.distributed.checkpoint (DCP)."""

    _module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    @property
    def model(self) -> torch.nn.Module:
        return self._module

    def _build_optimizer(self, model: torch.nn.Module, total_steps: int) -> None:
        self.optimizer = build_optimizer(model.parameters(), self.hp)
        self.scheduler = build_scheduler(self.optimizer, self.hp, total_steps)

    def optimizer_step(self) -> float:
        params = [p for p in self._module.parameters() if p.grad is not None]
        max_norm = self.hp.max_grad_norm if self.hp.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # Frozen weights are not saved: resume reloads them from the stage's input model. Loading is not
    # strict because those weights are absent by design; CheckpointManager has compared the checkpoint's
    # trained tensors (names and shapes) with `trained_shapes()` before loading.
    _state_options = StateDictOptions(ignore_frozen_params=True, strict=False)

    def _app_state(self) -> dict[str, Any]:
        model_state, optimizer_state = get_state_dict(self._module, self.optimizer, options=self._state_options)
        return {"model": model_state, "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict()}

    def save_state(self, uri: str, storage_options: dict, staging: Path) -> None:
        from torch.distributed.checkpoint import save
        from torch.distributed.checkpoint.fsspec_filesystem import FsspecWriter

        save(self._app_state(), storage_writer=FsspecWriter(uri, **storage_options))

    saves_asynchronously = True

    def save_state_async(self, storage_writer: Any, process_group: Any) -> Future:
        from torch.distributed.checkpoint import async_save

        # The writer stages (copies every tensor to CPU) before async_save returns: training may go on.
        return async_save(self._app_state(), storage_writer=storage_writer, process_group=process_group)

    def load_state(self, uri: str, storage_options: dict, staging: Path) -> None:
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.fsspec_filesystem import FsspecReader

        state = self._app_state()
        load(state, storage_reader=FsspecReader(uri, **storage_options))
        set_state_dict(
            self._module,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=self._state_options,
        )
        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self._gathered_state(ignore_frozen_params=False)

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        return self._gathered_state(ignore_frozen_params=True)

    def _gathered_state(self, ignore_frozen_params: bool) -> dict[str, torch.Tensor]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=ignore_frozen_params)
        state = get_model_state_dict(self._module, options=options)
        return state if self.context.is_main else {}


class DDPStrategy(_DistributedCheckpointStrategy):
    """Replicated weights, all-reduced gradients (torch DistributedDataParallel)."""

    def prepare(self, model: torch.nn.Module, total_steps: int, micro_batches_per_step: int) -> None:
        from torch.nn.parallel import DistributedDataParallel

        model.to(self.context.device)
        device_ids = [self.context.device.index] if self.context.device.type == "cuda" else None
        self._module = DistributedDataParallel(model, device_ids=device_ids)
        self._build_optimizer(self._module, total_steps)

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self._module.module

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.context.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, last_micro_step: bool) -> None:
        # Gradients are all-reduced once per optimizer step, not once per micro-batch.
        sync = contextlib.nullcontext() if last_micro_step else self._module.no_sync()
        with sync:
            loss.backward()


class FSDPStrategy(_DistributedCheckpointStrategy):
    """Sharded weights, gradients and optimizer state (FSDP2 `fully_shard`), one unit per block."""

    def prepare(self, model: torch.nn.Module, total_steps: int, micro_batches_per_step: int) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        model.to(self.context.device)
        policy = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
        block_classes = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in block_classes:
                fully_shard(module, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        self._module = model
        self._build_optimizer(model, total_steps)

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self._module  # fully_shard changes the module in place; names stay

    def backward(self, loss: torch.Tensor, last_micro_step: bool) -> None:
        # Unsharded gradients accumulate locally; they are reduce-scattered once, with the last micro-batch.
        self._module.set_requires_gradient_sync(last_micro_step)
        loss.backward()


class DeepSpeedStrategy(TrainingStrategy):
    """DeepSpeed ZeRO 1/2/3, optionally offloading optimizer state (and parameters at 3) to CPU."""

    def prepare(self, model: torch.nn.Module, total_steps: int, micro_batches_per_step: int) -> None:
        prepare_deepspeed_environment()
        import deepspeed

        trainable = [p for p in model.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=trainable,
            optimizer=lambda params: build_optimizer(params, self.hp),
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
                optimizer, lr_multiplier(self.hp, total_steps)
            ),
            config=self._deepspeed_config(micro_batches_per_step),
            dist_init_required=False,
        )

    def _deepspeed_config(self, micro_batches_per_step: int) -> dict:
        strategy = self.config.strategy
        zero: dict[str, Any] = {"stage": strategy.zero_stage}
        if strategy.zero_stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        if strategy.offload == "cpu":
            zero["offload_optimizer"] = {"device": "cpu"}
            if strategy.zero_stage == 3:
                zero["offload_param"] = {"device": "cpu"}
        return {
            "train_micro_batch_size_per_gpu": self.hp.per_device_batch_size,
            # Only bookkeeping (batch-size accounting, offloaded accumulation buffers): `backward` sets the
            # boundary itself, so a step whose micro-batch count differs still steps once.
            "gradient_accumulation_steps": micro_batches_per_step,
            "gradient_clipping": self.hp.max_grad_norm,
            "bf16": {"enabled": self.dtype == torch.bfloat16},
            "zero_optimization": zero,
            # The optimizer is torch's AdamW (DeepSpeed's fused ones need a GPU or a JIT build).
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }

    @property
    def model(self) -> torch.nn.Module:
        return self.engine

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.engine.module

    def backward(self, loss: torch.Tensor, last_micro_step: bool) -> None:
        # Left to its micro-step counter, DeepSpeed would reduce and step every `gradient_accumulation_steps`
        # backward passes, whatever a step's micro-batch count; and the caller has scaled the loss already.
        self.engine.set_gradient_accumulation_boundary(last_micro_step)
        self.engine.backward(loss, scale_wrt_gas=False)

    def optimizer_step(self) -> float:
        if not self.engine.is_gradient_accumulation_boundary():
            # engine.step() would silently skip the update.
            raise RuntimeError("optimizer_step() without a backward(..., last_micro_step=True) before it")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def learning_rate(self) -> float:
        return self.engine.lr_scheduler.get_last_lr()[0]

    def save_state(self, uri: str, storage_options: dict, staging: Path) -> None:
        from fsspec.core import url_to_fs

        local = staging / f"rank-{self.context.rank}"
        shutil.rmtree(local, ignore_errors=True)
        # Frozen weights are left out, as with DCP: resume reloads them from the stage's input model.
        self.engine.save_checkpoint(str(local), tag="state", save_latest=False, exclude_frozen_parameters=True)
        # Each rank uploads the files it wrote; they are disjoint by construction (names carry the rank).
        fs, path = url_to_fs(uri, **storage_options)
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            target = f"{path}/{file.relative_to(local).as_posix()}"
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)  # local filesystems need the folder
            fs.put_file(str(file), target)
        shutil.rmtree(local, ignore_errors=True)

    def load_state(self, uri: str, storage_options: dict, staging: Path) -> None:
        from fsspec.core import url_to_fs

        local = staging / f"rank-{self.context.rank}"
        shutil.rmtree(local, ignore_errors=True)
        fs, path = url_to_fs(uri, **storage_options)
        for remote in fs.find(f"{path}/state"):
            target = local / Path(remote).relative_to(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(target))
        # Not strict: the frozen weights are absent by design (CheckpointManager has checked the trained ones).
        load_path, _ = self.engine.load_checkpoint(str(local), tag="state", load_module_strict=False)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed state under {uri}")
        shutil.rmtree(local, ignore_errors=True)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.config.strategy.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.engine.module.state_dict()
        if not self.context.is_main:
            return {}
        return {name: tensor.detach().cpu() for name, tensor in state.items()}

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        import deepspeed

        trained = [(name, p) for name, p in self.engine.module.named_parameters() if p.requires_grad]
        # ZeRO-3 partitions every parameter: gather the trained ones only (a collective); at 1 and 2 they are whole.
        gather = (deepspeed.zero.GatheredParameters([p for _, p in trained])
                  if self.config.strategy.zero_stage == 3 else contextlib.nullcontext())
        with gather:
            if not self.context.is_main:
                return {}
            return {name: p.detach().cpu().clone() for name, p in trained}


STRATEGIES: dict[str, type[TrainingStrategy]] = {
    "ddp": DDPStrategy,
    "fsdp": FSDPStrategy,
    "deepspeed": DeepSpeedStrategy,
}


def build_strategy(config: StageConfig, context: DistContext) -> TrainingStrategy:
    return STRATEGIES[config.strategy.name](config, context)


def prepare_deepspeed_environment() -> None:
    """Sets DeepSpeed's accelerator on CPU and caches its JIT-built ops outside the clone, by version."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        import hashlib
        from importlib.metadata import version
        from importlib.util import find_spec

        # Keyed by where DeepSpeed is installed too: the build files name its sources and torch's
        # headers by path, so two virtualenvs sharing one folder would rebuild (minutes) in turn.
        installed = hashlib.sha256(str(find_spec("deepspeed").origin).encode()).hexdigest()[:8]
        cache = Path(os.environ.get("MEDMO_CACHE", Path.home() / ".cache" / "medmo"))
        os.environ["TORCH_EXTENSIONS_DIR"] = str(cache / f"torch-extensions-{version('deepspeed')}-{installed}")
