"""Loading a stage's starting model from any source, and exporting one in Hugging Face format.

Sources (`ModelSource.base`):
- `preset:<name>`: a built-in tiny preset (`medmo_trainer.model.presets.PRESETS`);
- a local folder, or a `file://` URI of one;
- an `s3://` (or other remote fsspec) URI of a Hugging Face model folder, downloaded once into
  `${MEDMO_CACHE:-~/.cache/medmo}/models/<hash of URI and listing>/`;
- anything else is a Hugging Face Hub id, resolved by `huggingface_hub.snapshot_download` (under the
  operator, an initializer Job has already copied a hub model into the run's storage, and pods load
  that copy by URI: see `medmo_trainer.fetch`).

Weights load in the dtype asked for (a stage's `precision`), whatever dtype they were saved in.
A source with `vision_encoders` gets them attached (`medmo_trainer.model.encoders`) unless the model
already has them, as a model exported by an earlier stage of the same run does.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedModel

from medmo_trainer.config import PRESET_PREFIX, ModelSource
from medmo_trainer.fsio import is_remote, url_to_fs
from medmo_trainer.model.encoders import COMPOSITE_MODEL_TYPE, attach_vision_encoders, register_auto_classes
from medmo_trainer.model.families import FAMILIES, UnsupportedModelError
from medmo_trainer.model.presets import PRESETS, build_preset
from medmo_trainer.model.processor import VLProcessor, vision_markers_present


register_auto_classes()


class ModelUnavailableError(RuntimeError):
    """The model source cannot be found, downloaded or loaded; the message names the source."""


@dataclass
class LoadedModel:
    """A model ready to train or generate, with the processor that prepares its inputs."""

    model: PreTrainedModel
    processor: VLProcessor
    family: str
    """Family name (`qwen3_vl`, `qwen2_5_vl`), a key of `medmo_trainer.model.families.FAMILIES`."""


def load_model(source: ModelSource | str, *, dtype: torch.dtype | None = None, seed: int = 0) -> LoadedModel:
    """Loads the model and processor named by `source`; `seed` only matters for presets' random weights."""
    base = source.base if isinstance(source, ModelSource) else source
    if base.startswith(PRESET_PREFIX):
        name = base.removeprefix(PRESET_PREFIX)
        if name not in PRESETS:
            raise ModelUnavailableError(f"unknown model preset {base!r}; presets: {sorted(PRESETS)}")
        model, processor, family = build_preset(name, seed=seed, dtype=dtype)
        loaded = LoadedModel(model, processor, family)
    else:
        folder = resolve_model_folder(base)
        try:
            loaded = load_model_folder(folder, dtype=dtype)
        except (OSError, ValueError) as error:
            raise ModelUnavailableError(f"cannot load model {base!r}: {error}") from error
    encoders = source.vision_encoders if isinstance(source, ModelSource) else []
    if encoders and loaded.family != COMPOSITE_MODEL_TYPE:
        try:
            model = attach_vision_encoders(loaded.model, encoders, seed=seed)
        except ValueError as error:
            raise UnsupportedModelError(str(error)) from error
        processor = loaded.processor
        processor.vision_encoders = model.config.vision_encoders
        processor.family = COMPOSITE_MODEL_TYPE
        loaded = LoadedModel(model, processor, COMPOSITE_MODEL_TYPE)
    disable_forward_cache(loaded.model)
    use_fastest_attention(loaded.model)
    return loaded


def use_fastest_attention(model: PreTrainedModel) -> None:
    """FlashAttention-2 where it can run (a GPU, the `flash_attn` package installed, weights in bf16 or
    fp16), else PyTorch's SDPA (transformers' default, which picks its own flash or memory-efficient
    kernel on GPU). Both take packed rows: flash attention reads the samples' bounds from the restarting
    position ids."""
    import importlib.util

    half = model.dtype in (torch.bfloat16, torch.float16)
    if half and torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        model.set_attn_implementation("flash_attention_2")


def disable_forward_cache(model: PreTrainedModel) -> None:
    """Makes plain forward passes build no KV cache (`generate` still turns it on for itself).

    Needed for packed batches: transformers only derives the per-sample block-diagonal mask from
    restarting position ids when no cache is passed, and builds one whenever `use_cache` is set.
    """
    model.config.use_cache = False
    text_config = getattr(model.config, "text_config", None)
    if text_config is not None:
        text_config.use_cache = False


def load_model_folder(folder: Path, *, dtype: torch.dtype | None = None) -> LoadedModel:
    """Loads a Hugging Face model folder of a supported family."""
    config = AutoConfig.from_pretrained(folder)
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise UnsupportedModelError(f"model type {config.model_type!r} is not supported; "
                                    f"supported families: {sorted(FAMILIES)}")
    model = family.model_class.from_pretrained(folder, dtype=dtype or torch.float32)
    processor = VLProcessor.from_pretrained(folder, family.name)
    if not vision_markers_present(processor.tokenizer):
        raise UnsupportedModelError(f"the tokenizer in {folder} lacks the Qwen-VL vision tokens")
    return LoadedModel(model, processor, family.name)


def resolve_model_folder(base: str) -> Path:
    """A local folder holding the model named by `base` (downloading remote sources into the cache)."""
    if base.startswith("file://") or base.startswith(("/", ".")) or Path(base).exists():
        folder = Path(base.removeprefix("file://"))
        if not (folder / "config.json").is_file():
            raise ModelUnavailableError(f"model folder {base!r} does not exist or holds no config.json")
        return folder
    if is_remote(base):
        return _download_remote(base)
    return _download_hub(base)


def _cache_root() -> Path:
    return Path(os.environ.get("MEDMO_CACHE", Path.home() / ".cache" / "medmo"))


def _download_remote(uri: str) -> Path:
    """Copies a remote model folder into the cache, keyed by the URI and its files' sizes and tags."""
    try:
        fs, root = url_to_fs(uri)
        listing = fs.find(root, detail=True)
    except Exception as error:  # any transport or credential failure means the source is unusable
        raise ModelUnavailableError(f"cannot list model folder {uri!r}: {error}") from error
    if not any(path.rstrip("/").endswith("/config.json") for path in listing):
        raise ModelUnavailableError(f"model folder {uri!r} does not exist or holds no config.json")
    fingerprint = hashlib.sha256(uri.encode())
    for path, info in sorted(listing.items()):
        tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        fingerprint.update(f"{path}\0{info.get('size')}\0{tag}\n".encode())
    target = _cache_root() / "models" / fingerprint.hexdigest()[:24]
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
    try:
        for path in listing:
            local = staging / path[len(root.rstrip("/")) + 1:]
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(path, str(local))
        staging.rename(target)  # atomic; if another rank won the race, its copy is as good
    except OSError as error:
        if not (target / "config.json").is_file():
            raise ModelUnavailableError(f"cannot download model folder {uri!r}: {error}") from error
    except Exception as error:
        raise ModelUnavailableError(f"cannot download model folder {uri!r}: {error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _download_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as error:  # offline, unknown repo, gated repo: all mean "cannot load this source"
        raise ModelUnavailableError(f"cannot fetch model {repo_id!r} from the Hugging Face Hub: {error}") from error


def export_hf(model: PreTrainedModel, processor: VLProcessor, out: str, *, state_dict: dict | None = None) -> None:
    """Writes the model (safetensors, config, generation config) and processor files under `out`.

    `out` is a local path or any fsspec URI; remote targets are written locally first, then uploaded.
    Pass `state_dict` when the weights are sharded (FSDP, ZeRO-3) and were gathered by the caller.
    `load_model(out)` then gives the same logits.
    """
    if not is_remote(out):
        folder = Path(out.removeprefix("file://"))
        _save(model, processor, folder, state_dict)
        return
    with tempfile.TemporaryDirectory(prefix="medmo-export-") as tmp:
        _save(model, processor, Path(tmp), state_dict)
        fs, root = url_to_fs(out)
        for local in sorted(Path(tmp).rglob("*")):
            if local.is_file():
                fs.put_file(str(local), f"{root.rstrip('/')}/{local.relative_to(tmp).as_posix()}")


def _save(model: PreTrainedModel, processor: VLProcessor, folder: Path, state_dict: dict | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, state_dict=state_dict)
    processor.save_pretrained(folder)
