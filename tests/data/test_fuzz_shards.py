"""Fuzz: WebDataset shards with damaged samples and damaged archives. Counting a shard (what the loader does at
start) either gives the number of samples the stream will yield, or an InputError naming the shard; every sample
of the stream is then built or skipped with a reason (counted by the loader), never an exception. A shard damaged
after the count loses the rest of the shard as one counted skip."""
import io
import json
import os
import tarfile

import pytest
import torch
from hypothesis import strategies as st

import fuzz_support as fz
import seed_fixtures
from compclip.data.dataset import Collate, SampleBuilder, Skip
from compclip.data.shards import ShardDataset, count_samples, decode_fields, iter_tar_samples, sample_id, split_key

MEMBER_KINDS = ("drop_member", "repeat_member", "split_sample", "json_fields", "image_junk", "symlink_member",
                "txt_member", "directory_member")


def read_members(path):
    with tarfile.open(path) as archive:
        return [(member.name, archive.extractfile(member).read()) for member in archive if member.isfile()]


def build_tar(members) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):  # ("symlink", target) or ("dir",)
                info.type = tarfile.SYMTYPE if data[0] == "symlink" else tarfile.DIRTYPE
                info.linkname = data[1] if data[0] == "symlink" else ""
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def key_runs(members) -> int:
    """Samples as the reader groups them: runs of adjacent members sharing a key (folders are not members)."""
    keys = [split_key(name)[0] for name, data in members if data != ("dir",)]
    return sum(1 for index, key in enumerate(keys) if index == 0 or keys[index - 1] != key)


@st.composite
def mutated_shard(draw, members):
    members = list(members)
    kinds = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(MEMBER_KINDS))
        kinds.append(kind)
        index = draw(st.integers(0, len(members) - 1)) if members else 0
        if not members:
            break
        name, data = members[index]
        key = split_key(name)[0]
        if kind == "drop_member":
            del members[index]
        elif kind == "repeat_member":
            members.insert(index, (name, data))
        elif kind == "split_sample":
            members.append(members.pop(index))
        elif kind == "json_fields" and name.endswith(".json") and isinstance(data, bytes):
            mutation_kinds, mutated = draw(fz.mutated_json(json.loads(data), extra_bytes=False))
            members[index] = (name, mutated)
            kinds += mutation_kinds
        elif kind == "image_junk" and name.endswith(".png") and isinstance(data, bytes):
            members[index] = (name, draw(st.sampled_from([b"", b"not an image", data[: len(data) // 2],
                                                          b"\x89PNG\r\n\x1a\n" + bytes(40)])))
        elif kind == "symlink_member":
            members[index] = (name, ("symlink", draw(st.sampled_from(["/etc/passwd", "../../x.png", "0.png"]))))
        elif kind == "txt_member":
            members.insert(index + 1, (f"{key}.txt", draw(st.sampled_from([b"a caption", b"caf\xe9", b""]))))
        elif kind == "directory_member":
            members.insert(index, (f"{key}.d", ("dir",)))
    data = build_tar(members)
    intact = True
    if draw(st.booleans()):
        byte_kind, data = draw(fz.byte_mutation(data, kinds=tuple(k for k in fz.BYTE_KINDS if k != "long_line")))
        kinds.append(byte_kind)
        intact = False
    return kinds, data, (key_runs(members) if intact else None)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("shards"))
    seed_fixtures.write_shards(folder)
    return folder, read_members(os.path.join(folder, "shards", "shard-000000.tar"))


def test_shard_count_and_stream_agree_and_every_sample_is_built_or_skipped(shard):
    folder, members = shard
    path = os.path.join(folder, "case.tar")
    builder = SampleBuilder(None, num_negatives=2, seed=0)

    def check(count, mutation):
        expected = mutation[2]
        if expected is not None:
            assert count == expected, "the count differs from the samples in the shard"
        built = skipped = 0
        with fz.time_bound():
            for raw in iter_tar_samples(path):
                name = f"{raw['__url__']}:{raw['__key__']}"
                try:
                    image, caption, fields = decode_fields(raw)
                    if image is None:
                        raise Skip(name, "no image")
                    builder.build(sample_id(path, raw["__key__"]), 0, image, caption, fields["negatives"],
                                  fields["valid"], fields["concepts"], name)
                    built += 1
                except Skip:
                    skipped += 1
                except fz.input_errors() as error:  # decode_fields' ManifestError: the loader skips and counts it
                    fz.check_names_file(str(error), path)
                    skipped += 1
        assert built + skipped == count, "the stream lost samples the count promised"
        return "skipped" if skipped else "accepted"

    fz.fuzz_reader("shards", mutated_shard(members), path, lambda: count_samples([path]), check)


def _tokens(texts):
    return torch.zeros(len(texts), 4, dtype=torch.long)


def test_a_shard_damaged_after_the_count_loses_its_rest_as_one_counted_skip(shard, caplog):
    """With `data.train_num_samples` the shards are not counted at start; a truncated shard then ends its
    stream with one skipped sample and a warning naming it, and the next pass yields its good samples again."""
    folder, members = shard
    path = os.path.join(folder, "truncated.tar")
    data = build_tar(members)
    offsets = []  # end of the second sample's members: the cut leaves two whole samples and a broken third
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        offsets = [member.offset_data + member.size for member in archive]
    with open(path, "wb") as handle:
        handle.write(data[: offsets[3] + 700])
    dataset = ShardDataset([path], SampleBuilder(None, 2, 0), Collate(_tokens, 2), batch_size=1, batches_per_rank=4,
                           rank=0, world_size=1, seed=0, train=False, shuffle_buffer=1)
    dataset.builder.preprocess = lambda image: torch.zeros(3, 2, 2)
    batches = list(dataset)
    assert [batch["skipped"] for batch in batches] == [0, 0, 1, 0]
    assert "truncated.tar" in caplog.text and "rest of shard" in caplog.text
