"""Shared pieces of the evaluation tests: a tiny random open_clip model, placeholder images, and the direct
(unbatched, uncached) open_clip computation the package's numbers are checked against."""
import os

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TINY_CONFIG = os.path.join(FIXTURES, "compclip-eval-tiny.json")
TINY = "compclip-eval-tiny"
SHARED_DATA = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data"))

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


def tiny_model(seed=0):
    """(model, preprocess, tokenizer) of a tiny randomly initialised CLIP, deterministic for a seed."""
    open_clip.add_model_config(TINY_CONFIG)
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(TINY)


def make_image(path, index, size=(48, 40)):
    """A solid background with a shape of another colour; `index` picks the colours and the shape."""
    image = Image.new("RGB", size, COLOURS[index % len(COLOURS)])
    draw = ImageDraw.Draw(image)
    box = (4 + index % 5, 6, 30 + index % 7, 34)
    shape = draw.ellipse if index % 2 else draw.rectangle
    shape(box, fill=COLOURS[(index * 3 + 1) % len(COLOURS)])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path)
    return path


@torch.no_grad()
def direct_image_features(model, preprocess, paths, boxes=None):
    """One image at a time, straight through open_clip: [N, D] normalised."""
    rows = []
    for index, path in enumerate(paths):
        image = Image.open(path).convert("RGB")
        if boxes is not None and boxes[index] is not None:
            image = image.crop(boxes[index])
        rows.append(F.normalize(model.encode_image(preprocess(image)[None]), dim=-1)[0])
    return torch.stack(rows)


@torch.no_grad()
def direct_text_features(model, tokenizer, texts):
    return F.normalize(model.encode_text(tokenizer(list(texts))), dim=-1)


def direct_choice_correct(model, preprocess, tokenizer, cases):
    """cases: [(image path, box or None, [captions], label)] -> [bool]: the label strictly beats every other."""
    correct = []
    for path, box, captions, label in cases:
        image = direct_image_features(model, preprocess, [path], [box])[0]
        scores = direct_text_features(model, tokenizer, captions) @ image
        others = [float(s) for i, s in enumerate(scores) if i != label]
        # a margin this small would make the comparison depend on summation order, not on the code under test
        assert all(abs(float(scores[label]) - other) > 1e-6 for other in others)
        correct.append(all(float(scores[label]) > other for other in others))
    return correct
