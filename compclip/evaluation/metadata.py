"""Zero-shot metadata: the class names and prompt templates open_clip ships, and the class folders they name.

open_clip (3.3, `open_clip.zero_shot_metadata`) ships the metadata of one dataset, ImageNet-1k: its 1000 class
names `IMAGENET_CLASSNAMES` in label order (the ILSVRC-2012 order, which is the sorted WordNet ids) and two prompt
sets, the 80 CLIP templates `OPENAI_IMAGENET_TEMPLATES` and their 7-template subset `SIMPLE_IMAGENET_TEMPLATES`.
clip_benchmark's `imagenet1k` class names and templates are the same lists. It uses them for ImageNet-V2 and
-Sketch (all 1000 classes) and for the 200-class ImageNet-A, -R and -O (the names of their own classes), and it
falls back to the ImageNet templates for a dataset it has none for.

Class folders name their classes:
* folders named by ImageNet-1k WordNet ids (`n01440764`, ...: ImageNet's val folder, -Sketch, -A, -R, -O, or any
  subset) get the ImageNet name of their class. The id -> label table is timm's `imagenet_synsets.txt` (timm is a
  requirement of open_clip).
* the 1000 folders `0` ... `999` of ImageNet-V2's release: each folder's number is its label.
Other folders keep their own names. An ImageNet dataset name (`IMAGENET_DATASETS`, clip_benchmark's names) asks for
the ImageNet names explicitly: then numbered folders may be any subset, and a CSV's labels are ImageNet indices.
"""
from __future__ import annotations

import functools
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .common import EvalDataError

# clip_benchmark's dataset names whose class names and templates are ImageNet-1k's.
IMAGENET_DATASETS = ("imagenet1k", "imagenetv2", "imagenet_sketch", "imagenet-a", "imagenet-r", "imagenet-o")
TEMPLATE_SETS = ("openai", "openai-simple", "simple")
SIMPLE_TEMPLATE = "a photo of a {}."
WORDNET_ID = re.compile(r"n\d{8}")
IMAGENET_SOURCE = "open_clip IMAGENET_CLASSNAMES"


def template_set(name: str) -> Optional[List[Callable[[str], str]]]:
    """The named prompt set (`TEMPLATE_SETS`): `openai` = open_clip's 80 OPENAI_IMAGENET_TEMPLATES, `openai-simple`
    = its 7 SIMPLE_IMAGENET_TEMPLATES, `simple` = 'a photo of a {}.'; None for another name."""
    if name == "simple":
        return [SIMPLE_TEMPLATE.format]
    if name in ("openai", "openai-simple"):
        from open_clip import zero_shot_metadata

        return list(zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES if name == "openai"
                    else zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES)
    return None


@functools.lru_cache(maxsize=1)
def imagenet_classnames() -> Tuple[str, ...]:
    """open_clip's 1000 ImageNet-1k class names, in label order."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return tuple(IMAGENET_CLASSNAMES)


@functools.lru_cache(maxsize=1)
def imagenet_wordnet_labels() -> Dict[str, int]:
    """{WordNet id: ImageNet-1k label}."""
    try:
        from timm.data import ImageNetInfo
    except ImportError as error:
        raise RuntimeError(f"ImageNet class folders are named through timm's WordNet id table (timm >= 0.9, a "
                           f"requirement of open_clip): {error}; upgrade timm or pass a class-names file "
                           "(zeroshot_classnames)") from None
    synsets = ImageNetInfo("imagenet-1k").label_names()
    if len(synsets) != len(imagenet_classnames()):  # the two packages' tables must describe the same labels
        raise RuntimeError(f"timm lists {len(synsets)} ImageNet-1k synsets, open_clip {len(imagenet_classnames())} "
                           "class names")
    return {wnid: label for label, wnid in enumerate(synsets)}


def is_imagenet_layout(folders: Sequence[str]) -> bool:
    """Whether class folders are ImageNet's: every one an ImageNet-1k WordNet id, or exactly `0` ... `999`."""
    if not folders:
        return False
    if all(WORDNET_ID.fullmatch(folder) for folder in folders):  # only then is timm's table worth loading
        return all(folder in imagenet_wordnet_labels() for folder in folders)
    return sorted(folders) == sorted(str(label) for label in range(len(imagenet_classnames())))


def imagenet_folder_classnames(folders: Sequence[str], source: str) -> List[str]:
    """The ImageNet name of each class folder (a WordNet id or a label number)."""
    wordnet, names = imagenet_wordnet_labels(), imagenet_classnames()
    labels = []
    for folder in folders:
        if folder in wordnet:
            labels.append(wordnet[folder])
        elif folder.isdigit() and int(folder) < len(names):
            labels.append(int(folder))
        else:
            raise EvalDataError(f"{source}: class folder {folder!r} is neither an ImageNet-1k WordNet id nor a label "
                                f"0-{len(names) - 1}")
    if len(set(labels)) != len(labels):
        raise EvalDataError(f"{source}: two class folders name the same ImageNet class")
    return [names[label] for label in labels]
