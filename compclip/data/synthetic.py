"""A synthetic compositional world: the project's embedded default data and the data of end-to-end tests.

Each scene is a flat-coloured image with 2-3 objects (shape x colour x size) laid out on a 3x3 grid, so that
"left of / right of" (same row) and "above / below" (same column) are unambiguous. Colours within a scene are
distinct, which makes every typed negative false by construction:

- `relation_swap`   the two objects of the first relation exchange places ("a red circle left of a blue square"
                    -> "a blue square left of a red circle");
- `attribute_swap`  the two objects exchange colours;
- `object_replace`  one object gets another shape;
- `attribute_replace` one object gets a colour absent from the scene, or the other size;
- `shuffle`         the words of the caption in a random order (invalid if that order equals the caption).

Variants (`max_objects`, `one_phrasing`; `python -m compclip.data.synthetic --max-objects 2 --one-phrasing`):
2-object scenes only, and each layout written one way ("left of" / "above", never the converse "right of" /
"below"). That variant is the world of the study and of the embedded default: with converse phrasings, the text
has to learn that "A left of B" says what "B right of A" says, and its only evidence is an image embedding that
does not yet encode layout, so no method learned relations in the study's budget (docs/study.md, third round).

Layout of `out_dir`: `images/{train,val}/NNNNNN.png`; `train.jsonl`, `val.jsonl` (paths relative to out_dir,
fields image, caption, negatives, valid, concepts, negative_types); `eval/<type>.json` in SugarCrepe's format
`{id: {filename, caption, negative_caption}}` (valid negatives only; `filename` relative to `images/val`);
`eval/retrieval.json` Karpathy-style (`{"images": [{"filename", "filepath": "images/val", "split": "test",
"sentences": [{"raw"}]}]}`); `world.json` the parameters, written last (marks a complete world).
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import random
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Dict

from PIL import Image, ImageDraw

from .negatives import normalise  # one comparison form for negatives and positives

VERSION = 2
"""2: the third object of a 3-object scene relates to either object of the first relation. In version 1 it
always related to the second, so a relation swap of a 3-object caption ("B left of A and C above the B") was the
only kind of caption that referred back to its first object: a text-only cue, which the hard-negative methods
learned instead of the spatial relation (docs/study.md, "Relations")."""
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 80, 235),
    "yellow": (245, 220, 30),
    "purple": (150, 50, 200),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.45, "large": 0.9}
"""Object side as a fraction of a grid cell."""
BACKGROUND = (100, 100, 100)
GRID = 3
RELATION_PHRASES = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
TEMPLATES = (
    "{first} {rel} {second}",
    "{first} is {rel} {second}",
    "there is {first} {rel} {second}",
    "a picture of {first} {rel} {second}",
    "in this image {first} is {rel} {second}",
)
NEGATIVE_TYPES = ("relation_swap", "attribute_swap", "object_replace", "attribute_replace", "shuffle")
TRAIN_NEGATIVE_TYPES = ("relation_swap", "attribute_swap", "object_replace", "attribute_replace")
"""The K=4 typed slots of the training manifests, in slot order."""



# ----------------------------------------------------------------------------------------------- scenes


def _relation(cell_a, cell_b) -> str | None:
    """Relation of a to b, defined only when both sit in one row or one column."""
    (row_a, col_a), (row_b, col_b) = cell_a, cell_b
    if row_a == row_b and col_a != col_b:
        return "left" if col_a < col_b else "right"
    if col_a == col_b and row_a != row_b:
        return "above" if row_a < row_b else "below"
    return None


def make_scene(rng: random.Random) -> dict:
    """Objects (shape, colour, size, cell, show_size) and the relations the caption states."""
    count = rng.choice((2, 2, 3))
    colours = rng.sample(sorted(COLOURS), count)
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    while True:
        cell_a, cell_b = rng.sample(cells, 2)
        if _relation(cell_a, cell_b):
            break
    placed = [cell_a, cell_b]
    reference = rng.randrange(2)  # the third object relates to either object of the first relation (see below)
    if count == 3:
        aligned = [cell for cell in cells if cell not in placed and _relation(cell, placed[reference])]
        placed.append(rng.choice(aligned))
    objects = [
        {"shape": rng.choice(SHAPES), "colour": colour, "size": rng.choice(sorted(SIZES)), "cell": list(cell),
         "show_size": rng.random() < 0.75}
        for colour, cell in zip(colours, placed)
    ]
    relations = [[0, _relation(placed[0], placed[1]), 1]]
    if count == 3:
        relations.append([2, _relation(placed[2], placed[reference]), reference])
    return {"objects": objects, "relations": relations, "template": rng.randrange(len(TEMPLATES)),
            "phrases": [rng.randrange(len(RELATION_PHRASES[rel])) for _, rel, _ in relations]}


def phrase(obj: dict) -> str:
    """The object's noun phrase without article: its concept."""
    words = ([obj["size"]] if obj["show_size"] else []) + [obj["colour"], obj["shape"]]
    return " ".join(words)


def caption_of(scene: dict) -> str:
    objects, relations = scene["objects"], scene["relations"]
    (a, rel, b), choice = relations[0], scene["phrases"][0]
    text = TEMPLATES[scene["template"]].format(first="a " + phrase(objects[a]),
                                               rel=RELATION_PHRASES[rel][choice % len(RELATION_PHRASES[rel])],
                                               second="a " + phrase(objects[b]))
    for (c, rel2, d), choice2 in zip(relations[1:], scene["phrases"][1:]):
        reference = f"the {objects[d]['colour']} {objects[d]['shape']}"
        text += (f" and a {phrase(objects[c])} is "
                 f"{RELATION_PHRASES[rel2][choice2 % len(RELATION_PHRASES[rel2])]} {reference}")
    return text


def negative_of(scene: dict, kind: str, rng: random.Random) -> tuple[str, bool]:
    """One typed negative caption and whether it is valid (false of the image and different from the caption)."""
    objects = [dict(obj) for obj in scene["objects"]]
    a, _, b = scene["relations"][0]
    changed = dict(scene, objects=objects)
    if kind == "relation_swap":
        changed["relations"] = [[b, scene["relations"][0][1], a]] + scene["relations"][1:]
    elif kind == "attribute_swap":
        objects[a]["colour"], objects[b]["colour"] = objects[b]["colour"], objects[a]["colour"]
    elif kind == "object_replace":
        target = rng.choice((a, b))
        objects[target]["shape"] = rng.choice([s for s in SHAPES if s != objects[target]["shape"]])
    elif kind == "attribute_replace":
        target = rng.choice((a, b))
        if objects[target]["show_size"] and rng.random() < 0.3:
            objects[target]["size"] = "small" if objects[target]["size"] == "large" else "large"
        else:
            used = {obj["colour"] for obj in objects}
            objects[target]["colour"] = rng.choice([c for c in sorted(COLOURS) if c not in used])
    elif kind == "shuffle":
        words = caption_of(scene).split()
        rng.shuffle(words)
        text = " ".join(words)
        return text, normalise(text) != normalise(caption_of(scene))
    else:
        raise ValueError(f"unknown negative type {kind!r} ({', '.join(NEGATIVE_TYPES)})")
    text = caption_of(changed)
    return text, normalise(text) != normalise(caption_of(scene))


def render(scene: dict, image_size: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = image_size / GRID
    jitter = random.Random(json.dumps(scene, sort_keys=True))
    for obj in scene["objects"]:
        row, col = obj["cell"]
        side = SIZES[obj["size"]] * cell
        slack = max(0.0, (cell - side) / 2 - 1)
        cx = (col + 0.5) * cell + jitter.uniform(-slack, slack) * 0.5
        cy = (row + 0.5) * cell + jitter.uniform(-slack, slack) * 0.5
        half = side / 2
        colour = COLOURS[obj["colour"]]
        if obj["shape"] == "circle":
            draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=colour)
        elif obj["shape"] == "square":
            inner = half * 0.85
            draw.rectangle([cx - inner, cy - inner, cx + inner, cy + inner], fill=colour)
        elif obj["shape"] == "triangle":
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
        else:  # cross
            arm = half / 3
            draw.rectangle([cx - half, cy - arm, cx + half, cy + arm], fill=colour)
            draw.rectangle([cx - arm, cy - half, cx + arm, cy + half], fill=colour)
    return image


def _render_job(job) -> None:
    path, scene, image_size = job
    render(scene, image_size).save(path, format="PNG", optimize=False)


# ----------------------------------------------------------------------------------------------- world


def make_sample(seed: int, split: str, index: int, negative_types=TRAIN_NEGATIVE_TYPES, max_objects: int = 3,
                one_phrasing: bool = False) -> dict:
    """Scene, caption, typed negatives with validity, and concepts of one sample; deterministic.

    The two options make the controlled variants of docs/study.md ("What decided it: converse phrasings"):
    `max_objects=2` keeps only 2-object scenes (scenes are drawn until one fits), and `one_phrasing` writes every
    relation one way, "left of" or "above" (a right-of relation is stated as the left-of relation of the same
    two objects, so "B right of A" becomes "A left of B")."""
    rng = random.Random(f"compclip-synthetic/{VERSION}/{seed}/{split}/{index}")
    while True:
        scene = make_scene(rng)
        if len(scene["objects"]) <= max_objects:
            break
    if one_phrasing:
        if len(scene["objects"]) > 2:
            raise ValueError("one_phrasing needs max_objects=2 (the second relation of a 3-object caption is "
                             "written from its third object)")
        a, relation, b = scene["relations"][0]
        if relation in ("right", "below"):
            scene["relations"][0] = [b, OPPOSITE[relation], a]
    caption = caption_of(scene)
    negatives, valid = [], []
    for kind in negative_types:
        text, ok = negative_of(scene, kind, random.Random(f"{seed}/{split}/{index}/{kind}"))
        negatives.append(text)
        valid.append(ok)
    mentioned = sorted({i for r in scene["relations"] for i in (r[0], r[2])})
    return {"scene": scene, "caption": caption, "negatives": negatives, "valid": valid,
            "concepts": [phrase(scene["objects"][i]) for i in mentioned]}


def check_variant(max_objects: int = 3, one_phrasing: bool = False) -> None:
    """ValueError unless (max_objects, one_phrasing) names a world variant that exists."""
    if max_objects not in (2, 3):
        raise ValueError(f"max_objects must be 2 or 3, not {max_objects!r}")
    if one_phrasing and max_objects != 2:
        raise ValueError("one_phrasing needs max_objects=2 (turn one_phrasing off for 3-object scenes)")


FOLDER = "synthetic-{seed}-{num_train}-{num_val}-{image_size}{variant}"
"""The name of a world's folder in a cache (the embedded default's `data.synthetic.root`, the study's world);
`{variant}` is `variant_name`'s suffix."""


def variant_name(max_objects: int = 3, one_phrasing: bool = False) -> str:
    """The suffix that tells a world variant's folder from the default world's: '' (2-3 objects, both phrasings),
    '-2obj', or '-2obj-1phrase'."""
    return ("" if max_objects == 3 else f"-{max_objects}obj") + ("-1phrase" if one_phrasing else "")


@dataclass(frozen=True)
class WorldPaths:
    """Where a synthetic world's files are (the module docstring's layout); `world.json` marks it complete."""

    root: str
    train: str
    val: str
    images_train: str
    images_val: str
    eval: Dict[str, str]
    """{negative type: its SugarCrepe-format evaluation file}"""
    eval_image_root: str
    retrieval: str
    meta: str

    @property
    def eval_dir(self) -> str:
        return os.path.join(self.root, "eval")

    def images(self, split: str) -> str:
        return self.images_train if split == "train" else self.images_val

    def manifest(self, split: str) -> str:
        return self.train if split == "train" else self.val

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def world_paths(out_dir: str) -> WorldPaths:
    out_dir = os.path.abspath(out_dir)
    return WorldPaths(
        root=out_dir,
        train=os.path.join(out_dir, "train.jsonl"),
        val=os.path.join(out_dir, "val.jsonl"),
        images_train=os.path.join(out_dir, "images", "train"),
        images_val=os.path.join(out_dir, "images", "val"),
        eval={kind: os.path.join(out_dir, "eval", f"{kind}.json") for kind in NEGATIVE_TYPES},
        eval_image_root=os.path.join(out_dir, "images", "val"),
        retrieval=os.path.join(out_dir, "eval", "retrieval.json"),
        meta=os.path.join(out_dir, "world.json"),
    )


def world_folder(root: str, seed: int, num_train: int, num_val: int, image_size: int, max_objects: int = 3,
                 one_phrasing: bool = False) -> str:
    """`root` with the FOLDER placeholders (`{seed}`, `{num_train}`, `{num_val}`, `{image_size}`, `{variant}`)
    filled in."""
    return root.format(seed=seed, num_train=num_train, num_val=num_val, image_size=image_size,
                       variant=variant_name(max_objects, one_phrasing)) if "{" in root else root


def paths_of(synthetic) -> WorldPaths:
    """The WorldPaths of a `data.synthetic` config section (nothing is written)."""
    return world_paths(world_folder(synthetic.root, synthetic.seed, synthetic.num_train, synthetic.num_val,
                                    synthetic.image_size, synthetic.max_objects, synthetic.one_phrasing))


def generate(synthetic) -> WorldPaths:
    """`generate_world` for a `data.synthetic` config section."""
    return generate_world(paths_of(synthetic).root, synthetic.num_train, synthetic.num_val, synthetic.seed,
                          synthetic.image_size, max_objects=synthetic.max_objects,
                          one_phrasing=synthetic.one_phrasing)


def _write_json(path: str, value) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=1, sort_keys=True)
        handle.write("\n")
    os.replace(temporary, path)


def generate_world(out_dir: str, num_train: int, num_val: int, seed: int = 0, image_size: int = 64,
                   workers: int | None = None, max_objects: int = 3, one_phrasing: bool = False) -> WorldPaths:
    """Write (or reuse) the synthetic world in `out_dir` and return its paths (see the module docstring).

    Deterministic: the same arguments give byte-identical manifests and images, whatever `workers` is.
    Idempotent: a complete world with the same parameters is reused as it is. Safe to call from every rank at
    once (a file lock lets one process write while the others wait)."""
    paths = world_paths(out_dir)
    out_dir = paths.root
    check_variant(max_objects, one_phrasing)
    params = {"version": VERSION, "num_train": num_train, "num_val": num_val, "seed": seed,
              "image_size": image_size, "negative_types": list(TRAIN_NEGATIVE_TYPES)}
    if max_objects != 3 or one_phrasing:  # the variants only: the default world's world.json stays as it was
        params.update(max_objects=max_objects, one_phrasing=one_phrasing)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(paths.meta):
            with open(paths.meta, encoding="utf-8") as handle:
                if json.load(handle) == params:
                    return paths
            os.remove(paths.meta)
        _generate(paths, params, workers)
        _write_json(paths.meta, params)
    return paths


def _generate(paths: WorldPaths, params: dict, workers: int | None) -> None:
    seed, image_size = params["seed"], params["image_size"]
    os.makedirs(paths.eval_dir, exist_ok=True)
    jobs = []
    for split, count in (("train", params["num_train"]), ("val", params["num_val"])):
        folder = paths.images(split)
        os.makedirs(folder, exist_ok=True)
        rows, eval_sets, retrieval = [], {kind: {} for kind in NEGATIVE_TYPES}, []
        for index in range(count):
            filename = f"{index:06d}.png"
            sample = make_sample(seed, split, index, max_objects=params.get("max_objects", 3),
                                 one_phrasing=params.get("one_phrasing", False))
            jobs.append((os.path.join(folder, filename), sample["scene"], image_size))
            rows.append({"image": f"images/{split}/{filename}", "caption": sample["caption"],
                         "negatives": sample["negatives"], "valid": sample["valid"],
                         "concepts": sample["concepts"], "negative_types": list(TRAIN_NEGATIVE_TYPES)})
            if split == "val":
                for kind in NEGATIVE_TYPES:
                    text, ok = negative_of(sample["scene"], kind, random.Random(f"{seed}/{split}/{index}/{kind}"))
                    if ok:
                        eval_sets[kind][str(index)] = {"filename": filename, "caption": sample["caption"],
                                                       "negative_caption": text}
                retrieval.append({"filename": filename, "filepath": "images/val", "split": "test",
                                  "imgid": index, "sentences": [{"raw": sample["caption"]}]})
        with open(paths.manifest(split) + ".tmp", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, sort_keys=True) + "\n")
        os.replace(paths.manifest(split) + ".tmp", paths.manifest(split))
        if split == "val":
            for kind, entries in eval_sets.items():
                _write_json(paths.eval[kind], entries)
            _write_json(paths.retrieval, {"dataset": "compclip-synthetic", "images": retrieval})
    if workers is None:
        workers = min(4, os.cpu_count() or 1) if len(jobs) >= 2000 else 1
    if workers <= 1:
        for job in jobs:
            _render_job(job)
    else:
        with get_context("fork").Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_job, jobs, chunksize=256):
                pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the synthetic compositional world.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="render processes (default: up to 4)")
    parser.add_argument("--max-objects", type=int, default=3, choices=(2, 3),
                        help="2: only 2-object scenes (a controlled variant, docs/study.md)")
    parser.add_argument("--one-phrasing", action="store_true",
                        help="write every relation as 'left of' or 'above' (needs --max-objects 2)")
    args = parser.parse_args(argv)
    try:  # generate_world checks the options before it writes anything
        paths = generate_world(args.out, args.num_train, args.num_val, args.seed, args.image_size, args.workers,
                               args.max_objects, args.one_phrasing)
    except ValueError as error:
        parser.error(str(error))
    print(json.dumps(paths.to_dict(), indent=1))


if __name__ == "__main__":
    main()
