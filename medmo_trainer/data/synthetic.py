"""Synthetic scan-like medical images with known findings, and records of all five task types about them.

    python -m medmo_trainer.data.synthetic --out URI --n N --seed S [--split train|heldout]

Each of the N scans is a grayscale body-like ellipse with smooth texture and noise, holding 0-3
bright round nodules (at most one per quadrant, each entirely inside its quadrant, `small` or `large`)
and, sometimes, an effusion (a uniform opacity filling the lower part of the body). Every scan yields one
record per task type (two VQA records, one closed and one open; grounding only when a nodule is
present), so the answers are few, short and verifiable: a tiny model learns some of them in a few
hundred CPU steps. Output, under URI (any fsspec URI):

    <split>-00000.jsonl ...      records (`medmo_trainer.data.schema.Record`), `--shard-size` per shard
    medmo-index.json             the shards and their records per task (`medmo_trainer.data.shards`)
    images/<split>-000000.png    one PNG per scan, referenced by relative path (or embedded with
                                 `--embed-images`)

The same (seed, split, scan index) always gives the same scan; `train` and `heldout` draw from
different streams, so the held-out split is an unseen benchmark. Write each split to its own URI.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from medmo_trainer.boxes import GRID
from medmo_trainer.data.schema import Box, Record, format_grounding, multiple_choice_prompt
from medmo_trainer.data.shards import Shard, write_index
from medmo_trainer.fsio import join, url_to_fs

LOCATIONS = ("upper left", "upper right", "lower left", "lower right")
SIZES = ("small", "large")
COUNT_WORDS = ("no", "one", "two", "three")
SPLITS = ("train", "heldout")

NODULE_INTENSITY = 215
"""Nodules are far brighter than any body texture (at most ~125), so boxes are checkable by intensity."""
EFFUSION_INTENSITY = 140
"""Fluid is an opacity brighter than the body (as on a radiograph), on the other side of mid-gray from it.
When it was darker (40), a tiny random-initialised ViT could not tell it from the body: its patch
embedding has no bias at initialisation and a LayerNorm follows, so a uniform patch of any intensity
below the normaliser's mid-gray maps onto the same vector, and only the band's edge differed. The
demo then answered "Is there an effusion?" at chance while learning the same question alone."""
BODY_INTENSITY = 95
BACKGROUND_INTENSITY = 8

CAPTION_PROMPT = "Describe the scan in one sentence."
REPORT_PROMPT = "Write the findings of this scan."
RETRIEVAL_QUESTION = "Which caption matches the scan? Answer with the letter."
GROUNDING_PROMPT = "Locate every nodule with boxes."


@dataclass(frozen=True)
class Nodule:
    """A round nodule; its pixel box is [cx - r, cx + r] x [cy - r, cy + r], inclusive."""

    cx: int
    cy: int
    radius: int
    size: str
    location: str

    def grid_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The nodule's box on the 0-1000 grid, rounded outwards so it always contains the nodule."""
        x1 = math.floor(GRID * (self.cx - self.radius) / width)
        y1 = math.floor(GRID * (self.cy - self.radius) / height)
        x2 = math.ceil(GRID * (self.cx + self.radius + 1) / width)
        y2 = math.ceil(GRID * (self.cy + self.radius + 1) / height)
        return max(0, x1), max(0, y1), min(GRID, x2), min(GRID, y2)


@dataclass(frozen=True)
class Scene:
    """What a scan shows: its geometry and findings (no pixels)."""

    width: int
    height: int
    center: tuple[float, float]
    radii: tuple[float, float]
    nodules: tuple[Nodule, ...]
    effusion: bool

    @property
    def caption(self) -> str:
        return caption_for(len(self.nodules), self.effusion)


def caption_for(count: int, effusion: bool) -> str:
    noun = "nodule" if count <= 1 else "nodules"
    return f"Scan with {COUNT_WORDS[count]} {noun} and {'an effusion' if effusion else 'no effusion'}."


def scan_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one scan: independent of how many scans are generated or how they are sharded."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draws the geometry and findings of one scan."""
    width, height = (int(v) for v in rng.integers(96, 129, size=2))
    center = (width / 2 + rng.uniform(-3, 3), height / 2 + rng.uniform(-3, 3))
    radii = (width * rng.uniform(0.42, 0.46), height * rng.uniform(0.40, 0.45))
    effusion = bool(rng.random() < 0.4)
    # nodules stay above the effusion band, when there is one
    floor = center[1] + (0.6 * radii[1] - 2 if effusion else radii[1])
    count = int(rng.choice(4, p=[0.25, 0.35, 0.25, 0.15]))
    quadrants = rng.permutation(4)[:count]
    nodules = tuple(
        nodule
        for q in sorted(quadrants)
        if (nodule := _place_nodule(rng, int(q), width, height, center, radii, floor)) is not None
    )
    return Scene(width, height, center, radii, nodules, effusion)


def _place_nodule(rng, quadrant, width, height, center, radii, floor) -> Nodule | None:
    """A nodule fully inside the body, inside its quadrant and above `floor`, or None when none fits.

    Nodules are large against the image (radius 7% or 12% of its shorter side) so that a tiny model
    sees them even at 64 pixels; a large one that does not fit its quadrant is made small.
    """
    drawn = SIZES[int(rng.integers(2))]
    for size in dict.fromkeys((drawn, "small")):
        radius = round(min(width, height) * (0.07 if size == "small" else 0.12))
        right, lower = quadrant % 2 == 1, quadrant >= 2
        for _ in range(100):
            cx = int(rng.integers(radius + 2, width // 2 - radius - 2)) + (width // 2 if right else 0)
            cy = int(rng.integers(radius + 2, height // 2 - radius - 2)) + (height // 2 if lower else 0)
            if abs(cx - width / 2) < radius + 3 or abs(cy - height / 2) < radius + 3 or cy + radius > floor:
                continue
            # the farthest point of the disk from the body centre must stay inside the ellipse
            dx, dy = abs(cx - center[0]) + radius + 1, abs(cy - center[1]) + radius + 1
            if (dx / radii[0]) ** 2 + (dy / radii[1]) ** 2 <= 0.95:
                return Nodule(cx, cy, radius, size, LOCATIONS[quadrant])
    return None


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """The scan's pixels, uint8 of shape (height, width)."""
    h, w = scene.height, scene.width
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    (cx, cy), (rx, ry) = scene.center, scene.radii
    inside = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
    coarse = Image.fromarray(rng.uniform(-1, 1, size=(6, 6)).astype(np.float32), mode="F")
    texture = np.asarray(coarse.resize((w, h), Image.BILINEAR), dtype=np.float32) * 15
    noise = np.clip(rng.normal(0, 4, size=(h, w)), -10, 10).astype(np.float32)
    image = np.where(inside, BODY_INTENSITY + texture, BACKGROUND_INTENSITY) + noise
    if scene.effusion:
        image[inside & (ys > cy + 0.6 * ry)] = EFFUSION_INTENSITY + noise[inside & (ys > cy + 0.6 * ry)]
    for nodule in scene.nodules:
        disk = (xs - nodule.cx) ** 2 + (ys - nodule.cy) ** 2 <= nodule.radius**2
        image[disk] = NODULE_INTENSITY + noise[disk]
    return np.clip(image, 0, 255).astype(np.uint8)


def scene_records(scene: Scene, scan_id: str, image_ref: str, rng: np.random.Generator) -> list[Record]:
    """One record per task type about `scene` (two for VQA; no grounding when there is no nodule)."""
    common = {"image": image_ref, "meta": {"scan": scan_id}}
    records = [
        Record(id=f"{scan_id}-caption", task="caption", prompt=CAPTION_PROMPT, answer=scene.caption, **common),
        _closed_vqa(scene, scan_id, rng, common),
        _open_vqa(scene, scan_id, rng, common),
        Record(
            id=f"{scan_id}-report", task="report", prompt=REPORT_PROMPT, answer=report_text(scene),
            findings=report_findings(scene), **common,
        ),
        _retrieval(scene, scan_id, rng, common),
    ]
    if scene.nodules:
        boxes = [Box(label="nodule", box=n.grid_box(scene.width, scene.height)) for n in scene.nodules]
        records.append(
            Record(
                id=f"{scan_id}-grounding", task="grounding", prompt=GROUNDING_PROMPT,
                answer=format_grounding(boxes), boxes=boxes, **common,
            )
        )
    return records


def _closed_vqa(scene: Scene, scan_id: str, rng: np.random.Generator, common: dict) -> Record:
    count = len(scene.nodules)
    kind = int(rng.integers(3))
    if kind == 0:
        prompt, answer, options = "Is there a nodule?", "yes" if count else "no", ["yes", "no"]
    elif kind == 1:
        prompt, answer, options = "Is there an effusion?", "yes" if scene.effusion else "no", ["yes", "no"]
    else:
        prompt, answer, options = "How many nodules are there?", str(count), ["0", "1", "2", "3"]
    return Record(
        id=f"{scan_id}-vqa-closed", task="vqa", answer_type="closed", prompt=prompt, answer=answer,
        options=options, **common,
    )


def _open_vqa(scene: Scene, scan_id: str, rng: np.random.Generator, common: dict) -> Record:
    if not scene.nodules:
        prompt, answer = "Which finding is present?", "effusion" if scene.effusion else "none"
    else:
        nodule = scene.nodules[int(rng.integers(len(scene.nodules)))]
        same_size = [n for n in scene.nodules if n.size == nodule.size]
        if len(same_size) == 1 and rng.random() < 0.5:
            prompt, answer = f"Where is the {nodule.size} nodule?", nodule.location
        else:
            prompt, answer = f"What size is the nodule in the {nodule.location}?", nodule.size
    return Record(id=f"{scan_id}-vqa-open", task="vqa", answer_type="open", prompt=prompt, answer=answer, **common)


def _retrieval(scene: Scene, scan_id: str, rng: np.random.Generator, common: dict) -> Record:
    others = [caption_for(c, e) for c in range(4) for e in (False, True) if caption_for(c, e) != scene.caption]
    options = [scene.caption] + [others[i] for i in rng.choice(len(others), size=3, replace=False)]
    order = rng.permutation(len(options))
    options = [options[i] for i in order]
    answer = "ABCD"[int(np.flatnonzero(order == 0)[0])]
    return Record(
        id=f"{scan_id}-retrieval", task="retrieval", prompt=multiple_choice_prompt(RETRIEVAL_QUESTION, options),
        answer=answer, options=options, **common,
    )


def report_text(scene: Scene) -> str:
    sentences = [f"{n.size.capitalize()} nodule in the {n.location}." for n in scene.nodules] or ["No nodule."]
    sentences.append("Effusion present." if scene.effusion else "No effusion.")
    return " ".join(sentences)


def report_findings(scene: Scene) -> list[str]:
    findings = [f"{n.size} nodule in the {n.location}" for n in scene.nodules]
    return findings + (["effusion"] if scene.effusion else [])


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def generate_scan(seed: int, split: str, index: int, *, embed_image: bool = False) -> tuple[bytes, list[Record]]:
    """The PNG bytes and records of scan `index` of a split."""
    rng = scan_rng(seed, split, index)
    scene = sample_scene(rng)
    image = png_bytes(render(scene, rng))
    scan_id = f"{split}-{index:06d}"
    image_ref = (
        "data:image/png;base64," + base64.b64encode(image).decode() if embed_image else f"images/{scan_id}.png"
    )
    return image, scene_records(scene, scan_id, image_ref, rng)


def generate(out: str, n: int, seed: int, split: str = "train", *, shard_size: int = 2000,
             embed_images: bool = False) -> dict:
    """Writes N scans of a split under `out`; returns a summary (records per task, shards)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    fs, root = url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    if not embed_images:
        fs.makedirs(join(root, "images"), exist_ok=True)
    per_task: dict[str, int] = {}
    lines: list[str] = []
    images: dict[str, bytes] = {}
    shard_tasks: Counter = Counter()
    written: list[Shard] = []

    def flush() -> None:
        nonlocal lines, images, shard_tasks
        if images:
            fs.pipe(images)
        path = join(root, f"{split}-{len(written):05d}.jsonl")
        fs.pipe_file(path, ("\n".join(lines) + "\n").encode())
        written.append(Shard(fs.unstrip_protocol(path), len(lines), dict(shard_tasks)))
        lines, images, shard_tasks = [], {}, Counter()

    for index in range(n):
        image, records = generate_scan(seed, split, index, embed_image=embed_images)
        if not embed_images:
            images[join(root, records[0].image)] = image
        for record in records:
            per_task[record.task] = per_task.get(record.task, 0) + 1
            shard_tasks[record.task] += 1
            lines.append(json.dumps(record.model_dump(mode="json", by_alias=True, exclude_defaults=True)))
        if len(lines) >= shard_size:
            flush()
    if lines:
        flush()
    write_index(out, written)  # loaders learn every shard's size without reading the shards
    return {"out": out, "split": split, "scans": n, "records": sum(per_task.values()), "perTask": per_task,
            "shards": len(written)}


def corpus_texts(scenes: int = 400, seed: int = 0) -> Iterator[str]:
    """Every kind of text the synthetic records contain (for training the tiny presets' tokenizer)."""
    for index in range(scenes):
        rng = scan_rng(seed, "train", index)
        scene = sample_scene(rng)
        for record in scene_records(scene, f"corpus-{index}", "corpus.png", rng):
            yield record.prompt
            yield record.answer
    yield " ".join(str(v) for v in range(GRID + 1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m medmo_trainer.data.synthetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="fsspec URI of the output folder")
    parser.add_argument("--n", type=int, required=True, help="number of scans (each gives 5-6 records)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--shard-size", type=int, default=2000, help="records per JSONL shard")
    parser.add_argument("--embed-images", action="store_true", help="embed PNGs as data URIs in the records")
    args = parser.parse_args(argv)
    if args.n < 1 or args.shard_size < 1:
        parser.error("--n and --shard-size must be at least 1")
    summary = generate(args.out, args.n, args.seed, args.split, shard_size=args.shard_size,
                       embed_images=args.embed_images)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()


SCHEME = "synthetic://"


def materialize(uri: str) -> str:
    """The local folder holding `synthetic://<split>?n=<scans>&seed=<seed>`, generated on first use.

    The tiny sample recipe names its data this way, so it runs anywhere with nothing to upload: each
    pod generates the same records (deterministic by seed) into a cache shared by the processes of
    this machine, keyed by the URI and this module's source.
    """
    import fcntl
    import hashlib
    import os
    from pathlib import Path
    from urllib.parse import parse_qs, urlparse

    parsed = urlparse(uri)
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    split = parsed.netloc or parsed.path.strip("/") or "train"
    unknown = set(query) - {"n", "seed"}
    if split not in SPLITS or unknown or not query.get("n", "1").isdigit() or not query.get("seed", "0").lstrip("-").isdigit():
        raise ValueError(f"{uri}: expected synthetic://<{'|'.join(SPLITS)}>?n=<scans>&seed=<int>")
    n, seed = int(query.get("n", "256")), int(query.get("seed", "0"))
    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("MEDMO_CACHE", Path.home() / ".cache" / "medmo")) / "synthetic"
    folder = cache / f"{split}-n{n}-seed{seed}-{source}"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".complete").exists():
            generate(str(folder), n, seed, split)
            (folder / ".complete").touch()
    return str(folder)
