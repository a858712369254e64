"""RL prompts: chat messages plus images, from a data record or given directly, and their model inputs.

The rollout workers and the learner both turn a `Prompt` into model inputs here, so the tokens the
learner scores are exactly the ones the rollout worker conditioned on.
"""

from __future__ import annotations

import base64
import mimetypes
from types import SimpleNamespace
from typing import Any

from PIL import Image
from pydantic import model_validator

from medmo_trainer.config import ConfigModel
from medmo_trainer.fsio import url_to_fs


class Prompt(ConfigModel):
    """One prompt on the wire: a data `record`, or chat `messages` with `images` in placeholder order."""

    id: str | None = None
    record: dict[str, Any] | None = None
    """A record of the data schema (camelCase); its `image` or `images` must be absolute or data URIs."""
    messages: list[dict[str, Any]] | None = None
    """Chat turns; an image is a content part `{"type": "image"}`."""
    images: list[str] = []
    """Images of `messages`: fsspec URIs, absolute paths or `data:image/...;base64,` URIs."""

    @model_validator(mode="after")
    def _one_source(self) -> Prompt:
        if (self.record is None) == (self.messages is None):
            raise ValueError("give exactly one of `record` or `messages`")
        if self.record is not None and "prompt" not in self.record:
            raise ValueError("a prompt `record` needs `prompt`")
        return self

    def chat(self) -> tuple[list[dict[str, Any]], list[str]]:
        """(messages, image references) of this prompt."""
        if self.messages is not None:
            return self.messages, list(self.images)
        return record_messages(self.record), record_images(self.record)


def record_images(record: dict[str, Any]) -> list[str]:
    """The image references of a wire record, in order: `image`, else `images` (none: text-only)."""
    return [record["image"]] if record.get("image") else list(record.get("images", []))


def portable_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record as a worker on another node can read it: an image in a local file (an absolute
    path or `file://`, such as synthetic data generated on the learner's own cache volume) goes
    inline as a data URI; object-store and data URIs stay references. A file that cannot be read is
    left as it is, so the worker reports it like any other unreadable image."""
    portable = dict(record)
    if record.get("image"):
        portable["image"] = _portable_image(record["image"])
    if record.get("images"):
        portable["images"] = [_portable_image(image) for image in record["images"]]
    return portable


def _portable_image(image: str) -> str:
    if not image.startswith(("/", "file://")):
        return image
    try:
        fs, path = url_to_fs(image)
        data = fs.cat_file(path)
    except OSError:
        return image
    mime = mimetypes.guess_type(path)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def record_messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The user turn of a record, laid out exactly as the SFT stages train on it."""
    from medmo_trainer.inputs.encode import prompt_messages

    # prompt_messages reads only the prompt text and the images; a wire record need not carry a full, valid Record.
    return prompt_messages(SimpleNamespace(prompt=record["prompt"], image_refs=record_images(record)))


def load_image(reference: str) -> Image.Image:
    """An image from a data URI, an absolute path or an fsspec URI; raises ValueError naming it."""
    from medmo_trainer.data.records import load_image as load_record_image

    if not (reference.startswith(("data:", "/")) or "://" in reference):
        raise ValueError(f"relative image path {reference!r} cannot be resolved by a worker; send an absolute URI")
    try:
        return load_record_image(reference)
    except (ValueError, OSError) as error:  # MalformedRecordError is a ValueError
        shown = reference if len(reference) < 120 else reference[:117] + "..."
        raise ValueError(f"cannot read image {shown!r}: {error}") from error


def prompt_texts_and_images(processor, prompts: list[Prompt]) -> tuple[list[str], list[Image.Image]]:
    """Chat-templated texts (with a generation prompt) and the images they reference, in order."""
    texts, images = [], []
    for prompt in prompts:
        messages, references = prompt.chat()
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
        images.extend(load_image(ref) for ref in references)
    return texts, images


def encode_prompts(processor, prompts: list[Prompt], image_size: int):
    """Left-padded model inputs (input_ids, attention_mask, pixel_values, image_grid_thw...) of prompts."""
    texts, images = prompt_texts_and_images(processor, prompts)
    return processor(texts, images or None, image_size=image_size, padding_side="left")
