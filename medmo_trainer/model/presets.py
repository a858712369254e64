"""Built-in presets: real Qwen-VL classes with random weights, written `preset:<name>` in `ModelSource.base`.

The tiny ones have two layers in both towers and hidden sizes of 32/64, so a training step on a few
synthetic samples takes milliseconds on CPU. The `qwen3-vl-<size>-random` ones have the shapes of the
released Qwen3-VL models (dimensions from their config.json, built with transformers' Qwen3VLConfig)
and measure speed and memory on GPUs without downloading weights (scripts/gpu-check.sh); they are built
on the GPU when there is one. Weights are deterministic by seed (and device); the tokenizer is
`medmo_trainer.model.tokenizer.tiny_tokenizer` (its few ids sit inside the real vocabulary).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PretrainedConfig, Qwen2_5_VLConfig, Qwen3VLConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from medmo_trainer.model.families import FAMILIES
from medmo_trainer.model.processor import VLProcessor
from medmo_trainer.model.tokenizer import IMAGE_PAD, IM_END, PAD_TOKEN, VIDEO_PAD, VISION_END, VISION_START, tiny_tokenizer

TEXT_HIDDEN = 64
HEAD_DIM = 16
VISION_HIDDEN = 32


def _token_ids(tokenizer) -> dict[str, int]:
    ids = dict(zip(("image", "video", "start", "end", "eos", "pad"), tokenizer.convert_tokens_to_ids(
        [IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END, IM_END, PAD_TOKEN])))
    return ids


def _vocab_size(tokenizer) -> int:
    """Tokenizer length rounded up to a multiple of 64 (room for added tokens, friendlier matmuls)."""
    return (len(tokenizer) + 63) // 64 * 64


def tiny_qwen3_vl_config(tokenizer, text_hidden: int = TEXT_HIDDEN) -> Qwen3VLConfig:
    ids = _token_ids(tokenizer)
    return Qwen3VLConfig(
        text_config={
            "vocab_size": _vocab_size(tokenizer),
            "hidden_size": text_hidden,
            "intermediate_size": 2 * text_hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": HEAD_DIM,
            "max_position_embeddings": 4096,
            # mrope sections split head_dim/2 rotary frequencies between time, height and width
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                "mrope_interleaved": True},
            "pad_token_id": ids["pad"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": FAMILIES["qwen3_vl"].patch_size,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 256,
            "out_hidden_size": text_hidden,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["start"],
        vision_end_token_id=ids["end"],
        tie_word_embeddings=False,
    )


def small_qwen3_vl_config(tokenizer) -> Qwen3VLConfig:
    """The tiny Qwen3-VL with a language model twice as wide (128): the demo's model. At 64 wide the
    demo's few hundred CPU steps teach it the answers' wording but hardly what the image shows; at 128
    a step costs about 10% more and held-out grounding IoU and report F1 double."""
    return tiny_qwen3_vl_config(tokenizer, text_hidden=2 * TEXT_HIDDEN)


def tiny_qwen2_5_vl_config(tokenizer) -> Qwen2_5_VLConfig:
    ids = _token_ids(tokenizer)
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": _vocab_size(tokenizer),
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "max_window_layers": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids["eos"],
            "eos_token_id": ids["eos"],
            "pad_token_id": ids["pad"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": FAMILIES["qwen2_5_vl"].patch_size,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
            "out_hidden_size": TEXT_HIDDEN,
        },
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["start"],
        vision_end_token_id=ids["end"],
        tie_word_embeddings=False,
    )


QWEN3_VL_SHAPES: dict[str, tuple[dict, dict]] = {
    # (text, vision) dimensions of Qwen/Qwen3-VL-{2B,4B,8B}-Instruct
    "2b": ({"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
            "tie_word_embeddings": True},
           {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "deepstack_visual_indexes": [5, 11, 17]}),
    "4b": ({"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
            "tie_word_embeddings": True},
           {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "deepstack_visual_indexes": [5, 11, 17]}),
    "8b": ({"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
            "tie_word_embeddings": False},
           {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "deepstack_visual_indexes": [8, 16, 24]}),
}


def released_qwen3_vl_config(size: str) -> Callable[..., Qwen3VLConfig]:
    """A config builder of the released Qwen3-VL `size` (vocabulary, heads, RoPE as released)."""
    text, vision = QWEN3_VL_SHAPES[size]

    def make(tokenizer) -> Qwen3VLConfig:
        ids = _token_ids(tokenizer)
        tie = text["tie_word_embeddings"]
        return Qwen3VLConfig(
            text_config={
                **{k: v for k, v in text.items() if k != "tie_word_embeddings"},
                "vocab_size": 151936, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 262144,
                "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                                    "mrope_interleaved": True},
                "pad_token_id": ids["pad"], "tie_word_embeddings": tie,
            },
            vision_config={
                **vision, "num_heads": 16, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                "out_hidden_size": text["hidden_size"], "num_position_embeddings": 2304,
            },
            image_token_id=ids["image"], video_token_id=ids["video"], vision_start_token_id=ids["start"],
            vision_end_token_id=ids["end"], tie_word_embeddings=tie,
        )

    return make


PRESETS: dict[str, tuple[str, Callable[..., PretrainedConfig]]] = {
    "tiny-qwen3-vl": ("qwen3_vl", tiny_qwen3_vl_config),
    "small-qwen3-vl": ("qwen3_vl", small_qwen3_vl_config),
    "tiny-qwen2.5-vl": ("qwen2_5_vl", tiny_qwen2_5_vl_config),
    **{f"qwen3-vl-{size}-random": ("qwen3_vl", released_qwen3_vl_config(size)) for size in QWEN3_VL_SHAPES},
}


def tiny_processor(family_name: str) -> VLProcessor:
    family = FAMILIES[family_name]
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=family.patch_size, merge_size=2, temporal_patch_size=2,
        image_mean=list(family.image_mean), image_std=list(family.image_std),
    )
    return VLProcessor(tokenizer=tiny_tokenizer(), image_processor=image_processor, family=family_name)


def build_preset(name: str, *, seed: int = 0, dtype: torch.dtype | None = None):
    """(model, processor, family name) of a preset; same seed, same weights."""
    family_name, make_config = PRESETS[name]
    processor = tiny_processor(family_name)
    config = make_config(processor.tokenizer)
    # Released shapes are built where they will run, in their dtype: on CPU in fp32 an 8B model takes minutes.
    on_gpu = name.endswith("-random") and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    with torch.random.fork_rng(devices=[device] if on_gpu else []), device:  # leave the caller's random stream untouched
        torch.manual_seed(seed)
        model = FAMILIES[family_name].model_class._from_config(config, dtype=dtype or torch.float32)
    ids = _token_ids(processor.tokenizer)
    # generation stops at the end of the assistant turn, as Qwen-VL checkpoints' generation configs say
    model.generation_config.eos_token_id = [ids["eos"], ids["pad"]]
    model.generation_config.pad_token_id = ids["pad"]
    if dtype is not None:
        model = model.to(dtype)
    return model, processor, family_name
