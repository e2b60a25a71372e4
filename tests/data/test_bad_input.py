"""The defects the fuzz suite found in the data readers, one regression test each (docs/reliability.md lists the
promise each one proves). Every case here ended in a bare traceback, a hang or a silent loss before the fix."""
import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

import seed_fixtures
from compclip.data import DataConfig, ManifestError, build_dataloader, read_manifest
from compclip.data.dataset import SampleBuilder, Skip
from compclip.data.importers import import_c2lip, import_ceclip, import_degla, import_negclip
from compclip.data.shards import count_samples, decode_fields, iter_tar_samples, write_shards
from compclip.safe_pickle import CorruptPickleError, UnsafePickleError, load_npy, load_pickle

import datatest_support as support


def _write(path, data: bytes) -> str:
    with open(path, "wb") as handle:
        handle.write(data)
    return str(path)


# ---- manifests -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix, data, message", [
    ("jsonl", b'{"image": "a.png", "caption": "ok"}\n{"image": "b.png", "caption": "caf\xe9"}\n',
     r"m.jsonl:2: not UTF-8 text \(byte 0xe9 at column 35\)"),
    ("csv", b'image,caption\na.png,ok\nb.png,caf\xe9\n', r"m.csv:3: not UTF-8 text"),
    ("jsonl", b'{"image": "a.png", "caption": "x", "caption": "y"}\n',
     r"m.jsonl:1: duplicate key 'caption' in the object at /"),
    ("jsonl", b'{"image": "a.png", "caption": "x", "negatives": [' + b"9" * 5000 + b']}\n',
     r"m.jsonl:1: invalid JSON: .*4300"),
    ("jsonl", b'{"image": "a.png", "caption": "x", "concepts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
     r"m.jsonl:1: invalid JSON: nested too deeply"),
    ("jsonl", b'{"image": "a.png", "caption": "x \\ud800"}\n', r"m.jsonl:1: field 'caption' is not valid Unicode"),
    ("jsonl", b'{"image": "../../etc/passwd", "caption": "x"}\n', r"m.jsonl:1: field 'image': .* climbs out of"),
    ("tsv", b"image\tcaption\tnegatives\na.png\tok\t[\"n\"]\nb.png\ta cat sitt", r"m.tsv:3: 2 cells for 3 header"),
    ("tsv", b"image\tcaption\na.png\tok\nb.png\ta cat sitt", r"m.tsv:3: the file does not end with a line break"),
    ("csv", b"image,caption,image\na.png,x,b.png\n", r"m.csv:1: header repeats the column\(s\) \['image'\]"),
    ("csv", b'image,caption,negatives\na.png,x,"[' + b'[' * 100_000 + b']' * 100_000 + b']"\n',
     r"m.csv:2: column 'negatives': not a JSON array or Python list literal"),
])
def test_malformed_manifests_name_file_line_and_field(tmp_path, suffix, data, message):
    path = _write(tmp_path / f"m.{suffix}", data)
    with pytest.raises(ManifestError, match=message):
        read_manifest(path, image_root=str(tmp_path))


def test_prepare_refuses_an_extra_field_it_could_not_write_back(tmp_path, capsys):
    """compclip-prepare keeps fields it does not use; one holding a lone surrogate crashed its JSONL writer."""
    from compclip.data import prepare

    path = _write(tmp_path / "m.jsonl", b'{"image": "a.png", "caption": "x", "note": "\\udcff"}\n')
    with pytest.raises(SystemExit) as stopped:
        prepare.main(["--input", path, "--output", str(tmp_path / "o.jsonl"), "--types", "", "--no-concepts"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == f"compclip-prepare: error: {path}:1: field 'note' holds text that is not " \
                                      "valid Unicode (surrogates not allowed)\n"


def test_a_long_csv_cell_is_read_not_refused_by_the_csv_module(tmp_path):
    """csv's default field limit (131,072 characters) used to end in a bare csv.Error."""
    negatives = json.dumps(["a long negative " * 10] * 1000)
    path = tmp_path / "m.csv"
    path.write_text('image,caption,negatives\na.png,x,"' + negatives.replace('"', '""') + '"\n')
    assert len(read_manifest(str(path))[0].negatives) == 1000


def test_the_negclip_tsv_is_a_train_manifest_through_the_importer_s_reader(tmp_path):
    seed = seed_fixtures.write_negclip_tsv(str(tmp_path))
    records = read_manifest(seed.path, image_root=seed.image_root)
    assert [record.to_json() for record in records] == import_negclip(seed.path, seed.image_root)
    assert records[0].negatives == seed_fixtures.NEGATIVES[0]
    assert records[0].image == os.path.join(seed.image_root, "train2014", "COCO_train2014_000000000009.jpg")
    cfg = DataConfig(train_manifest=seed.path, val_manifest=seed.path, image_root=seed.image_root, batch_size=2,
                     num_negatives=2)
    lengths = lambda texts: torch.tensor([[len(text)] for text in texts])  # noqa: E731 - a stand-in tokenizer
    batch = next(iter(build_dataloader(cfg, lengths, support.to_tensor, rank=0, world_size=1, seed=0, train=False)))
    assert batch["negatives"][:, :, 0].tolist() == [[len(text) for text in seed_fixtures.NEGATIVES[i]] for i in (0, 1)]
    assert bool(batch["valid"].all())


# ---- release formats -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry, message", [
    ({"image_id": "abc", "original": "x"}, r"item 0: field 'image_id' must be a non-negative integer, got 'abc'"),
    ({"image_id": -1, "original": "x"}, r"item 0: field 'image_id' must be a non-negative integer, got -1"),
    ({"image_id": float("inf"), "original": "x"}, r"item 0: field 'image_id' must be a non-negative integer"),
    ({"image_id": 1, "original": "x", "enhanced": [1, 2]}, r"item 0: field 'enhanced' must be a list of strings"),
    ({"image_id": 1, "original": 5}, r"item 0: 'original' must be a string"),
])
def test_degla_entries_name_item_and_field(tmp_path, entry, message):
    path = _write(tmp_path / "degla.json", json.dumps([entry]).encode())
    with pytest.raises(ManifestError, match="degla.json: " + message):
        import_degla(path, str(tmp_path))


def test_degla_invalid_json_names_line_and_column(tmp_path):
    path = _write(tmp_path / "degla.json", b'[\n {"image_id": 1, "original": "x"},\n {"image_id": 2,,}\n]')
    with pytest.raises(ManifestError, match=r"degla.json:3: invalid JSON \(column 17\)"):
        import_degla(path, str(tmp_path))


@pytest.mark.parametrize("change, message", [
    ({"valid_caption": [1, float("nan"), 1, 1]}, "field 'valid_caption' must be a list of 0/1 flags"),
    ({"noun_aug_caption": None}, "field 'noun_aug_caption' must be a string, got NoneType"),
    ({"image_id": 2.5}, "field 'image_id' must be a non-negative integer"),
])
def test_ceclip_samples_name_item_and_field(tmp_path, change, message):
    sample = {"image_id": 9, "caption": "a man rides a horse", "relation_aug_caption": "###",
              "adj_aug_caption": "a", "noun_aug_caption": "b", "verb_aug_caption": "c", **change}
    np.save(tmp_path / "c.npy", np.array([sample], dtype=object), allow_pickle=True)
    with pytest.raises(ManifestError, match=r"c.npy: item 0: " + message):
        import_ceclip(str(tmp_path / "c.npy"), str(tmp_path))


def test_c2lip_nounphrases_as_a_string_is_refused_not_split_into_characters(tmp_path):
    path = _write(tmp_path / "c.pkl", pickle.dumps([{"image": "a.jpg", "caption": "red car", "nounphrases": "car"}]))
    with pytest.raises(ManifestError, match="c.pkl: item 0: field 'nounphrases' must be a list of strings"):
        import_c2lip(path, str(tmp_path))


def test_broken_pickles_name_the_file(tmp_path):
    truncated = _write(tmp_path / "t.pkl", pickle.dumps([{"caption": "x"}] * 3)[:-5])
    with pytest.raises(CorruptPickleError, match=r"t.pkl: not a readable pickle"):
        load_pickle(truncated)
    buffer = io.BytesIO()
    np.save(buffer, np.arange(10))
    short = _write(tmp_path / "s.npy", buffer.getvalue()[:-8])
    with pytest.raises(CorruptPickleError, match=r"s.npy: the header declares \(10,\)"):
        load_npy(short)
    with pytest.raises(CorruptPickleError, match="r.npy: not a .npy file"):
        load_npy(_write(tmp_path / "r.npy", os.urandom(64)))
    # a frame that declares 100 bytes and holds 3: the pure-Python unpickler alone would return []
    short_frame = _write(tmp_path / "f.pkl", b"\x80\x04\x95" + (100).to_bytes(8, "little") + b"]\x94.")
    with pytest.raises(CorruptPickleError, match=r"f.pkl: not a readable pickle .*truncated \(3 of 100 bytes\)"):
        load_pickle(short_frame)


class _Allocate:
    def __init__(self, kind):
        self.kind = kind

    def __reduce__(self):
        return (bytearray, (10**11,)) if self.kind == "bytes" else (range, (10**12,))


@pytest.mark.parametrize("kind, refused", [("bytes", r"bytearray\(100000000000\): a size"),
                                           ("range", "global builtins.range")])
def test_a_pickle_cannot_allocate_by_a_size_alone(tmp_path, kind, refused):
    """A 60-byte pickle calling bytearray(10**11) asked for 100 GB through an allowed global."""
    path = _write(tmp_path / "bomb.pkl", pickle.dumps([_Allocate(kind)]))
    with pytest.raises(UnsafePickleError, match=f"bomb.pkl: .*{refused}"):
        load_pickle(path)


def test_a_huge_memo_index_costs_one_entry_not_a_table_of_that_size(tmp_path):
    """`LONG_BINPUT 3000000000` made the C unpickler zero-fill a 24-48 GB memo table for a 12-byte file (the
    fuzz run was killed for memory); the restricted unpickler's memo is a dict."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    path = _write(tmp_path / "memo.pkl", b"\x80\x02]r" + (3_000_000_000).to_bytes(4, "little") + b".")
    assert load_pickle(path) == []
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # kB
    bomb = _write(tmp_path / "bytes.pkl", b"\x80\x05\x96" + (30 * 10**9).to_bytes(8, "little") + b"ab.")
    with pytest.raises(UnsafePickleError, match=r"bytes.pkl: refusing BYTEARRAY8 of 30000000000 bytes"):
        load_pickle(bomb)


# ---- shards ----------------------------------------------------------------------------------------------------------

def _tar(members) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


PNG = seed_fixtures.write_image  # noqa: the shard tests write their image through it


@pytest.fixture
def png_bytes(tmp_path):
    return open(PNG(str(tmp_path / "x.png"), 0), "rb").read()


@pytest.mark.parametrize("json_bytes, reason", [
    (b'{"caption": "caf\xe9"}', "not UTF-8 text"),
    (b'{"caption": "x",', "invalid JSON"),
    (b'{"caption": "x", "negatives": "abc"}', "'negatives' must be a list of strings"),
    (b'{"caption": "x", "caption": "y"}', "duplicate key 'caption'"),
])
def test_a_damaged_shard_sample_is_skipped_with_its_reason(tmp_path, png_bytes, json_bytes, reason):
    path = _write(tmp_path / "s.tar", _tar([("0.png", png_bytes), ("0.json", json_bytes)]))
    (sample,) = iter_tar_samples(path)
    with pytest.raises(ManifestError, match=f"s.tar:0.*{reason}"):
        decode_fields(sample)


def test_a_sample_repeating_a_member_is_skipped(tmp_path, png_bytes):
    path = _write(tmp_path / "s.tar", _tar([("0.png", png_bytes), ("0.json", b'{"caption": "a"}'),
                                            ("0.json", b'{"caption": "b"}')]))
    with pytest.raises(ManifestError, match="member 0.json appears twice"):
        decode_fields(next(iter_tar_samples(path)))


@pytest.mark.parametrize("cut, message", [
    (lambda data, header: data[:header + 300], "damaged tar data|truncated shard|damaged tar archive"),
    (lambda data, header: data[:header] + b"x" * 512 + data[header + 512:], "damaged tar data at byte"),
    (lambda data, header: data[:header], "without its end-of-archive blocks"),
])
def test_a_damaged_shard_is_an_error_naming_it_at_count_time(tmp_path, png_bytes, cut, message):
    """tarfile stops silently at a header it cannot read after the first: the old count and stream lost the rest
    of the shard without a word."""
    data = _tar([(f"{i}.{ext}", png_bytes if ext == "png" else b'{"caption": "c"}') for i in range(3)
                 for ext in ("png", "json")])
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        header = [member.offset for member in archive][4]  # the third sample's first header
    path = _write(tmp_path / "s.tar", cut(data, header))
    with pytest.raises(ManifestError.__mro__[1], match=f"s.tar: .*({message})"):
        count_samples([path])


def test_write_shards_names_an_unreadable_image(tmp_path):
    with pytest.raises(ManifestError.__mro__[1], match=r"missing.png: cannot read the image of row 1"):
        write_shards([{"image": "missing.png", "caption": "x"}], str(tmp_path / "out"), base_dir=str(tmp_path))


def test_builder_skips_what_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "fifo.png")
    with pytest.raises(Skip, match="not a regular file"):
        SampleBuilder(None, 1, 0).build(0, 0, str(tmp_path / "fifo.png"), "a caption", None, None, None, "m:3")
