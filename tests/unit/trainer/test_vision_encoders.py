"""Extra vision encoders (model.visionEncoders): token counts, positions, training groups, generation, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image, ImageDraw

from medmo_trainer.config import DatasetSpec, ModelSource, VisionEncoderSpec
from medmo_trainer.inputs import build_train_loader
from medmo_trainer.inputs.encode import rope_positions
from medmo_trainer.model import apply_trainable, export_hf, load_model, module_groups
from medmo_trainer.model.encoders import unreachable_encoder_parameters

ENCODERS = [
    {"name": "hires", "base": "preset:tiny-siglip", "imageSize": 64, "poolSize": 2},
    {"name": "clip", "base": "preset:tiny-clip-vision", "imageSize": 32, "poolSize": 2, "projector": {"layers": 1}},
    {"name": "dino", "base": "preset:tiny-dinov2", "imageSize": 48, "poolSize": 3},
]
EXTRA_TOKENS = 2 * 2 + 2 * 2 + 3 * 3


def composite_source(**overrides) -> ModelSource:
    return ModelSource(base="preset:tiny-qwen3-vl", vision_encoders=ENCODERS, **overrides)


@pytest.fixture(scope="module")
def composite():
    return load_model(composite_source())


def scan(shade: int, side: int = 64) -> Image.Image:
    image = Image.new("RGB", (side, side), (shade, 40, 90))
    ImageDraw.Draw(image).rectangle((side // 4, side // 4, side // 2, side // 2), fill=(250, 250, 250))
    return image


def prompt(processor, images: int = 1) -> str:
    content = [*({"type": "image"} for _ in range(images)), {"type": "text", "text": "Where is the lesion?"}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def test_each_image_takes_the_base_tokens_then_every_encoders_pooled_grid(composite):
    processor = composite.processor
    inputs = processor([prompt(processor, images=2)], [scan(10, 64), scan(200, 96)], image_size=64)
    base = [int(grid.prod()) // 4 for grid in inputs["image_grid_thw"]]
    assert int(inputs["mm_token_type_ids"].sum()) == sum(base) + 2 * EXTRA_TOKENS
    assert inputs["encoder_pixel_values"].shape == (2, 3 * (64**2 + 32**2 + 48**2))
    features = composite.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                        inputs["encoder_pixel_values"])
    assert [len(tokens) for tokens in features.pooler_output] == [b + EXTRA_TOKENS for b in base]
    assert composite.model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_extra_encoder_sees_what_the_base_view_does_not(composite):
    """Two images equal at the base tower's resolution but not at the extra encoder's: only the extra tokens differ."""
    processor, model = composite.processor, composite.model
    first = processor([prompt(processor)], [scan(10)], image_size=64)
    second = processor([prompt(processor)], [scan(10)], image_size=64)
    second["encoder_pixel_values"] = second["encoder_pixel_values"].flip(-1)
    with torch.no_grad():
        a = model.model.get_image_features(first["pixel_values"], first["image_grid_thw"], first["encoder_pixel_values"])
        b = model.model.get_image_features(second["pixel_values"], second["image_grid_thw"], second["encoder_pixel_values"])
    base = len(a.pooler_output[0]) - EXTRA_TOKENS
    assert torch.equal(a.pooler_output[0][:base], b.pooler_output[0][:base])
    assert not torch.allclose(a.pooler_output[0][base:], b.pooler_output[0][base:])


def test_packed_positions_are_the_models_own_positions(composite):
    """The trainer's packed rows carry positions computed like the model's get_rope_index (continuation grids)."""
    processor = composite.processor
    inputs = processor([prompt(processor, images=2)], [scan(10, 64), scan(200, 96)], image_size=64)
    ours = rope_positions(inputs["mm_token_type_ids"][0], inputs["image_grid_thw"], 2, processor.extra_pool_sizes)
    theirs, _ = composite.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                    image_grid_thw=inputs["image_grid_thw"])
    assert torch.equal(ours, theirs[:, 0])
    # the first image's extra grids start where text would have resumed, one after another
    types = inputs["mm_token_type_ids"][0].tolist()
    start = types.index(1)
    base = int(inputs["image_grid_thw"][0].prod()) // 4
    side = int(inputs["image_grid_thw"][0][1]) // 2
    first_extra = ours[:, start + base]
    assert first_extra.tolist() == [ours[0, start] + side] * 3


def test_generation_with_cache_matches_full_forward_passes(composite):
    processor, model = composite.processor, composite.model
    inputs = processor([prompt(processor)], [scan(120)], image_size=64)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        new = generated[:, inputs["input_ids"].shape[1]:]
        full = dict(inputs, input_ids=generated, attention_mask=torch.ones_like(generated),
                    mm_token_type_ids=torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, new.shape[1])))
        logits = model(**full).logits
    predicted = logits[:, inputs["input_ids"].shape[1] - 1:-1].argmax(-1)
    assert torch.equal(predicted, new)
    sampled = model.generate(**inputs, max_new_tokens=3, do_sample=True, num_return_sequences=3)
    assert sampled.shape[0] == 3


@pytest.mark.parametrize("trainable", [["projector:hires"], ["encoder:dino", "projector:dino"], ["projector"],
                                       ["vision", "projector"]])
def test_gradients_reach_only_the_trainable_groups(trainable, synthetic_train, small_hp):
    loaded = load_model(composite_source())
    names = set(apply_trainable(loaded.model, trainable))
    groups = module_groups(loaded.model)
    # what trains is the groups named, less what no image token depends on
    unreachable = unreachable_encoder_parameters(loaded.model)
    assert {n.split(".", 3)[3].split(".")[0] for n in unreachable} == {"head", "post_layernorm", "embeddings"}
    assert {n for n in unreachable if ".embeddings." in n} == {"model.extra_encoders.dino.embeddings.mask_token"}
    assert names == {n for g in trainable for n in groups[g]} - unreachable
    loader = build_train_loader([DatasetSpec(name="syn", uri=str(synthetic_train))], loaded.processor, small_hp,
                                rank=0, world_size=1, seed=0)
    batch = next(iter(loader))
    assert "encoder_pixel_values" in batch
    loaded.model(**batch).loss.backward()
    with_grad = {n for n, p in loaded.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == names


def test_projector_group_covers_the_base_merger_and_every_extra_projector(composite):
    groups = module_groups(composite.model)
    assert set(groups) >= {"encoder:hires", "projector:hires", "encoder:clip", "projector:clip"}
    for name in ("hires", "clip", "dino"):
        assert set(groups[f"projector:{name}"]) < set(groups["projector"])
        assert set(groups[f"encoder:{name}"]) < set(groups["vision"])
    assert any(n.startswith("model.visual.merger.") for n in groups["projector"])
    with pytest.raises(ValueError, match="unknown module groups"):
        apply_trainable(load_model("preset:tiny-qwen3-vl").model, ["projector:hires"])


def test_visionencoders_need_a_qwen3_vl_base():
    with pytest.raises(ValueError, match="Qwen3-VL"):
        load_model(ModelSource(base="preset:tiny-qwen2.5-vl", vision_encoders=ENCODERS[:1]))
    with pytest.raises(ValueError, match="unique"):
        ModelSource(base="preset:tiny-qwen3-vl", vision_encoders=[ENCODERS[0], ENCODERS[0]])


def test_encoder_from_a_local_folder(tmp_path):
    """A `base` that is a folder of a transformers vision model (here a full CLIP checkpoint) keeps its weights."""
    from transformers import CLIPConfig, CLIPModel

    clip = CLIPModel(CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8}))
    clip.save_pretrained(tmp_path / "clip")
    source = ModelSource(base="preset:tiny-qwen3-vl", vision_encoders=[
        VisionEncoderSpec(name="clip", base=str(tmp_path / "clip"), image_size=32, pool_size=2)])
    loaded = load_model(source)
    encoder = loaded.model.model.extra_encoders["clip"]
    weights = {name.removeprefix("vision_model."): w for name, w in encoder.state_dict().items()}
    assert torch.equal(weights["embeddings.patch_embedding.weight"], clip.vision_model.embeddings.patch_embedding.weight)


FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder, image_path = sys.argv[1], sys.argv[2]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the lesion?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(images=[Image.open(image_path)], text=[text], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    print(json.dumps({"classes": [type(model).__module__, type(processor).__module__],
                      "medmo": any(m.startswith("medmo_trainer") for m in sys.modules),
                      "input_ids": inputs["input_ids"][0].tolist(),
                      "encoder_pixel_values": inputs["encoder_pixel_values"].sum().item(),
                      "tokens": out[0, inputs["input_ids"].shape[1]:].tolist()}))
""")



def test_export_loads_with_stock_transformers_in_a_fresh_process(composite, tmp_path):
    composite.processor.set_image_size(64)
    export_hf(composite.model, composite.processor, str(tmp_path / "export"))
    folder = tmp_path / "export"
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_medmo_vl.MedMOVLForConditionalGeneration"
    for module in ("modeling_medmo_vl", "configuration_medmo_vl", "processing_medmo_vl"):
        assert (folder / f"{module}.py").is_file()
    assert json.loads((folder / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_medmo_vl.MedMOVLProcessor"}
    scan(120).save(tmp_path / "scan.png")

    inputs = composite.processor([prompt(composite.processor)], [Image.open(tmp_path / "scan.png")], image_size=64)
    with torch.no_grad():
        expected = composite.model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    reloaded = load_model(str(folder))  # the trainer's own loading path (eval stage, rollout workers)
    assert reloaded.family == "medmo_qwen3_vl" and reloaded.processor.extra_pool_sizes == [2, 2, 3]
    with torch.no_grad():
        again = reloaded.model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert torch.equal(again, expected)

    script = tmp_path / "fresh.py"
    script.write_text(FRESH_PROCESS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run([sys.executable, "-I", str(script), str(folder), str(tmp_path / "scan.png")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(c.startswith("transformers_modules") for c in report["classes"]) and not report["medmo"]
    # the stock AutoProcessor (with the processor saved beside) prepares what the trainer's processor does
    assert report["input_ids"] == inputs["input_ids"][0].tolist()
    assert report["encoder_pixel_values"] == pytest.approx(inputs["encoder_pixel_values"].sum().item(), rel=1e-5)
    assert report["tokens"] == expected.tolist()


def test_rollout_workers_load_the_encoders_from_a_stage_config_and_sample_groups(tmp_path, monkeypatch):
    """A rollout worker started from an rl stage's config attaches the encoders as the learner does, and
    samples groups of completions for a prompt with an image (`num_return_sequences` expands the extra tokens too)."""
    import medmo_trainer.rl.rollout_server as server
    from medmo_trainer.config import StageConfig
    from medmo_trainer.rl.prompts import Prompt
    from medmo_trainer.rl.rollout import SamplingParams, load_transformers_backend

    config = StageConfig.model_validate({
        "run": "r", "stage": "grpo", "type": "rl", "model": composite_source().to_wire(),
        "storage": {"uri": str(tmp_path)}, "outputUri": str(tmp_path / "out"), "checkpointUri": str(tmp_path / "ck"),
        "datasets": [{"name": "d", "uri": str(tmp_path)}], "rl": {}})
    (tmp_path / "grpo.json").write_text(json.dumps(config.to_wire()))
    (tmp_path / "token").write_text("secret")
    sources = []
    monkeypatch.setattr(server, "build_app", lambda source, *args, **kwargs: sources.append(source))
    monkeypatch.setattr(server, "serve", lambda *args, **kwargs: None)
    server.main(["--config", str(tmp_path / "grpo.json"), "--token-file", str(tmp_path / "token")])

    backend = load_transformers_backend(sources[0])  # what the server loads in the background
    assert type(backend.model).__name__ == "MedMOVLForConditionalGeneration"
    scan(120).save(tmp_path / "scan.png")
    prompt = Prompt(messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]}],
                    images=[str(tmp_path / "scan.png")])
    [group] = backend.generate([prompt], SamplingParams(n=3, max_new_tokens=4, seed=1, image_size=64))
    assert group.error is None and len(group.completions) == 3
