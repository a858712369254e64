"""The tiny presets' tokenizer: a byte-level BPE trained offline with `tokenizers` on the synthetic data's texts.

Byte-level, so any text round-trips; trained on the synthetic vocabulary, so those texts take few
tokens. Numbers are split into single digits before BPE, as Qwen's own tokenizers split them: a
box coordinate is then always its digits, most significant first (`265` is `2 6 5`), instead of
whichever merges BPE learned (`26 5` here, ` 2 25` there), which a tiny model cannot learn to
write consistently. Cached under `${MEDMO_CACHE:-~/.cache/medmo}/tokenizers/<hash of the recipe>/`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from medmo_trainer.data.synthetic import corpus_texts

PAD_TOKEN = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
"""Control tokens of the Qwen-VL chat format; never split, never produced by plain text."""
TEXT_TOKENS = ("<box>", "</box>", "<think>", "</think>", "<answer>", "</answer>")
"""Markup the model writes in answers (boxes, RL reasoning tags); single tokens, decoded as text."""

VOCAB_SIZE = 1024

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
"""Qwen-VL's chat layout: one `<|im_start|>role\\n...<|im_end|>\\n` turn per message, an image as one
`<|image_pad|>` between vision markers (the processor expands it to the image's token count)."""


def _cache_root() -> Path:
    return Path(os.environ.get("MEDMO_CACHE", Path.home() / ".cache" / "medmo"))


def _recipe_hash(corpus: list[str]) -> str:
    recipe = {
        "corpus": hashlib.sha256("\n".join(corpus).encode()).hexdigest(),
        "vocab": VOCAB_SIZE,
        "digits": "individual",
        "special": SPECIAL_TOKENS,
        "text": TEXT_TOKENS,
        "template": CHAT_TEMPLATE,
        "tokenizers": tokenizers.__version__,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def train_tokenizer(corpus: list[str]) -> Tokenizer:
    """A byte-level BPE of at most VOCAB_SIZE tokens; control tokens get the first ids."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.add_tokens([tokenizers.AddedToken(t, normalized=False, special=False) for t in TEXT_TOKENS])
    return tokenizer


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The presets' tokenizer, trained on first use and cached by the hash of its recipe."""
    corpus = list(corpus_texts())
    folder = _cache_root() / "tokenizers" / _recipe_hash(corpus)
    path = folder / "tokenizer.json"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"tokenizer.json.{os.getpid()}.tmp"
        train_tokenizer(corpus).save(str(tmp))
        tmp.replace(path)  # atomic: concurrent ranks never read a half-written file
    return wrap_tokenizer(Tokenizer.from_file(str(path)))


def wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """A transformers tokenizer over `tokenizer` with the Qwen-VL special tokens and chat template."""
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (IM_END, PAD_TOKEN)],
        model_max_length=32768,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped
