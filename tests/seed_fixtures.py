"""Tiny valid files in each seed's exact release format, with their images, for tests and rehearsals.

Each `write_*` function writes one file (and the images it names) into `folder` and returns a `SeedFile`: the
file, the folder its image paths resolve against, the `compclip-prepare --input-format` (or benchmark) it is,
and how many samples / items it holds. `prepare_args(seed)` gives the `compclip-prepare` arguments that import
it. The layouts follow the releases field for field:

- NegCLIP (`train_neg_clip.tsv`): a pandas-written TSV (unnamed index column, `title`, `filepath`, `image_id`,
  `neg_caption` as a Python list literal, `neg_image` as a list of row indices), paths relative to the COCO root;
- CE-CLIP (`.npy`): `np.save` of a list of dicts (`image_id`, `caption`, the four `*_aug_caption` slots with
  `'###'` for a negative that could not be built, `valid_caption`), COCO train2014 images by id;
- DeGLA (JSON): `[{"image_id", "original", "enhanced": [five negatives]}]`, COCO train2014 images by id;
- C2LIP (`.pkl`): a pickled list of dicts with the image path, the caption and `nounphrases` (possibly empty);
- COCO captions (`captions_train2014.json`) and the Karpathy split (`dataset_coco.json`);
- the benchmarks: SugarCrepe subsets, ARO VG-Relation / VG-Attribution, VALSE pieces, the generic
  multiple-choice JSONL, a Karpathy test split for retrieval, and a zero-shot class folder with templates.

Plain manifests (JSONL, CSV, TSV) and WebDataset shards are here too, for the fuzz tests.
"""
from __future__ import annotations

import csv
import json
import os
import pickle
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import numpy as np
from PIL import Image

COLOURS = [(220, 30, 30), (30, 170, 50), (40, 80, 235), (245, 220, 30), (150, 50, 200), (250, 250, 250)]
CAPTIONS = ["A dog chases a red ball near a tree.", "A woman holds a blue umbrella on a street.",
            "Two cats sleep on a green sofa.", "A man rides a brown horse on a beach."]
NEGATIVES = [["A ball chases a red dog near a tree.", "A dog chases a blue ball near a tree."],
             ["A umbrella holds a blue woman on a street.", "A woman holds a red umbrella on a street."],
             ["Two sofas sleep on a green cat.", "Two cats sleep on a red sofa."],
             ["A horse rides a brown man on a beach.", "A man rides a white horse on a beach."]]
COCO_IDS = [9, 25, 30, 34]


@dataclass
class SeedFile:
    """A written fixture: `path` to read, `image_root` its relative image paths resolve against, `kind` (the
    `--input-format` of compclip-prepare, or the benchmark), `count` samples (importers: manifest rows) or items."""

    path: str
    image_root: str
    kind: str
    count: int
    extra: Dict = field(default_factory=dict)


def write_image(path: str, index: int, size=(16, 12)) -> str:
    """A small image (JPEG or PNG after the suffix) of a colour picked by `index`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.new("RGB", size, COLOURS[index % len(COLOURS)])
    image.paste(COLOURS[(index + 2) % len(COLOURS)], (2, 2, 2 + index % 5 + 3, 8))
    image.save(path)
    return path


def coco_name(image_id: int, split: str = "train2014") -> str:
    return f"COCO_{split}_{image_id:012d}.jpg"


def coco_samples(root: str):
    """(index, image id, caption, negatives) of the COCO fixtures, their train2014 images written under `root`."""
    for index, (image_id, caption, negatives) in enumerate(zip(COCO_IDS, CAPTIONS, NEGATIVES)):
        write_image(os.path.join(root, coco_name(image_id)), index)
        yield index, image_id, caption, negatives


def write_negclip_tsv(folder: str) -> SeedFile:
    """`train_neg_clip.tsv` as NegCLIP ships it (pandas `to_csv(sep="\\t")`)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "train_neg_clip.tsv")
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["", "title", "filepath", "image_id", "neg_caption", "neg_image"])
        for index, image_id, caption, negatives in coco_samples(os.path.join(folder, "train2014")):
            others = [other for other in range(len(COCO_IDS)) if other != index][:2]
            writer.writerow([index, caption, f"train2014/{coco_name(image_id)}", image_id, repr(negatives),
                             repr(others)])
    return SeedFile(path, folder, "negclip", len(COCO_IDS))


def write_ceclip_npy(folder: str) -> SeedFile:
    """CE-CLIP's `.npy`: a list of dicts saved by `np.save`, images COCO train2014 by `image_id`."""
    root = os.path.join(folder, "train2014")
    samples = []
    for index, image_id, caption, negatives in coco_samples(root):
        relation = negatives[0] if index % 2 == 0 else "###"
        samples.append({"image_id": image_id, "caption": caption, "relation_aug_caption": relation,
                        "adj_aug_caption": negatives[1], "noun_aug_caption": caption.replace("a ", "a big ", 1),
                        "verb_aug_caption": caption.replace(" on ", " under ", 1),
                        "valid_caption": [1, int(relation != "###"), 1, 1, 1]})
    path = os.path.join(folder, "coco_train_ceclip.npy")
    np.save(path, np.array(samples, dtype=object), allow_pickle=True)
    return SeedFile(path, root, "ceclip", len(samples))


def write_degla_json(folder: str) -> SeedFile:
    """DeGLA's LLM-negative JSON, images COCO train2014 by `image_id`."""
    root = os.path.join(folder, "train2014")
    entries = []
    for _, image_id, caption, negatives in coco_samples(root):
        entries.append({"image_id": image_id, "original": caption,
                        "enhanced": negatives + [f"{caption[:-1]} at night.", "An empty street.",
                                                 caption.replace("A ", "Three ", 1)]})
    path = os.path.join(folder, "degla_coco_negatives.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(entries, handle, indent=1)
    return SeedFile(path, root, "degla", len(entries))


def write_c2lip_pkl(folder: str) -> SeedFile:
    """C2LIP's pickle: image path, caption, `nounphrases` (an empty list: the caption is the concept)."""
    samples = []
    phrases = [["dog", "red ball", "tree"], ["woman", "blue umbrella"], [], ["man", "brown horse", "beach"]]
    for index, (caption, nouns) in enumerate(zip(CAPTIONS, phrases)):
        name = f"images/{index:06d}.jpg"
        write_image(os.path.join(folder, name), index)
        samples.append({"image_path": name, "caption": caption, "nounphrases": nouns})
    path = os.path.join(folder, "c2lip_train.pkl")
    with open(path, "wb") as handle:
        pickle.dump(samples, handle)
    return SeedFile(path, folder, "c2lip", len(samples))


def write_coco_captions(folder: str) -> SeedFile:
    """`annotations/captions_train2014.json`: images and caption annotations (two per image)."""
    root = os.path.join(folder, "train2014")
    images, annotations = [], []
    for index, image_id, caption, _ in coco_samples(root):
        images.append({"license": 3, "file_name": coco_name(image_id), "coco_url": "", "height": 12, "width": 16,
                       "date_captured": "2013-11-14 16:28:13", "flickr_url": "", "id": image_id})
        for number, text in enumerate((caption, caption.replace("A ", "One ", 1))):
            annotations.append({"image_id": image_id, "id": 1000 + 10 * index + number, "caption": text})
    path = os.path.join(folder, "annotations", "captions_train2014.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"info": {"description": "COCO 2014 Dataset"}, "licenses": [], "images": images,
                   "annotations": annotations}, handle)
    return SeedFile(path, root, "coco", len(annotations))


KARPATHY_SPLITS = ["train", "restval", "val", "test"]


def write_karpathy_json(folder: str, splits=KARPATHY_SPLITS) -> SeedFile:
    """`dataset_coco.json`: one image per entry of `splits` (train/restval in train2014, val/test in val2014),
    two sentences each. `count` is the sentences of the train and restval images (the importer's default)."""
    images = []
    for index, split in enumerate(splits):
        image_id = COCO_IDS[index % len(COCO_IDS)] + 100 * index
        coco_split = "train2014" if split in ("train", "restval") else "val2014"
        write_image(os.path.join(folder, coco_split, coco_name(image_id, coco_split)), index)
        caption = CAPTIONS[index % len(CAPTIONS)]
        sentences = [{"tokens": text.lower().strip(".").split(), "raw": text, "imgid": index,
                      "sentid": 2 * index + number}
                     for number, text in enumerate((caption, caption.replace("A ", "One ", 1)))]
        images.append({"filepath": coco_split, "sentids": [2 * index, 2 * index + 1],
                       "filename": coco_name(image_id, coco_split), "imgid": index, "split": split,
                       "sentences": sentences, "cocoid": image_id})
    path = os.path.join(folder, "dataset_coco.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"images": images, "dataset": "coco"}, handle)
    return SeedFile(path, folder, "karpathy", 2 * sum(split in ("train", "restval") for split in splits))


TRAINING_FORMATS: Dict[str, Callable[[str], SeedFile]] = {
    "negclip": write_negclip_tsv, "ceclip": write_ceclip_npy, "degla": write_degla_json, "c2lip": write_c2lip_pkl,
    "coco": write_coco_captions, "karpathy": write_karpathy_json}
"""`compclip-prepare --input-format` -> the writer of a tiny file in that release format."""


def prepare_args(seed: SeedFile) -> List[str]:
    """The `compclip-prepare` arguments that import `seed` (add --output and the generation options)."""
    return ["--input", seed.path, "--input-format", seed.kind, "--image-root", seed.image_root]


# ---- plain manifests and shards ----------------------------------------------------------------------------------

def manifest_rows(folder: str) -> List[dict]:
    """Rows of every optional field, their images written under `folder/images`."""
    rows = []
    for index, (caption, negatives) in enumerate(zip(CAPTIONS, NEGATIVES)):
        name = f"images/{index}.png"
        write_image(os.path.join(folder, name), index)
        row = {"image": name, "caption": caption, "negatives": negatives}
        if index % 2:
            row["valid"] = [True, index != 3]
            row["concepts"] = [word for word in caption.strip(".").split() if len(word) > 3][:2]
        rows.append(row)
    return rows


def write_manifest(folder: str, fmt: str = "jsonl") -> SeedFile:
    """A JSONL, CSV or TSV manifest (list cells as JSON arrays) of `manifest_rows`."""
    rows = manifest_rows(folder)
    path = os.path.join(folder, f"train.{fmt}")
    with open(path, "w", encoding="utf-8", newline="") as handle:
        if fmt == "jsonl":
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        else:
            writer = csv.writer(handle, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
            columns = ["image", "caption", "negatives", "valid", "concepts"]
            writer.writerow(columns)
            for row in rows:
                writer.writerow([row[c] if c in ("image", "caption") else json.dumps(row[c]) if c in row else ""
                                 for c in columns])
    return SeedFile(path, folder, fmt, len(rows))


def write_shards(folder: str) -> SeedFile:
    """Two WebDataset shards (3 + 1 samples) of `manifest_rows`, json fields; `path` is the brace pattern."""
    from compclip.data.shards import write_shards as write

    rows = manifest_rows(folder)
    write(rows, os.path.join(folder, "shards"), max_count=3, base_dir=folder)
    return SeedFile(os.path.join(folder, "shards", "shard-{000000..000001}.tar"), folder, "wds", len(rows))


# ---- benchmarks ---------------------------------------------------------------------------------------------------

def write_sugarcrepe(folder: str) -> SeedFile:
    """`sugarcrepe/{swap_att,replace_rel}.json`, `{id: {filename, caption, negative_caption}}`, images in
    `val2017/` (the `--sugarcrepe-image-root`)."""
    root = os.path.join(folder, "val2017")
    for index in range(3):
        write_image(os.path.join(root, f"{index:012d}.jpg"), index)
    subsets = {"swap_att": [("a red square and a blue circle", "a blue square and a red circle"),
                            ("a green dog on a white sofa", "a white dog on a green sofa")],
               "replace_rel": [("a cat sitting on a table", "a cat sitting under a table"),
                               ("a man riding a horse", "a man feeding a horse"),
                               ("a bird above the water", "a bird below the water")]}
    os.makedirs(os.path.join(folder, "sugarcrepe"), exist_ok=True)
    for subset, pairs in subsets.items():
        data = {str(number): {"filename": f"{number % 3:012d}.jpg", "caption": caption, "negative_caption": negative}
                for number, (caption, negative) in enumerate(pairs)}
        with open(os.path.join(folder, "sugarcrepe", f"{subset}.json"), "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=4)
    return SeedFile(os.path.join(folder, "sugarcrepe"), root, "sugarcrepe", sum(map(len, subsets.values())))


def write_aro_vg(folder: str, kind: str = "relation") -> SeedFile:
    """ARO's `visual_genome_relation.json` (kind `relation`) or `visual_genome_attribution.json`
    (`attribution`): items with a box, true/false captions and the relation or attribute pair; images in
    `vg_images/`."""
    root = os.path.join(folder, "vg_images")
    for index in range(2):
        write_image(os.path.join(root, f"{2300000 + index}.jpg"), index, size=(32, 24))
    items = []
    for index in range(4):
        item = {"image_id": str(2300000 + index % 2), "bbox_x": 2, "bbox_y": 3 + index, "bbox_w": 20, "bbox_h": 15,
                "image_path": f"{2300000 + index % 2}.jpg"}
        if kind == "relation":
            item.update(relation_name=["on", "holding"][index % 2], true_caption="the cup is on the table",
                        false_caption="the table is on the cup")
        else:
            item.update(attributes=[["white", "black"], ["wooden", "metal"]][index % 2],
                        true_caption="the white cat and the black dog",
                        false_caption="the black cat and the white dog")
        items.append(item)
    path = os.path.join(folder, f"visual_genome_{kind}.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(items, handle)
    return SeedFile(path, root, f"aro_vg_{kind}", len(items))


def write_valse(folder: str) -> SeedFile:
    """A VALSE piece `valse/existence.json` (`{id: {..., image_file, caption, foil, mturk}}`), images in
    `valse_images/`; `count` is the valid items (`mturk.caption >= 2`)."""
    root = os.path.join(folder, "valse_images")
    data, votes = {}, [3, 2, 1, 3]
    for index, vote in enumerate(votes):
        name = f"v7w_{index}.jpg"
        write_image(os.path.join(root, name), index)
        data[f"existence_{index}"] = {
            "dataset": "visual7w", "original_split": "test", "dataset_idx": f"v7w_{index}",
            "linguistic_phenomena": "existence", "image_file": name,
            "caption": "There are two dogs.", "foil": "There are no dogs.", "classes": None, "classes_foil": None,
            "mturk": {"foil": 3 - vote, "caption": vote, "other": 0}}
    os.makedirs(os.path.join(folder, "valse"), exist_ok=True)
    path = os.path.join(folder, "valse", "existence.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
    return SeedFile(path, root, "valse", sum(vote >= 2 for vote in votes), {"total": len(votes)})


def write_generic_jsonl(folder: str) -> SeedFile:
    """The generic multiple-choice JSONL `{"id", "image", "captions", "label"}`."""
    rows = []
    for index in range(3):
        name = f"choices/{index}.png"
        write_image(os.path.join(folder, name), index)
        rows.append({"id": f"q{index}", "image": name, "captions": [CAPTIONS[index], NEGATIVES[index][0]],
                     "label": 0})
    path = os.path.join(folder, "choices.jsonl")
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return SeedFile(path, folder, "generic", len(rows))


def write_retrieval(folder: str) -> SeedFile:
    """A Karpathy JSON whose `test` split holds two images (retrieval, ARO's Order sets)."""
    seed = write_karpathy_json(folder, splits=["train", "test", "test"])
    return SeedFile(seed.path, folder, "retrieval", 2, {"split": "test"})


def write_zeroshot(folder: str) -> SeedFile:
    """A zero-shot class folder (`classes/<class>/*.png`), a class-name file and a template file; `path` is the
    folder, `extra` holds the two text files."""
    names = ["dog", "cat", "horse"]
    for label, name in enumerate(names):
        for index in range(2):
            write_image(os.path.join(folder, "classes", f"n0{label}", f"{index}.png"), label + index)
    classnames = os.path.join(folder, "classnames.txt")
    templates = os.path.join(folder, "templates.txt")
    with open(classnames, "w", encoding="utf-8") as handle:
        handle.write("".join(f"{name}\n" for name in names))
    with open(templates, "w", encoding="utf-8") as handle:
        handle.write("a photo of a {}.\na blurry photo of the {}.\n")
    return SeedFile(os.path.join(folder, "classes"), folder, "zeroshot", 6,
                    {"classnames": classnames, "templates": templates, "classes": len(names), "templates_count": 2})
