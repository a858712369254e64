"""`hyperparameters.lossAveraging`: `token` weighs a record by its answer's length, `sample` weighs records equally."""

from __future__ import annotations

import pytest
import torch

from medmo_trainer.data.records import load_images
from medmo_trainer.data.synthetic import generate_scan
from medmo_trainer.inputs.encode import encode_sample, pack, pad
from medmo_trainer.stages.training import supervised_loss


def encoded(processor, tasks: tuple[str, ...]):
    """One sample per task, all of one synthetic scan, as the loader encodes them."""
    _, records = generate_scan(5, "train", 0, embed_image=True)
    by_task = {r.task: r for r in records}
    return [encode_sample(processor, by_task[t], load_images(by_task[t]), image_size=64, max_seq_length=512)
            for t in tasks]


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_sample_averaging_weighs_a_one_word_answer_as_much_as_a_list_of_boxes(tiny_qwen3, layout):
    processor, model = tiny_qwen3.processor, tiny_qwen3.model
    samples = encoded(processor, ("vqa", "grounding"))
    answer_tokens = [int((s.labels != -100).sum()) for s in samples]
    assert answer_tokens[1] > 5 * answer_tokens[0]  # the premise: boxes outnumber a VQA answer's tokens
    if layout == "packed":
        batch = pack(samples, processor.image_token_id)
    else:
        batch = pad(samples, processor.image_token_id, processor.tokenizer.pad_token_id)

    with torch.no_grad():
        by_sample = supervised_loss(model, batch, "sample")
        by_token = supervised_loss(model, batch, "token")
        alone = [model(**pack([s], processor.image_token_id)).loss for s in samples]
    assert by_sample.item() == pytest.approx((alone[0] + alone[1]).item() / 2, rel=1e-4)
    weighted = (alone[0] * answer_tokens[0] + alone[1] * answer_tokens[1]) / sum(answer_tokens)
    assert by_token.item() == pytest.approx(weighted.item(), rel=1e-4)
    assert abs(by_sample.item() - by_token.item()) > 1e-3  # the two settings differ on this batch
