"""Fuzz: the importers of the seeds' release formats (DeGLA JSON, COCO captions, Karpathy split, CE-CLIP .npy,
C2LIP .pkl) and the restricted unpickler under them. Each case is accepted with one record per sample of the file
(counted here without the importer), or stopped by an error naming the file (ManifestError, or the pickle
errors of compclip.safe_pickle); never another exception, never a hang."""
import io
import json
import os
import pickle

import numpy as np
import pytest
from hypothesis import strategies as st

import fuzz_support as fz
import seed_fixtures
from compclip.data.importers import import_records


def _pickled_count(kind: str, value) -> int:
    if isinstance(value, np.ndarray):
        value = value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, dict):
        key = "caption" if kind == "ceclip" else "nounphrases"
        return 1 if key in value else len(value)
    return len(value)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("releases"))
    return {kind: write(os.path.join(folder, kind)) for kind, write in seed_fixtures.TRAINING_FORMATS.items()}


def _check_accepted(records, expected, seed):
    assert len(records) == expected, "samples lost without a word"
    for record in records:
        if record.image.startswith(seed.image_root + os.sep):
            assert os.path.normpath(record.image).startswith(seed.image_root + os.sep), record.image
        record.caption.encode("utf-8")
        for text in (record.negatives or []) + (record.concepts or []):
            text.encode("utf-8")


@pytest.mark.parametrize("kind", ["degla", "coco", "karpathy"])
def test_json_release_importers(seeds, kind):
    seed = seeds[kind]
    with open(seed.path, encoding="utf-8") as handle:
        original = json.load(handle)
    path = os.path.join(os.path.dirname(seed.path), "case.json")

    fz.fuzz_reader(f"import-{kind}", fz.mutated_json(original), path,
                   lambda: import_records(path, kind, seed.image_root),
                   lambda records, mutation: _check_accepted(records, fz.expected_samples(kind, mutation[1]), seed))


@st.composite
def mutated_pickle(draw, value, kind):
    """(kinds, bytes): structure mutations of the samples, then the file as the release writes it (np.save of an
    object array, pickle.dump of a list, several protocols), sometimes with a byte mutation on top."""
    document = fz.JsonDocument(value)
    kinds = [draw(fz.struct_mutation(document, kinds=tuple(k for k in fz.STRUCT_KINDS if k != "duplicate_key")))
             for _ in range(draw(st.integers(1, 3)))]
    python = document.python()
    if kind == "ceclip":
        buffer = io.BytesIO()
        array = np.empty(len(python), dtype=object) if isinstance(python, list) else np.array(python, dtype=object)
        if isinstance(python, list):
            array[:] = python
        np.save(buffer, array, allow_pickle=True)
        data = buffer.getvalue()
    else:
        data = pickle.dumps(python, protocol=draw(st.sampled_from([2, 4, 5])))
    if draw(st.booleans()):
        byte_kind, data = draw(fz.byte_mutation(data, kinds=tuple(k for k in fz.BYTE_KINDS if k != "long_line")))
        kinds.append(byte_kind)
    return kinds, data


@pytest.mark.parametrize("kind", ["ceclip", "c2lip"])
def test_pickled_release_importers(seeds, kind):
    seed = seeds[kind]
    if kind == "ceclip":
        original = np.load(seed.path, allow_pickle=True).tolist()
    else:
        with open(seed.path, "rb") as handle:
            original = pickle.load(handle)
    path = os.path.join(os.path.dirname(seed.path), "case.npy" if kind == "ceclip" else "case.pkl")

    def check(records, mutation):
        # the reader accepted the file, so it holds only allowed globals: the standard loaders may count it
        if kind == "ceclip":
            loaded = np.load(path, allow_pickle=True)
        else:
            with open(path, "rb") as handle:
                loaded = pickle.load(handle)
        _check_accepted(records, _pickled_count(kind, loaded), seed)

    fz.fuzz_reader(f"import-{kind}", mutated_pickle(original, kind), path,
                   lambda: import_records(path, kind, seed.image_root), check)
